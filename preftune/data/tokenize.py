"""Tokenise examples (a prompt with K answers) with an exact prompt/answer boundary, and fit them into `max_length`.

One path for every kind of example: pairs (K = 2), unpaired KTO examples (K = 1), groups of K
answers, and prompts alone (K = 0: only the prompt is tokenised and truncated).

Boundary contract (`tokenize_answer_boundary`): the prompt is tokenised on its own (with the
tokenizer's own leading special tokens, e.g. one BOS), so all answers share the same prompt
ids. The answer ids are then chosen so that `prompt_ids + answer_ids` spells exactly
prompt + answer + EOS: no token straddles the boundary and none is lost or added there. In order:

1. in context: tokenise prompt + answer together; if that starts with the prompt's ids, the rest
   are the answer's ids (the tokens the model would naturally see after this prompt);
2. on its own: tokenise the answer alone (the prompt and answer merge across the boundary, e.g. a
   prompt ending in a space); accepted only if prompt ids + these ids decode to the joint text;
3. after a special token: tokenizers in the sentencepiece style ("Metaspace") put a "▁"/space
   before the start of a text but not after a special token, so tokenise EOS + answer and drop
   the EOS; accepted under the same check.

Then exactly one EOS (`tokenizer.eos_token_id`) is appended; an answer that already ends with the
EOS text keeps only that one. A BOS is never put before an answer. An answer none of the three
readings fits is skipped as `untokenizable_answer` (or, with `skip_invalid=False`, a `DataError`
naming the record's file and line); so is an empty prompt when the tokenizer adds no BOS
(`empty_prompt`: nothing would predict the first answer token).

Over-long policy (`tokenize_examples`), a sequence being prompt + one answer:

1. a prompt longer than `max_prompt_length` (default `max_length // 2`) keeps its *end* (the most
   recent turns), after its leading special tokens (the BOS, whether the tokenizer adds it or the
   chat template wrote it): `prompt_truncated`;
2. answers longer than the remaining budget `max_length - len(prompt)` keep their first tokens
   and get *no* EOS, because they did not end there: `answer_truncated` (examples, not answers);
3. an example with two or more answers that are all identical after that cut (they only differed
   later) carries no contrast and is dropped: `dropped_too_long`.

Long texts are cut *before* tokenising. A prompt longer than `max_prompt_length *
CHARS_PER_TOKEN_BOUND` characters is tokenised from its last that-many characters only (an
answer longer than `max_length * CHARS_PER_TOKEN_BOUND`, from its first), so a 1 MB prompt costs
a few thousand characters of tokenising, not 1 MB. The bound is never trusted: the cut text must
still give `CUT_MARGIN_TOKENS` more tokens than can be kept, else the bound is quadrupled (up to
the whole text). Tokenizers split text into pre-tokens (words, whitespace runs, "▁"-words) and
tokenise each apart, so a cut changes only the tokens next to it; the margin keeps those out of
what is kept, which then equals the end (start) of the uncut tokenisation. Whatever the
tokenizer, the boundary contract holds exactly for the text that was tokenised, because the
answer boundary is worked out against the cut prompt text itself.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from preftune.data.fields import SkipRecord
from preftune.data.records import Example, TokenizedExample, skip_reasons
from preftune.errors import ConfigError, DataError, PreftuneError

CHARS_PER_TOKEN_BOUND = 16
CUT_MARGIN_TOKENS = 16
BOUND_GROWTH = 4


@dataclass
class TokenizationReport:
    """Counts from `tokenize_examples`, in examples: the truncation counts are among the kept ones."""

    kept: int = 0
    prompt_truncated: int = 0
    answer_truncated: int = 0
    dropped_too_long: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    skipped_at: dict[str, list[str]] = field(default_factory=dict)  # reason -> origins

    def add_skip(self, reason: str, origin: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.skipped_at.setdefault(reason, []).append(origin)

    def summary(self) -> str:
        line = (
            f"tokenized examples: kept {self.kept}, prompt truncated (kept its end) {self.prompt_truncated}, "
            f"answer truncated (no EOS) {self.answer_truncated}, dropped (answers identical once truncated) {self.dropped_too_long}"
        )
        if self.skipped:
            line += f", skipped {sum(self.skipped.values())}: {skip_reasons(self.skipped, self.skipped_at)}"
        return line


def tokenize_examples(
    examples: Sequence[Example],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
    skip_invalid: bool = True,
) -> tuple[list[TokenizedExample], TokenizationReport]:
    """Tokenise examples (see the module docstring for the boundary contract and over-long policy).

    Every kept example has a non-empty prompt, `len(prompt_ids) <= max_prompt_length`, non-empty
    answers and `len(prompt_ids) + len(answer) <= max_length` for each answer; labels, scores,
    provenance and origin are carried over.
    """
    max_prompt_length = prompt_budget(max_length, max_prompt_length)
    boundary = BoundaryTokenizer(tokenizer)
    report = TokenizationReport()
    tokenized: list[TokenizedExample] = []
    for example in examples:
        try:
            prompt = boundary.prompt_tokens(example.prompt, keep=max_prompt_length)
            answer_ids = [boundary.answer_ids(prompt, answer, keep=max_length) for answer in example.answers]
        except SkipRecord as skip:
            if not skip_invalid:
                raise origin_error(example.origin, f"{skip.message} [{skip.reason}]") from None
            report.add_skip(skip.reason, example.origin)
            continue

        prompt_ids = prompt.ids
        prompt_truncated = len(prompt_ids) > max_prompt_length
        if prompt_truncated:
            prompt_ids = prompt.keep_end(max_prompt_length)
        budget = max_length - len(prompt_ids)
        answer_truncated = any(len(ids) > budget for ids in answer_ids)
        if answer_truncated:
            answer_ids = [ids[:budget] for ids in answer_ids]
            if len(answer_ids) >= 2 and all(ids == answer_ids[0] for ids in answer_ids[1:]):
                report.dropped_too_long += 1
                continue
        report.prompt_truncated += prompt_truncated
        report.answer_truncated += answer_truncated
        tokenized.append(
            TokenizedExample(
                prompt_ids, tuple(answer_ids), example.labels, example.scores, example.provenance, example.origin, example.columns
            )
        )
    report.kept = len(tokenized)
    return tokenized, report


def tokenize_pairs(
    pairs: Sequence[Example], tokenizer, *, max_length: int, max_prompt_length: int | None = None, skip_invalid: bool = True
) -> tuple[list[TokenizedExample], TokenizationReport]:
    """`tokenize_examples` for pairs (kept for its callers; any K works the same)."""
    return tokenize_examples(pairs, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length, skip_invalid=skip_invalid)


def prompt_budget(max_length: int, max_prompt_length: int | None) -> int:
    """The prompt's token budget: `max_prompt_length`, by default half of `max_length`, leaving room for answers."""
    max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
    if not 1 <= max_prompt_length < max_length:
        raise ConfigError(
            f"need 1 <= max_prompt_length < max_length to leave room for answers, got {max_prompt_length} and {max_length}"
        )
    return max_prompt_length


def tokenize_answer_boundary(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """(prompt ids with the tokenizer's leading specials, answer ids ending with one EOS); no truncation."""
    boundary = BoundaryTokenizer(tokenizer)
    try:
        prompt_tokens = boundary.prompt_tokens(prompt)
        return prompt_tokens.ids, boundary.answer_ids(prompt_tokens, answer)
    except SkipRecord as skip:
        raise PreftuneError(skip.message) from None


def origin_error(origin: str, message: str) -> DataError:
    """A `DataError` for an example, with path and line split out of a `path:line` origin."""
    match = re.fullmatch(r"(.*):(\d+)", origin)
    if match:
        return DataError(message, path=match[1], line=int(match[2]))
    return DataError(message, path=origin or None)


@dataclass(frozen=True)
class PromptTokens:
    """A prompt as the model sees it: `ids` = `head_ids` (leading specials the text does not spell) + `text_ids`.

    `text` is the text `text_ids` spell: the whole prompt, or its end when it was cut before
    tokenising. `keep` leading ids of `ids` (the BOS) survive truncation.
    """

    text: str
    text_ids: list[int]
    ids: list[int]
    keep: int

    def keep_end(self, length: int) -> list[int]:
        """The leading specials, then as many of the prompt's last tokens as fit in `length`."""
        tail = max(length - self.keep, 0)
        return self.ids[: self.keep] + self.ids[len(self.ids) - tail :]


class BoundaryTokenizer:
    """The per-tokenizer facts the boundary needs (EOS, leading special ids), worked out once."""

    def __init__(self, tokenizer):
        if tokenizer.eos_token_id is None:
            raise PreftuneError(
                "the tokenizer has no EOS token, so answers cannot be terminated: set `tokenizer.eos_token` "
                "to the token the model ends its turns with"
            )
        self.tokenizer = tokenizer
        self.eos_id: int = tokenizer.eos_token_id
        self.eos_text: str = tokenizer.eos_token
        self.leading_special_ids = self._leading_special_ids()
        # Leading special tokens a prompt text may spell itself (a chat template writing the BOS).
        candidates = [self.leading_special_ids]
        if tokenizer.bos_token_id is not None:
            candidates.append([tokenizer.bos_token_id])
        self.written_heads = [(self.decode(ids), ids) for ids in candidates if ids]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _leading_special_ids(self) -> list[int]:
        """The ids the tokenizer's own `add_special_tokens=True` puts before a text (e.g. [BOS]); trailing ones are ignored."""
        probe = "a"
        plain = self.encode(probe)
        with_specials = self.tokenizer(probe, add_special_tokens=True)["input_ids"]
        for start in range(len(with_specials) - len(plain) + 1):
            if with_specials[start : start + len(plain)] == plain:
                return with_specials[:start]
        raise PreftuneError("cannot tell which special tokens the tokenizer adds around a text")

    def _written_head(self, prompt: str) -> list[int]:
        """The leading special ids the prompt text spells itself, e.g. [BOS] from a chat template; else []."""
        for text, ids in self.written_heads:
            if prompt.startswith(text) and self.encode(text) == ids:
                return ids
        return []

    def prompt_tokens(self, prompt: str, keep: int | None = None) -> PromptTokens:
        """The prompt's ids, one set of leading specials even if the text starts with them.

        With `keep` (the prompt budget), a long prompt is tokenised from its end only (module
        docstring): its `text` is then that end, and `ids` start with the leading specials.
        """
        written = self._written_head(prompt)
        bound = None if keep is None else keep * CHARS_PER_TOKEN_BOUND
        while bound is not None and len(prompt) > bound:
            tail = prompt[-bound:]
            tail_ids = self.encode(tail)
            if len(tail_ids) >= keep + CUT_MARGIN_TOKENS:
                head = written or self.leading_special_ids
                return PromptTokens(tail, tail_ids, head + tail_ids, keep=len(head))
            bound *= BOUND_GROWTH
        body = self.encode(prompt)
        if written and body[: len(written)] == written:
            tokens = PromptTokens(prompt, body, body, keep=len(written))
        else:
            specials = self.leading_special_ids
            tokens = PromptTokens(prompt, body, specials + body, keep=len(specials))
        if not tokens.ids:
            raise SkipRecord("empty_prompt", "the prompt is empty and the tokenizer adds no BOS, so nothing predicts the first answer token")
        return tokens

    def answer_ids(self, prompt: PromptTokens, answer: str, keep: int | None = None) -> list[int]:
        """The answer's ids after `prompt`, ending with one EOS; with `keep` (max_length), a long answer is
        tokenised from its start only, and then has more than `keep` ids (it is cut to fit anyway)."""
        bound = None if keep is None else keep * CHARS_PER_TOKEN_BOUND
        while bound is not None and len(answer) > bound:
            body = self._answer_body(prompt, answer[:bound])
            if len(body) >= keep + CUT_MARGIN_TOKENS:
                return body
            bound *= BOUND_GROWTH
        text = answer.removesuffix(self.eos_text)  # an answer that already ends with EOS keeps just that one
        body = self._answer_body(prompt, text) if text else []
        return body + [self.eos_id]

    def _answer_body(self, prompt: PromptTokens, answer: str) -> list[int]:
        joint = self.encode(prompt.text + answer)
        if joint[: len(prompt.text_ids)] == prompt.text_ids:
            return joint[len(prompt.text_ids) :]
        # Compare with the tokenizer's own reading of the joint text, not the raw text, so a
        # lossy tokenizer (normalisation, unknown characters) is judged only on the boundary.
        expected = self.decode(joint)
        alone = self.encode(answer)
        if self.decode(prompt.text_ids + alone) == expected:
            return alone
        after_special = self.encode(self.eos_text + answer)
        if after_special[:1] == [self.eos_id] and self.decode(prompt.text_ids + after_special[1:]) == expected:
            return after_special[1:]
        raise SkipRecord(
            "untokenizable_answer",
            f"cannot tokenize the answer {answer[:40]!r}... apart from its prompt without changing the text at the "
            "boundary (the tokenizer reads prompt + answer differently from the two apart: a token or a normalised "
            "character spans it); try ending the prompt without trailing whitespace",
        )
