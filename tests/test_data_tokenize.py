"""Tokenisation: the exact prompt/answer boundary, BOS/EOS rules, the over-long policy, one path for K answers, long texts cut first."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from tokenizers import normalizers
from transformers import AutoTokenizer

from preftune.config import DataSettings
from preftune.data import Example, load_pairs, tokenize_answer_boundary, tokenize_examples, tokenize_pairs
from preftune.data.pipeline import prepare_examples
from preftune.errors import ConfigError, DataError, PreftuneError

TOKENIZERS_DIR = Path(__file__).resolve().parent / "assets" / "tokenizers"

TOKENIZERS = ["bytebpe", "metaspace", "smollm2"]
# The Llama-2-style decoder drops one leading space of whatever it decodes first (its "▁" prefix),
# so on its own an answer " Hi" decodes as "Hi"; in context it is exact.
DECODER_STRIPS_FIRST_SPACE = {"metaspace"}
HH_PROMPT = "\n\nHuman: What is the capital of France?\n\nAssistant:"
EOS = "{eos}"  # replaced by the tokenizer's EOS text

# (prompt, answer): each stresses the boundary differently.
TRICKY_CASES = {
    "leading_space": (HH_PROMPT, " Paris is the capital."),
    "no_leading_space": (HH_PROMPT, "Paris is the capital."),
    "leading_newline": (HH_PROMPT, "\nParis.\n\nIt is."),
    "unicode_emoji": (HH_PROMPT, " Paris 😀 — naïve café ✓ 東京"),
    "leading_punctuation": (HH_PROMPT, "?! Paris, obviously."),
    "prompt_ends_with_space": (HH_PROMPT + " ", "Paris is the capital."),
    "boundary_inside_a_word": ("The capital of France is Par", "is, of course."),
    "already_ends_with_eos": (HH_PROMPT, " Paris." + EOS),
    "trailing_whitespace": (HH_PROMPT, " Paris.  \n"),
}


@pytest.fixture(params=TOKENIZERS)
def named_tokenizer(request):
    return request.param, request.getfixturevalue(f"{request.param}_tokenizer")


def adds_bos(tokenizer) -> bool:
    return tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][0] == tokenizer.bos_token_id


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def without_bos(tokenizer, ids: list[int]) -> list[int]:
    return ids[1:] if adds_bos(tokenizer) else ids


@pytest.mark.parametrize("case", TRICKY_CASES)
def test_answer_boundary_is_exact(named_tokenizer, case):
    name, tokenizer = named_tokenizer
    prompt, answer = TRICKY_CASES[case]
    eos_text, eos_id = tokenizer.eos_token, tokenizer.eos_token_id
    answer = answer.replace(EOS, eos_text)
    expected_answer = answer if answer.endswith(eos_text) else answer + eos_text

    prompt_ids, answer_ids = tokenize_answer_boundary(tokenizer, prompt, answer)

    # Exactly one EOS, at the end of the answer; one BOS at the very start, only if the tokenizer adds one.
    assert answer_ids[-1] == eos_id and answer_ids.count(eos_id) == 1 and eos_id not in prompt_ids
    if adds_bos(tokenizer):
        assert prompt_ids[0] == tokenizer.bos_token_id and prompt_ids.count(tokenizer.bos_token_id) == 1
    if tokenizer.bos_token_id is not None:
        assert tokenizer.bos_token_id not in answer_ids
        assert adds_bos(tokenizer) or tokenizer.bos_token_id not in prompt_ids

    # The boundary neither merges nor drops anything: prompt and answer each spell exactly their text.
    assert decode(tokenizer, without_bos(tokenizer, prompt_ids)) == prompt
    assert decode(tokenizer, without_bos(tokenizer, prompt_ids) + answer_ids) == prompt + expected_answer
    standalone = expected_answer
    if name in DECODER_STRIPS_FIRST_SPACE:
        standalone = standalone.removeprefix(" ")
    assert decode(tokenizer, answer_ids) == standalone

    # The prompt's ids do not depend on the answer, so chosen and rejected share them.
    other_prompt_ids, _ = tokenize_answer_boundary(tokenizer, prompt, " Lyon?")
    assert other_prompt_ids == prompt_ids


def test_in_context_tokens_are_used_when_the_boundary_is_clean(bytebpe_tokenizer):
    """An hh-style answer is tokenised exactly as in the full transcript (what the model would see)."""
    answer = " Paris is the capital."
    prompt_ids, answer_ids = tokenize_answer_boundary(bytebpe_tokenizer, HH_PROMPT, answer)
    joint = bytebpe_tokenizer(HH_PROMPT + answer, add_special_tokens=False)["input_ids"]
    assert prompt_ids + answer_ids == joint + [bytebpe_tokenizer.eos_token_id]


def test_metaspace_answer_without_leading_space_gets_no_spurious_space(metaspace_tokenizer):
    """Tokenised alone, "Paris" would become "▁Paris": a space the text does not have."""
    _, answer_ids = tokenize_answer_boundary(metaspace_tokenizer, HH_PROMPT + " ", "Paris")
    assert not metaspace_tokenizer.convert_ids_to_tokens(answer_ids)[0].startswith("▁")


def test_prompt_that_already_starts_with_bos_gets_no_second_one(metaspace_tokenizer):
    """Some chat templates write the BOS text themselves (Llama-3's does)."""
    bos = metaspace_tokenizer.bos_token_id
    prompt = "<s>Q: " + " ".join(f"w{i}" for i in range(50)) + "\nA:"
    prompt_ids, _ = tokenize_answer_boundary(metaspace_tokenizer, prompt, " hello")
    assert prompt_ids[0] == bos and prompt_ids.count(bos) == 1
    (tokenized,), _ = tokenize_pairs([Example.pair(prompt, " a", " b", "x")], metaspace_tokenizer, max_length=32)
    assert tokenized.prompt_ids == [bos] + prompt_ids[-15:]


@pytest.mark.parametrize("name", TOKENIZERS)
def test_real_pairs_tokenize_exactly(name, request, hh_validation_path):
    tokenizer = request.getfixturevalue(f"{name}_tokenizer")
    pairs, _ = load_pairs(hh_validation_path, max_samples=60)
    tokenized, report = tokenize_pairs(pairs, tokenizer, max_length=100_000)
    assert (report.kept, report.prompt_truncated, report.answer_truncated, report.dropped_too_long) == (60, 0, 0, 0)
    for pair, ids in zip(pairs, tokenized, strict=True):
        prompt_text = decode(tokenizer, without_bos(tokenizer, ids.prompt_ids))
        assert prompt_text == pair.prompt
        for answer, answer_ids in ((pair.chosen, ids.chosen_ids), (pair.rejected, ids.rejected_ids)):
            full = decode(tokenizer, without_bos(tokenizer, ids.prompt_ids) + answer_ids)
            assert full == pair.prompt + answer + tokenizer.eos_token


# --- over-long policy -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["bytebpe", "metaspace"])
def test_truncation_policy(name, request):
    tokenizer = request.getfixturevalue(f"{name}_tokenizer")
    short_prompt, long_prompt = "Q:", "Q: " + " ".join(f"w{i}" for i in range(200))
    long_answer = " " + " ".join(f"a{i}" for i in range(200))
    pairs = [
        Example.pair(short_prompt, " yes", " no", "fits"),
        Example.pair(long_prompt, " yes", " no", "long_prompt"),
        Example.pair(short_prompt, long_answer, " no", "long_chosen"),
        Example.pair(short_prompt, long_answer + " end", long_answer + " other", "same_start"),
    ]
    max_length, max_prompt_length = 64, 16
    untruncated = {pair.source: tokenize_answer_boundary(tokenizer, pair.prompt, pair.chosen) for pair in pairs}

    tokenized, report = tokenize_pairs(pairs, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)

    assert (report.kept, report.prompt_truncated, report.answer_truncated, report.dropped_too_long) == (3, 1, 1, 1)
    by_source = {pair.source: pair for pair in tokenized}
    assert set(by_source) == {"fits", "long_prompt", "long_chosen"}

    fits = by_source["fits"]
    assert (fits.prompt_ids, fits.chosen_ids) == untruncated["fits"]

    # A long prompt keeps its end, after its BOS.
    long_prompt_ids = by_source["long_prompt"].prompt_ids
    full_prompt_ids = untruncated["long_prompt"][0]
    assert len(long_prompt_ids) == max_prompt_length
    if adds_bos(tokenizer):
        assert long_prompt_ids[0] == tokenizer.bos_token_id
        assert long_prompt_ids[1:] == full_prompt_ids[-(max_prompt_length - 1) :]
    else:
        assert long_prompt_ids == full_prompt_ids[-max_prompt_length:]
    assert by_source["long_prompt"].chosen_ids[-1] == tokenizer.eos_token_id

    # A long answer keeps its start and no EOS; its short sibling is untouched.
    long_chosen = by_source["long_chosen"]
    budget = max_length - len(long_chosen.prompt_ids)
    assert long_chosen.chosen_ids == untruncated["long_chosen"][1][:budget]
    assert tokenizer.eos_token_id not in long_chosen.chosen_ids
    assert long_chosen.rejected_ids[-1] == tokenizer.eos_token_id
    for pair in tokenized:
        assert len(pair.prompt_ids) + max(len(pair.chosen_ids), len(pair.rejected_ids)) <= max_length
    assert "dropped (answers identical once truncated) 1" in report.summary()


def test_default_max_prompt_length_is_half_of_max_length(bytebpe_tokenizer):
    pair = Example.pair("Q: " + " ".join(f"w{i}" for i in range(100)), " yes", " no", "long")
    (tokenized,), report = tokenize_pairs([pair], bytebpe_tokenizer, max_length=40)
    assert len(tokenized.prompt_ids) == 20 and report.prompt_truncated == 1


@pytest.mark.parametrize(("max_length", "max_prompt_length"), [(32, 32), (32, 0), (32, 40)])
def test_prompt_length_must_leave_room_for_answers(bytebpe_tokenizer, max_length, max_prompt_length):
    with pytest.raises(ConfigError, match="max_prompt_length < max_length"):
        tokenize_pairs([], bytebpe_tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)


def test_tokenizer_without_eos_is_a_clear_error():
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS_DIR / "bytebpe")
    tokenizer.eos_token = None
    with pytest.raises(PreftuneError, match="no EOS token"):
        tokenize_pairs([Example.pair("Q:", " a", " b", "x")], tokenizer, max_length=32)


def test_empty_prompt_without_bos_is_skipped_or_a_clear_error(bytebpe_tokenizer, metaspace_tokenizer):
    pair = Example.pair("", "a", "b", "data.jsonl:7")
    with pytest.raises(DataError, match=r"^data\.jsonl:7: the prompt is empty and the tokenizer adds no BOS.*\[empty_prompt\]$"):
        tokenize_pairs([pair], bytebpe_tokenizer, max_length=32, skip_invalid=False)
    kept, report = tokenize_pairs([pair], bytebpe_tokenizer, max_length=32)
    assert kept == [] and report.skipped_at == {"empty_prompt": ["data.jsonl:7"]}
    (tokenized,), _ = tokenize_pairs([pair], metaspace_tokenizer, max_length=32)
    assert tokenized.prompt_ids == [metaspace_tokenizer.bos_token_id]


# --- an answer the boundary cannot place ----------------------------------------------------------


@pytest.fixture
def nfc_tokenizer():
    """The byte-level test tokenizer with a real NFC normaliser: "e" + "\u0301" becomes one "é" only when read together."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS_DIR / "bytebpe")
    tokenizer.backend_tokenizer.normalizer = normalizers.NFC()
    return tokenizer


def test_an_untokenizable_answer_is_a_counted_skip_or_an_error_naming_its_line(nfc_tokenizer):
    pairs = [
        Example.pair("Q: coffee?\nA:", " yes", " no", "data.jsonl:6"),
        Example.pair("Q: name a drink\nA: cafe", "\u0301 au lait", " tea", "data.jsonl:7"),
    ]
    tokenized, report = tokenize_pairs(pairs, nfc_tokenizer, max_length=64)
    assert [pair.origin for pair in tokenized] == ["data.jsonl:6"]
    assert report.kept == 1 and report.skipped_at == {"untokenizable_answer": ["data.jsonl:7"]}
    assert "skipped 1: untokenizable_answer 1 (e.g. data.jsonl:7)" in report.summary()
    with pytest.raises(DataError, match=r"^data\.jsonl:7: cannot tokenize the answer .*\[untokenizable_answer\]$") as caught:
        tokenize_pairs(pairs, nfc_tokenizer, max_length=64, skip_invalid=False)
    assert (caught.value.path, caught.value.line) == ("data.jsonl", 7)


# --- one path for K answers ------------------------------------------------------------------------


def test_every_k_goes_through_the_same_boundary(bytebpe_tokenizer):
    prompt = "Q: 2+2?\nA:"
    examples = [
        Example.pair(prompt, " 4", " 5", "pair"),
        Example.unpaired(prompt, " 4", False, "unpaired"),
        Example(prompt, (" 4", " 5", " four"), scores=(1.0, 0.0, 0.5), provenance="synthetic", origin="group"),
        Example(prompt, (), origin="prompt only"),
    ]
    tokenized, report = tokenize_examples(examples, bytebpe_tokenizer, max_length=64)
    assert report.kept == 4
    pair, unpaired, group, prompt_only = tokenized
    expected_prompt, four = tokenize_answer_boundary(bytebpe_tokenizer, prompt, " 4")
    assert all(example.prompt_ids == expected_prompt for example in tokenized)
    assert (pair.chosen_ids, pair.rejected_ids) == (four, tokenize_answer_boundary(bytebpe_tokenizer, prompt, " 5")[1])
    assert (unpaired.completion_ids, unpaired.label, unpaired.labels, unpaired.source) == (four, False, (False,), "unpaired")
    assert group.answer_ids[:2] == pair.answer_ids and group.answer_ids[2][-1] == bytebpe_tokenizer.eos_token_id
    assert (group.scores, group.provenance, group.labels) == ((1.0, 0.0, 0.5), "synthetic", None)
    assert prompt_only.answer_ids == ()


def test_prompt_only_examples_are_truncated_to_the_prompt_budget(metaspace_tokenizer):
    long_prompt = "Q: " + " ".join(f"w{i}" for i in range(200))
    (tokenized,), report = tokenize_examples([Example(long_prompt, ())], metaspace_tokenizer, max_length=64, max_prompt_length=16)
    full_ids, _ = tokenize_answer_boundary(metaspace_tokenizer, long_prompt, "x")
    assert tokenized.prompt_ids == [metaspace_tokenizer.bos_token_id] + full_ids[-15:]
    assert report.prompt_truncated == 1


def test_a_group_is_dropped_only_when_all_its_answers_become_identical(bytebpe_tokenizer):
    long = " " + " ".join(f"a{i}" for i in range(100))
    groups = [
        Example("Q:", (long + " x", long + " y", long + " z"), origin="all the same once cut"),
        Example("Q:", (long + " x", long + " y", " short"), origin="one differs"),
    ]
    tokenized, report = tokenize_examples(groups, bytebpe_tokenizer, max_length=32)
    assert [example.origin for example in tokenized] == ["one differs"]
    assert (report.dropped_too_long, report.answer_truncated) == (1, 1)


# --- long texts are cut before tokenising ----------------------------------------------------------


class CountingTokenizer:
    """The real tokenizer, recording how many characters each call is asked to tokenise."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.lengths: list[int] = []

    def __call__(self, text, **options):
        self.lengths.append(len(text))
        return self._tokenizer(text, **options)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def words(count: int, start: int = 0) -> str:
    return " ".join(f"word{i % 997} x{i}" for i in range(start, start + count))


@pytest.mark.parametrize("name", TOKENIZERS)
def test_a_cut_prompt_keeps_the_same_tokens_as_the_whole_one(name, request):
    tokenizer = request.getfixturevalue(f"{name}_tokenizer")
    prompt = "\n\nHuman: " + words(3000) + "\n\nAssistant:"  # ~33k characters, well past 32 * 16
    chosen, rejected = " " + words(5), " no"
    (tokenized,), report = tokenize_pairs([Example.pair(prompt, chosen, rejected)], tokenizer, max_length=64, max_prompt_length=32)
    full_prompt, full_chosen = tokenize_answer_boundary(tokenizer, prompt, chosen)
    keep = 1 if adds_bos(tokenizer) else 0
    assert tokenized.prompt_ids == full_prompt[:keep] + full_prompt[len(full_prompt) - (32 - keep) :]
    assert tokenized.chosen_ids == full_chosen[: 64 - 32]
    assert report.prompt_truncated == 1
    # The boundary contract holds across the cut: the kept ids spell the end of prompt + answer.
    spelled = decode(tokenizer, without_bos(tokenizer, tokenized.prompt_ids) + tokenized.chosen_ids)
    assert (prompt + chosen + tokenizer.eos_token).endswith(spelled) and len(spelled) > 100


def test_a_one_megabyte_prompt_is_tokenised_only_near_its_end(bytebpe_tokenizer):
    prompt = "\n\nHuman: " + words(90_000) + "\n\nAssistant:"
    assert len(prompt) > 1_000_000
    counting = CountingTokenizer(bytebpe_tokenizer)
    (tokenized,), report = tokenize_pairs([Example.pair(prompt, " yes", " no")], counting, max_length=128, max_prompt_length=64)
    # The cut prompt, then the cut prompt + each answer: 64 * 16 characters (plus an answer) at most, not 1 MB.
    assert max(counting.lengths) <= 64 * 16 + len(" yes")
    assert sum(counting.lengths) < 4 * 64 * 16
    assert len(tokenized.prompt_ids) == 64 and report.prompt_truncated == 1
    tail_prompt, _ = tokenize_answer_boundary(bytebpe_tokenizer, prompt[-5000:], " yes")
    assert tokenized.prompt_ids == tail_prompt[-64:]
    assert decode(bytebpe_tokenizer, tokenized.prompt_ids + tokenized.chosen_ids).endswith("\n\nAssistant: yes" + bytebpe_tokenizer.eos_token)


def test_a_one_megabyte_answer_is_tokenised_only_near_its_start(metaspace_tokenizer):
    answer = " " + words(90_000)
    counting = CountingTokenizer(metaspace_tokenizer)
    (tokenized,), report = tokenize_pairs([Example.pair("Q:", answer, " no")], counting, max_length=128)
    assert max(counting.lengths) <= 128 * 16 + len("</s>Q:")
    small_prompt, small_answer = tokenize_answer_boundary(metaspace_tokenizer, "Q:", answer[:5000])
    assert tokenized.chosen_ids == small_answer[: 128 - len(small_prompt)]
    assert metaspace_tokenizer.eos_token_id not in tokenized.chosen_ids and report.answer_truncated == 1


def test_the_cut_grows_until_the_text_gives_enough_tokens():
    """40 characters per token defeats the 16-character guess: the cut is widened, and the kept tokens stay exact."""
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZERS_DIR / "metaspace")
    long_token = "<" + "L" * 38 + ">"
    tokenizer.add_tokens([long_token])
    prompt = "Q:" + long_token * 2000 + "\nA:"
    counting = CountingTokenizer(tokenizer)
    (tokenized,), _ = tokenize_pairs([Example.pair(prompt, " a", " b")], counting, max_length=64, max_prompt_length=32)
    assert {32 * 16, 32 * 16 * 4} <= set(counting.lengths) and max(counting.lengths) < 32 * 16 * 4 + 10
    full_prompt, _ = tokenize_answer_boundary(tokenizer, prompt, " a")
    assert tokenized.prompt_ids == full_prompt[:1] + full_prompt[-31:]
    assert tokenized.prompt_ids.count(tokenizer.convert_tokens_to_ids(long_token)) == 31 - 3  # then "\nA:"


def test_a_cut_prompt_keeps_the_bos_its_chat_template_wrote(metaspace_tokenizer):
    prompt = "<s>[INST] " + words(2000) + " [/INST]"
    (tokenized,), _ = tokenize_pairs([Example.pair(prompt, " a", " b")], metaspace_tokenizer, max_length=64, max_prompt_length=32)
    full_prompt, _ = tokenize_answer_boundary(metaspace_tokenizer, prompt, " a")
    bos = metaspace_tokenizer.bos_token_id
    assert full_prompt.count(bos) == 1 and tokenized.prompt_ids.count(bos) == 1
    assert tokenized.prompt_ids == [bos] + full_prompt[-31:]


def test_the_pipeline_counts_or_stops_on_an_untokenizable_answer(tmp_path, nfc_tokenizer):
    records = [{"prompt": f"Q{i}: coffee?\nA:", "chosen": " yes", "rejected": " no"} for i in range(3)]
    records.append({"prompt": "Q: name a drink\nA: cafe", "chosen": "\u0301 au lait", "rejected": " tea"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    settings = DataSettings(train_file=str(path), validation_file=None, validation_split=0, max_length=64)
    data = prepare_examples(settings, nfc_tokenizer, seed=0, paired=True)
    assert len(data.train) == 3
    assert "train: tokenized examples: kept 3, " in data.summary() and f"untokenizable_answer 1 (e.g. {path}:4)" in data.summary()
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:4: cannot tokenize the answer"):
        prepare_examples(settings.model_copy(update={"skip_invalid": False}), nfc_tokenizer, seed=0, paired=True)
