"""Tokenise preference pairs with an exact prompt/answer boundary, and fit them into `max_length`.

Boundary contract (`tokenize_answer_boundary`): the prompt is tokenised on its own (with the
tokenizer's own leading special tokens, e.g. one BOS), so chosen and rejected share the same
prompt ids. The answer ids are then chosen so that `prompt_ids + answer_ids` spells exactly
prompt + answer + EOS: no token straddles the boundary and none is lost or added there. In order:

1. in context: tokenise prompt + answer together; if that starts with the prompt's ids, the rest
   are the answer's ids (the tokens the model would naturally see after this prompt);
2. on its own: tokenise the answer alone (the prompt and answer merge across the boundary, e.g. a
   prompt ending in a space); accepted only if prompt ids + these ids decode to the joint text;
3. after a special token: tokenizers in the sentencepiece style ("Metaspace") put a "▁"/space
   before the start of a text but not after a special token, so tokenise EOS + answer and drop
   the EOS; accepted under the same check.

Then exactly one EOS (`tokenizer.eos_token_id`) is appended; an answer that already ends with the
EOS text keeps only that one. A BOS is never put before an answer.

Over-long policy (`tokenize_pairs`), a sequence being prompt + one answer:

1. a prompt longer than `max_prompt_length` (default `max_length // 2`) keeps its *end* (the most
   recent turns), after its leading BOS if it has one: `prompt_truncated`;
2. if prompt + the longer answer exceed `max_length`, answers longer than the remaining budget
   keep their first `max_length - len(prompt)` tokens and get *no* EOS, because they did not end
   there: `answer_truncated` (pairs, not answers);
3. a pair whose answers are identical after that cut (they only differed later) carries no
   preference and is dropped: `dropped_too_long`.
"""

from __future__ import annotations

from dataclasses import dataclass

from preftune.data.records import PreferencePair, TokenizedPair
from preftune.errors import ConfigError, PreftuneError


@dataclass
class TokenizationReport:
    """Counts from `tokenize_pairs`, in pairs: the truncation counts are among the kept pairs."""

    kept: int = 0
    prompt_truncated: int = 0
    answer_truncated: int = 0
    dropped_too_long: int = 0

    def summary(self) -> str:
        return (
            f"tokenized pairs: kept {self.kept}, prompt truncated (kept its end) {self.prompt_truncated}, "
            f"answer truncated (no EOS) {self.answer_truncated}, dropped (answers identical once truncated) {self.dropped_too_long}"
        )


def tokenize_pairs(
    pairs: list[PreferencePair],
    tokenizer,
    *,
    max_length: int,
    max_prompt_length: int | None = None,
) -> tuple[list[TokenizedPair], TokenizationReport]:
    """Tokenise pairs (see the module docstring for the boundary contract and over-long policy).

    Every kept pair has `len(prompt_ids) + len(answer_ids) <= max_length` for both answers and a
    non-empty prompt and answers.
    """
    max_prompt_length = prompt_budget(max_length, max_prompt_length)
    boundary = BoundaryTokenizer(tokenizer)
    report = TokenizationReport()
    tokenized: list[TokenizedPair] = []
    for pair in pairs:
        prompt_ids, (chosen_ids, rejected_ids) = boundary.example_ids(pair.source, pair.prompt, [pair.chosen, pair.rejected])

        prompt_truncated = len(prompt_ids) > max_prompt_length
        if prompt_truncated:
            prompt_ids = boundary.keep_prompt_end(prompt_ids, max_prompt_length)
        budget = max_length - len(prompt_ids)
        answer_truncated = max(len(chosen_ids), len(rejected_ids)) > budget
        if answer_truncated:
            chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
            if chosen_ids == rejected_ids:
                report.dropped_too_long += 1
                continue
        report.prompt_truncated += prompt_truncated
        report.answer_truncated += answer_truncated
        tokenized.append(TokenizedPair(prompt_ids, chosen_ids, rejected_ids, pair.source))
    report.kept = len(tokenized)
    return tokenized, report


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
    prompt_ids, prompt_body = boundary.prompt_ids(prompt)
    return prompt_ids, boundary.answer_ids(prompt, prompt_body, answer)


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

    def prompt_ids(self, prompt: str) -> tuple[list[int], list[int]]:
        """(ids the model sees, the prompt text's own ids): one set of leading specials, even if the text starts with them."""
        body = self.encode(prompt)
        specials = self.leading_special_ids
        already_there = body[: len(specials)] == specials  # e.g. a chat template that writes the BOS itself
        return (body if already_there else specials + body), body

    def example_ids(self, source: str, prompt: str, answers: list[str]) -> tuple[list[int], list[list[int]]]:
        """(prompt ids, each answer's ids) of one example; errors name the example's file and line."""
        try:
            prompt_ids, prompt_body = self.prompt_ids(prompt)
            answer_ids = [self.answer_ids(prompt, prompt_body, answer) for answer in answers]
        except PreftuneError as error:
            raise PreftuneError(f"{source}: {error}") from None
        if not prompt_ids:
            raise PreftuneError(
                f"{source}: the prompt is empty and the tokenizer adds no BOS, so nothing predicts the first answer token"
            )
        return prompt_ids, answer_ids

    def keep_prompt_end(self, prompt_ids: list[int], length: int) -> list[int]:
        """The leading specials (BOS), then as many of the prompt's last tokens as fit in `length`."""
        specials = self.leading_special_ids
        head = len(specials) if prompt_ids[: len(specials)] == specials else 0
        tail = max(length - head, 0)
        return prompt_ids[:head] + prompt_ids[len(prompt_ids) - tail :]

    def answer_ids(self, prompt: str, prompt_body: list[int], answer: str) -> list[int]:
        text = answer.removesuffix(self.eos_text)  # an answer that already ends with EOS keeps just that one
        body = self._answer_body(prompt, prompt_body, text) if text else []
        return body + [self.eos_id]

    def _answer_body(self, prompt: str, prompt_body: list[int], answer: str) -> list[int]:
        joint = self.encode(prompt + answer)
        if joint[: len(prompt_body)] == prompt_body:
            return joint[len(prompt_body) :]
        # Compare with the tokenizer's own reading of the joint text, not the raw text, so a
        # lossy tokenizer (normalisation, unknown characters) is judged only on the boundary.
        expected = self.decode(joint)
        alone = self.encode(answer)
        if self.decode(prompt_body + alone) == expected:
            return alone
        after_special = self.encode(self.eos_text + answer)
        if after_special[:1] == [self.eos_id] and self.decode(prompt_body + after_special[1:]) == expected:
            return after_special[1:]
        raise PreftuneError(
            f"cannot tokenize the answer {answer[:40]!r}... apart from its prompt without changing the text at the "
            "boundary; try ending the prompt without trailing whitespace"
        )
