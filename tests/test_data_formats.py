"""The formats people bring: LLaMA-Factory ShareGPT (preference and KTO), UltraFeedback, JSON files,
`data.columns`, and what preftune says about a file it does not understand."""

from __future__ import annotations

import json
import re

import pytest

from preftune.config import DataSettings
from preftune.data import load_examples, load_pairs, tokenize_examples
from preftune.data.formats import detect_format
from preftune.data.pipeline import prepare_examples
from preftune.errors import ConfigError, DataError
from tests.support import load_test_tokenizer

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
GENERATION = "<|im_start|>assistant\n"


def chatml(*turns: tuple[str, str], system: str = SYSTEM) -> str:
    """The bytebpe test tokenizer's ChatML rendering, ending with the generation prompt."""
    return system + "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in turns) + GENERATION


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return str(path)


def texts(examples) -> list[tuple]:
    return [(example.prompt, *example.answers) for example in examples]


# --- LLaMA-Factory ShareGPT -----------------------------------------------------------------------


def test_sharegpt_preference_records(tmp_path, bytebpe_tokenizer):
    records = [
        {
            "conversations": [{"from": "human", "value": "Hi"}],
            "chosen": {"from": "gpt", "value": "Hello!"},
            "rejected": {"from": "gpt", "value": "Go away."},
        },
        {
            "system": "Be brief.",
            "conversations": [
                {"from": "user", "value": "Weather?"},
                {"from": "function_call", "value": '{"name": "weather"}'},
                {"from": "observation", "value": "sunny"},
            ],
            "chosen": {"from": "assistant", "value": "Sunny."},
            "rejected": {"from": "gpt", "value": "Rain."},
        },
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "?"}], "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
        {"conversations": [{"from": "narrator", "value": "Hi"}], "chosen": {"from": "gpt", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
        {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "human", "value": "a"}, "rejected": {"from": "gpt", "value": "b"}},
    ]
    pairs, report = load_pairs(write_jsonl(tmp_path / "sharegpt.jsonl", records), tokenizer=bytebpe_tokenizer)
    assert report.format == "sharegpt" and detect_format(records[0]) == "sharegpt"
    assert texts(pairs) == [
        (chatml(("user", "Hi")), "Hello!", "Go away."),
        (
            chatml(("user", "Weather?"), ("assistant", '{"name": "weather"}'), ("tool", "sunny"), system="<|im_start|>system\nBe brief.<|im_end|>\n"),
            "Sunny.",
            "Rain.",
        ),
    ]
    assert report.skipped == {"no_turn_to_answer": 1, "unknown_role": 1, "no_assistant_answer": 1}
    assert report.skipped_at["unknown_role"] == [f"{tmp_path / 'sharegpt.jsonl'}:4"]


def test_sharegpt_kto_records_in_both_turn_styles(tmp_path, bytebpe_tokenizer):
    records = [
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}], "kto_tag": True},
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Go away."}], "kto_tag": False},
        {"messages": [{"role": "user", "content": "Hi"}], "kto_tag": True},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "x"}], "kto_tag": "yes"},
    ]
    examples, report = load_examples(write_jsonl(tmp_path / "kto.jsonl", records), tokenizer=bytebpe_tokenizer)
    assert report.format == "sharegpt_kto"
    assert [(e.prompt, e.completion, e.label) for e in examples] == [
        (chatml(("user", "Hi")), "Hello!", True),
        (chatml(("user", "Hi")), "Go away.", False),
    ]
    assert report.skipped == {"no_assistant_answer": 1, "wrong_type": 1}
    with pytest.raises(DataError, match=r"kto\.jsonl:3: the last turn must be the assistant's completion \[no_assistant_answer\] \(field 'messages'\)$"):
        load_examples(tmp_path / "kto.jsonl", tokenizer=bytebpe_tokenizer, skip_invalid=False)


def test_a_paired_method_refuses_an_unpaired_sharegpt_file(tmp_path, bytebpe_tokenizer):
    path = write_jsonl(tmp_path / "kto.jsonl", [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}], "kto_tag": True}])
    with pytest.raises(DataError, match=r"kto\.jsonl:1: the file holds unpaired examples \(format sharegpt_kto\).*loss_type: kto"):
        load_pairs(path, tokenizer=bytebpe_tokenizer)


# --- UltraFeedback-binarized -----------------------------------------------------------------------


def test_ultrafeedback_binarized_records(tmp_path, bytebpe_tokenizer):
    """`prompt` is a string; chosen/rejected hold the whole conversation; the scores are kept."""
    user = {"role": "user", "content": "Name a colour."}
    records = [
        {
            "prompt": "Name a colour.",
            "prompt_id": "abc",
            "chosen": [user, {"role": "assistant", "content": "Blue."}],
            "rejected": [user, {"role": "assistant", "content": "Seven."}],
            "messages": [user, {"role": "assistant", "content": "Blue."}],
            "score_chosen": 8.5,
            "score_rejected": 3,
        },
        # Answer-only lists: the prompt string is the user turn.
        {"prompt": "Name a colour.", "chosen": [{"role": "assistant", "content": "Red."}], "rejected": [{"role": "assistant", "content": "Ten."}]},
    ]
    pairs, report = load_pairs(write_jsonl(tmp_path / "uf.jsonl", records), tokenizer=bytebpe_tokenizer)
    assert report.format == "chat"
    assert texts(pairs) == [(chatml(("user", "Name a colour.")), "Blue.", "Seven."), (chatml(("user", "Name a colour.")), "Red.", "Ten.")]
    assert pairs[0].scores == (8.5, 3.0) and pairs[1].scores is None


# --- JSON files ------------------------------------------------------------------------------------

PAIRS = [
    {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."},
    {"prompt": "Name a colour.\n", "chosen": "Blue", "rejected": "Seven"},
]


def test_a_pretty_printed_json_array_numbers_records_by_line(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(PAIRS, indent=2), encoding="utf-8")
    pairs, report = load_pairs(path)
    assert texts(pairs) == [tuple(record.values()) for record in PAIRS]
    assert [pair.origin for pair in pairs] == [f"{path}:2", f"{path}:7", f"{path}:12"]  # each "{" of the array
    broken = [*PAIRS[:2], {"prompt": "p", "chosen": "c"}]
    path.write_text(json.dumps({"version": 1, "train": broken}, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:14: missing field \[missing_field\] \(field 'rejected'\)$"):
        load_pairs(path, skip_invalid=False)


@pytest.mark.parametrize("key", ["data", "train", "examples", "pairs"])
def test_a_json_object_holds_its_records_under_a_list_key(tmp_path, key):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"name": "mine", key: PAIRS}), encoding="utf-8")
    pairs, _ = load_pairs(path)
    assert texts(pairs) == [tuple(record.values()) for record in PAIRS]
    assert pairs[1].origin == f"{path}:record 2"  # all on one line: numbered by record


def test_json_lines_named_json_and_a_json_array_named_jsonl(tmp_path):
    lines = tmp_path / "pairs.json"
    lines.write_text("".join(json.dumps(record) + "\n" for record in PAIRS), encoding="utf-8")
    array = tmp_path / "pairs.jsonl"
    array.write_text(json.dumps(PAIRS, indent=1), encoding="utf-8")
    for path, origins in ((lines, ["1", "2", "3"]), (array, ["2", "7", "12"])):
        pairs, _ = load_pairs(path)
        assert texts(pairs) == [tuple(record.values()) for record in PAIRS]
        assert [pair.origin for pair in pairs] == [f"{path}:{line}" for line in origins]


def test_a_record_split_over_lines_in_jsonl_says_why(tmp_path):
    path = tmp_path / "multi.jsonl"
    path.write_text(json.dumps(PAIRS[0], indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=r"multi\.jsonl:1: not valid JSON.*JSONL needs one whole record per line"):
        load_pairs(path)


# --- data.columns ----------------------------------------------------------------------------------


def test_columns_map_a_files_names_to_preftunes(tmp_path):
    records = [{"id": 1, "question": "Q: 2+2?\nA:", "good": " 4", "bad": " 5"}, {"id": 2, "question": "Q: hi\nA:", "good": " hi"}]
    path = write_jsonl(tmp_path / "custom.jsonl", records)
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    pairs, report = load_pairs(path, columns=columns)
    assert (report.format, texts(pairs)) == ("pairs", [("Q: 2+2?\nA:", " 4", " 5")])
    # Errors name the file's own field, and say which mapping pointed there.
    with pytest.raises(DataError, match=r"custom\.jsonl:2: missing field \[missing_field\] \(data\.columns\.rejected names it\) \(field 'bad'\)$"):
        load_pairs(path, columns=columns, skip_invalid=False)


def test_columns_read_unpaired_records_and_pass_through_the_pipeline(tmp_path):
    records = [{"input": f"Q{i}:", "output": f" a{i}", "thumbs_up": i % 2 == 0} for i in range(6)]
    path = write_jsonl(tmp_path / "feedback.jsonl", records)
    settings = DataSettings(
        train_file=path, validation_file=None, validation_split=2, max_length=32, columns={"prompt": "input", "completion": "output", "label": "thumbs_up"}
    )
    data = prepare_examples(settings, load_test_tokenizer(), seed=0, paired=False)
    assert data.load_reports[0].format == "kto" and len(data.train) == 4 and len(data.validation) == 2
    assert sorted(e.label for e in data.train + data.validation) == [False] * 3 + [True] * 3


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"promt": "question"}, r"data\.columns: unknown name 'promt' \(did you mean 'prompt'\?\)"),
        ({"prompt": ""}, r"data\.columns\.prompt: expected a field name"),
        ({"chosen": "answer", "rejected": "answer"}, r"maps two of preftune's names to the same field"),
    ],
)
def test_bad_columns_are_config_errors(tmp_path, columns, message):
    with pytest.raises(ConfigError, match=message):
        load_pairs(write_jsonl(tmp_path / "x.jsonl", PAIRS), columns=columns)


# --- what preftune says about a file it does not understand ---------------------------------------


def test_an_unknown_format_names_the_closest_one_and_the_columns_that_read_it(tmp_path):
    path = write_jsonl(tmp_path / "mine.jsonl", [{"question": "Q?", "good": " yes", "bad": " no"}] * 3)
    expected = (
        r"closest to pairs \(prompt, chosen, rejected\); try data\.columns: \{prompt: question, chosen: good, rejected: bad\}"
    )
    with pytest.raises(DataError, match=rf"no usable preference pairs: .*unknown_format 3 .*mine\.jsonl:1: no known record format \(fields: 'question', 'good', 'bad'\); {expected}"):
        load_pairs(path)
    with pytest.raises(DataError, match=rf"^{re.escape(path)}:1: no known record format .*{expected} \[unknown_format\]$"):
        load_pairs(path, skip_invalid=False)
    # ... and the mapping it suggests reads the file.
    pairs, _ = load_pairs(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert texts(pairs) == [("Q?", " yes", " no")] * 3


@pytest.mark.parametrize(
    ("record", "closest"),
    [
        ({"instruction": "Q?", "response": " yes", "is_good": True}, r"closest to kto \(prompt, completion, label\); try data\.columns: \{prompt: instruction, completion: response, label: is_good\}"),
        ({"dialog": [{"from": "human", "value": "Hi"}], "good": {"from": "gpt", "value": "a"}, "bad": {"from": "gpt", "value": "b"}}, r"closest to sharegpt .*try data\.columns: \{messages: dialog, chosen: good, rejected: bad\}"),
        ({"winner": " yes", "loser": " no"}, r"closest to hh_rlhf \(chosen, rejected\); try data\.columns: \{chosen: winner, rejected: loser\}"),
        ({"prompt_text": "Q?", "score": 3}, r"closest to prompts \(prompt\); try data\.columns: \{prompt: prompt_text\}"),
        ({"id": 3, "rejected": " no"}, r"closest to hh_rlhf \(chosen, rejected\), but it has nothing for chosen$"),
    ],
)
def test_closest_format_hints(tmp_path, record, closest):
    with pytest.raises(DataError, match=closest.removesuffix("$") + r" \[unknown_format\]$"):
        load_examples(write_jsonl(tmp_path / "x.jsonl", [record]), skip_invalid=False)


def test_a_misspelled_field_is_pointed_out(tmp_path):
    path = write_jsonl(tmp_path / "typo.jsonl", [{"prompt": "Q?", "chosen": " yes", "rejectd": " no"}])
    with pytest.raises(
        DataError,
        match=r"typo\.jsonl:1: missing field; the record has 'rejectd': misspelled\? rename it to 'rejected' "
        r"or set data\.columns: \{rejected: rejectd\} \[missing_field\] \(field 'rejected'\)$",
    ):
        load_pairs(path, skip_invalid=False)


def test_a_file_that_changes_format_midway_says_so(tmp_path):
    turn = "\n\nHuman: hi\n\nAssistant:"
    records = [{"chosen": turn + " Hello.", "rejected": turn + " Go away."}] * 2 + [{"prompt": "Q?", "completion": " a", "label": True}] * 2
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    pairs, report = load_pairs(path)
    assert (report.format, len(pairs), report.skipped) == ("hh_rlhf", 2, {"format_changed": 2})
    assert report.skipped_at["format_changed"] == [f"{path}:3", f"{path}:4"]
    with pytest.raises(DataError, match=rf"^{re.escape(path)}:3: this record is in format kto, but the file started in format hh_rlhf \({re.escape(path)}:1\)"):
        load_pairs(path, skip_invalid=False)


def test_a_record_missing_a_field_of_its_own_format_is_not_a_format_change(tmp_path):
    # The third record reads like hh_rlhf (chosen and rejected, no prompt), but it is a pair without its prompt.
    records = [{"prompt": "Q?", "chosen": " a", "rejected": " b"}, {"prompt": "Q?", "chosen": " a"}, {"chosen": " a", "rejected": " b"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    _, report = load_pairs(path)
    assert report.skipped_at == {"missing_field": [f"{path}:2", f"{path}:3"]}


def test_a_forced_wrong_format_names_the_records_own(hh_validation_path):
    with pytest.raises(DataError, match=r"read 289, kept 0, skipped 289: missing_field 289.*the records look like format hh_rlhf"):
        load_pairs(hh_validation_path, format="pairs")


# --- provenance, prompt-only files ----------------------------------------------------------------


def test_provenance_is_read_and_checked(tmp_path):
    records = [
        {"prompt": "Q?", "chosen": " a", "rejected": " b", "provenance": "synthetic"},
        {"prompt": "Q?", "chosen": " a", "rejected": " b"},
        {"prompt": "Q?", "chosen": " a", "rejected": " b", "provenance": "robot"},
        {"prompt": "Q?", "chosen": " a", "rejected": " b", "source": "human"},
        {"prompt": "Q?", "chosen": " a", "rejected": " b", "source": "evol_instruct"},  # a dataset name, not a provenance
    ]
    pairs, report = load_pairs(write_jsonl(tmp_path / "p.jsonl", records))
    assert [pair.provenance for pair in pairs] == ["synthetic", None, "human", None]
    assert report.skipped == {"wrong_type": 1}
    tokenized, _ = tokenize_examples(pairs, load_test_tokenizer(), max_length=32)
    assert [example.provenance for example in tokenized] == ["synthetic", None, "human", None]


def test_prompt_only_files(tmp_path, bytebpe_tokenizer):
    hi = {"role": "user", "content": "Hi"}
    records = [
        {"prompt": "Write a haiku."},
        {"prompt": [hi]},
        {"messages": [hi]},
        {"prompt": "  "},
        {"messages": [hi, {"role": "assistant", "content": "Hello"}]},
    ]
    examples, report = load_examples(write_jsonl(tmp_path / "prompts.jsonl", records), tokenizer=bytebpe_tokenizer)
    assert report.format == "prompts" and report.skipped == {"empty_prompt": 1, "no_turn_to_answer": 1}
    assert [(e.prompt, e.answers) for e in examples] == [("Write a haiku.", ()), (chatml(("user", "Hi")), ()), (chatml(("user", "Hi")), ())]
    with pytest.raises(DataError, match=r"holds prompts \(format prompts\), but this needs preference pairs"):
        load_pairs(tmp_path / "prompts.jsonl", tokenizer=bytebpe_tokenizer)
