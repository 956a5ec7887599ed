"""Tokenisation: the exact prompt/answer boundary, BOS/EOS rules, and the over-long policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from preftune.data import PreferencePair, load_pairs, tokenize_answer_boundary, tokenize_pairs
from preftune.errors import ConfigError, PreftuneError

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
    (tokenized,), _ = tokenize_pairs([PreferencePair(prompt, " a", " b", "x")], metaspace_tokenizer, max_length=32)
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
        PreferencePair(short_prompt, " yes", " no", "fits"),
        PreferencePair(long_prompt, " yes", " no", "long_prompt"),
        PreferencePair(short_prompt, long_answer, " no", "long_chosen"),
        PreferencePair(short_prompt, long_answer + " end", long_answer + " other", "same_start"),
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
    pair = PreferencePair("Q: " + " ".join(f"w{i}" for i in range(100)), " yes", " no", "long")
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
        tokenize_pairs([PreferencePair("Q:", " a", " b", "x")], tokenizer, max_length=32)


def test_empty_prompt_without_bos_is_a_clear_error(bytebpe_tokenizer, metaspace_tokenizer):
    pair = PreferencePair("", "a", "b", "data.jsonl:7")
    with pytest.raises(PreftuneError, match=r"^data\.jsonl:7: the prompt is empty and the tokenizer adds no BOS"):
        tokenize_pairs([pair], bytebpe_tokenizer, max_length=32)
    (tokenized,), _ = tokenize_pairs([pair], metaspace_tokenizer, max_length=32)
    assert tokenized.prompt_ids == [metaspace_tokenizer.bos_token_id]
