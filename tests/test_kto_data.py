"""Unpaired (KTO) data: reading records, pairs → KTO conversion, the mismatched-completion batch, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from preftune.cli import main
from preftune.config import DataSettings
from preftune.data.collate import collate_unpaired
from preftune.data.formats import load_examples, load_pairs
from preftune.data.kto import convert_to_kto, pairs_to_unpaired
from preftune.data.records import TokenizedExample
from preftune.data.pipeline import prepare_examples
from preftune.errors import DataError
from preftune.logprobs import sequence_logps, unshared_sequence_logps
from tests.support import load_test_tokenizer, tiny_llama


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_unpaired_records_load_with_counted_skips(tmp_path):
    path = _write_jsonl(
        tmp_path / "kto.jsonl",
        [
            {"prompt": "Q: hi\nA:", "completion": " hello", "label": True},
            {"prompt": "Q: hi\nA:", "completion": " go away", "label": False},
            {"prompt": "Q: x\nA:", "completion": " y"},
            {"prompt": "Q: x\nA:", "completion": " y", "label": "yes"},
            {"prompt": "Q: x\nA:", "completion": "  ", "label": True},
        ],
    )
    examples, report = load_examples(path)
    assert [(e.completion, e.label) for e in examples] == [(" hello", True), (" go away", False)]
    assert report.skipped == {"missing_field": 1, "wrong_type": 1, "empty_answer": 1}
    assert examples[1].source == f"{path}:2"
    with pytest.raises(DataError, match=r"kto.jsonl:3.*'label'"):
        load_examples(path, skip_invalid=False)


def test_chat_unpaired_records_render_the_prompt_with_the_chat_template(tmp_path, bytebpe_tokenizer):
    path = _write_jsonl(
        tmp_path / "kto.jsonl",
        [{"prompt": [{"role": "user", "content": "Hi?"}], "completion": [{"role": "assistant", "content": "Hello!"}], "label": False}],
    )
    (example,), _ = load_examples(path, tokenizer=bytebpe_tokenizer)
    assert example.prompt == bytebpe_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi?"}], tokenize=False, add_generation_prompt=True
    )
    assert (example.completion, example.label) == ("Hello!", False)


def test_converted_pairs_read_back_as_chosen_true_and_rejected_false(tmp_path, hh_train_path):
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(hh_train_path.read_text(encoding="utf-8").splitlines(keepends=True)[:5]), encoding="utf-8")
    pairs, _ = load_pairs(source)
    written, _ = convert_to_kto(source, tmp_path / "kto.jsonl")
    examples, report = load_examples(tmp_path / "kto.jsonl")
    assert written == len(examples) == 2 * len(pairs) and not report.skipped
    for pair, chosen, rejected in zip(pairs, examples[0::2], examples[1::2]):
        assert (chosen.prompt, chosen.completion, chosen.label) == (pair.prompt, pair.chosen, True)
        assert (rejected.prompt, rejected.completion, rejected.label) == (pair.prompt, pair.rejected, False)
    assert [(e.prompt, e.completion, e.label) for e in pairs_to_unpaired(pairs)] == [
        (e.prompt, e.completion, e.label) for e in examples
    ]


def test_cli_convert_writes_kto_records(tmp_path, capsys):
    target = tmp_path / "out" / "kto.jsonl"
    assert main(["convert", "--to", "kto", "hh-rlhf-harmless:validation", str(target)]) == 0
    lines = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert len(lines) >= 2 and set(lines[0]) == {"prompt", "completion", "label"}
    assert [line["label"] for line in lines[:4]] == [True, False, True, False]


def test_kto_training_reads_a_paired_file_directly_and_splits_pairs_before_unpairing():
    tokenizer = load_test_tokenizer()
    settings = DataSettings(validation_file=None, validation_split=2, max_train_samples=6, max_length=96)
    data = prepare_examples(settings, tokenizer, seed=0, paired=False)
    assert len(data.train) == 12 and len(data.validation) == 4
    assert all(isinstance(e, TokenizedExample) and len(e.answer_ids) == 1 for e in data.train + data.validation)
    assert [e.label for e in data.train[:4]] == [True, False, True, False]
    train_sources = {e.source.rsplit(" ", 1)[0] for e in data.train}
    assert not train_sources & {e.source.rsplit(" ", 1)[0] for e in data.validation}  # no pair straddles the split
    assert "unpaired examples: 12 train, 4 validation" in data.summary()


def test_a_paired_loss_refuses_an_unpaired_file_with_a_pointer_to_kto(tmp_path):
    path = _write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "Q:", "completion": " a", "label": True}] * 3)
    settings = DataSettings(train_file=str(path), validation_file=None)
    with pytest.raises(DataError, match="loss_type: kto"):
        prepare_examples(settings, load_test_tokenizer(), seed=0, paired=True)


def test_mismatched_completions_are_scored_under_each_examples_own_prompt():
    tokenizer = load_test_tokenizer()
    model = tiny_llama(len(tokenizer)).eval()
    examples = [
        TokenizedExample([5, 6, 7], ([8, 9, 2],), (True,), origin="a"),
        TokenizedExample([10, 11], ([12, 2],), (False,), origin="b"),
        TokenizedExample([13, 14, 15, 16], ([17, 18, 19, 2],), (True,), origin="c"),
    ]
    batch = collate_unpaired(examples, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        packed = sequence_logps(model, batch)
        plain = unshared_sequence_logps(
            model,
            [e.prompt_ids for e in examples],
            [(e.completion_ids, examples[i - 1].completion_ids) for i, e in enumerate(examples)],
            pad_id=tokenizer.pad_token_id,
        )
    torch.testing.assert_close(packed.sum, plain.sum, rtol=1e-5, atol=1e-5)
    assert packed.count.tolist() == [3, 2, 4, 4, 3, 2]  # completions, then example e scores example e-1's completion
