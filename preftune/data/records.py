"""The records that flow from a data file to the trainer, and the report of what loading kept.

One record shape for every method: a prompt with K answers.

    K = 2, no labels    a preference pair: answer 0 chosen, answer 1 rejected (DPO, CPO, ...)
    K = 1, labels       an unpaired example: the completion and whether it is desirable (KTO)
    K >= 1, scores      a group of answers to one prompt, optionally scored (GRPO, probes)
    K = 0               a prompt alone, for methods that generate their own answers (online)

`Example` is the text, `TokenizedExample` the token ids (`preftune.data.tokenize`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SHOWN_PER_REASON = 3
PROVENANCES = ("human", "synthetic")


@dataclass(frozen=True)
class Example:
    """One prompt with K answers, as text.

    `prompt` is ready to tokenize (for chat data the chat template is already applied, ending
    with the assistant generation prompt); each answer is the answer text only, exactly as it
    follows the prompt (leading spaces kept, no EOS appended). `labels[k]` says whether answer k
    is desirable, `scores[k]` is its score; either is None or has one entry per answer.
    `provenance` is "human", "synthetic" or unknown (None); `origin` is where the record came
    from, "path:line" (JSONL and JSON arrays) or "path:record N" (Parquet), for messages.
    `columns` are a prompt-only record's other fields (e.g. a reference `answer`), which the online
    methods hand to their reward functions.
    """

    prompt: str
    answers: tuple[str, ...]
    labels: tuple[bool, ...] | None = None
    scores: tuple[float, ...] | None = None
    provenance: str | None = None
    origin: str = ""
    columns: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_per_answer(self.answers, self.labels, self.scores, self.provenance)

    @classmethod
    def pair(cls, prompt: str, chosen: str, rejected: str, origin: str = "", **extra) -> Example:
        return cls(prompt, (chosen, rejected), origin=origin, **extra)

    @classmethod
    def unpaired(cls, prompt: str, completion: str, label: bool, origin: str = "", **extra) -> Example:
        return cls(prompt, (completion,), labels=(label,), origin=origin, **extra)

    @property
    def chosen(self) -> str:
        return _answer(self.answers, 0, "chosen")

    @property
    def rejected(self) -> str:
        return _answer(self.answers, 1, "rejected")

    @property
    def completion(self) -> str:
        return _answer(self.answers, 0, "completion")

    @property
    def label(self) -> bool:
        return _label(self.labels)

    @property
    def source(self) -> str:
        return self.origin


@dataclass(frozen=True)
class TokenizedExample:
    """An example as token ids: the model sees `prompt_ids + answer_ids[k]` for each answer k.

    `prompt_ids` starts with the tokenizer's leading special tokens (BOS) if it adds them. Each
    answer ends with exactly one EOS, unless it was truncated to fit `max_length` (then it simply
    stops: it did not end). The pair/unpaired names are views: `chosen_ids` = answer 0,
    `rejected_ids` = answer 1, `completion_ids` = answer 0, `label` = labels[0].
    """

    prompt_ids: list[int]
    answer_ids: tuple[list[int], ...]
    labels: tuple[bool, ...] | None = None
    scores: tuple[float, ...] | None = None
    provenance: str | None = None
    origin: str = ""
    columns: dict[str, Any] = field(default_factory=dict)  # the record's other fields (see `Example`)

    def __post_init__(self) -> None:
        _check_per_answer(self.answer_ids, self.labels, self.scores, self.provenance)

    @property
    def chosen_ids(self) -> list[int]:
        return _answer(self.answer_ids, 0, "chosen")

    @property
    def rejected_ids(self) -> list[int]:
        return _answer(self.answer_ids, 1, "rejected")

    @property
    def completion_ids(self) -> list[int]:
        return _answer(self.answer_ids, 0, "completion")

    @property
    def label(self) -> bool:
        return _label(self.labels)

    @property
    def source(self) -> str:
        return self.origin


def _check_per_answer(answers: tuple, labels: tuple | None, scores: tuple | None, provenance: str | None) -> None:
    if not isinstance(answers, tuple):
        raise TypeError(f"answers must be a tuple, got {type(answers).__name__}")
    for name, values in (("labels", labels), ("scores", scores)):
        if values is not None and len(values) != len(answers):
            raise ValueError(f"{name} needs one entry per answer: {len(values)} for {len(answers)} answers")
    if provenance is not None and provenance not in PROVENANCES:
        raise ValueError(f"provenance must be one of {PROVENANCES} or None, got {provenance!r}")


def _answer(answers: tuple, index: int, name: str):
    if index >= len(answers):
        raise AttributeError(f"an example with {len(answers)} answer(s) has no {name} answer (answer {index})")
    return answers[index]


def _label(labels: tuple[bool, ...] | None) -> bool:
    if not labels:
        raise AttributeError("this example has no labels")
    return labels[0]


@dataclass
class LoadReport:
    """What happened while loading one file: records read, examples kept, skips per reason and where."""

    path: str
    format: str
    read: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    skipped_at: dict[str, list[str]] = field(default_factory=dict)  # reason -> every skipped record's origin

    def add_skip(self, reason: str, origin: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        self.skipped_at.setdefault(reason, []).append(origin)

    def summary(self) -> str:
        """One line, e.g. `train.jsonl (hh_rlhf): read 1796, kept 1790, skipped 6: empty_answer 4 (e.g. line 70, ...); ...`."""
        line = f"{self.path} ({self.format}): read {self.read}, kept {self.kept}"
        if not self.skipped:
            return line
        return f"{line}, skipped {sum(self.skipped.values())}: {skip_reasons(self.skipped, self.skipped_at, self.path)}"


def skip_reasons(skipped: dict[str, int], skipped_at: dict[str, list[str]], path: str | None = None) -> str:
    """`reason count (e.g. line 70, line 402, ...); ...`, most frequent first; `path` is dropped from the origins."""
    parts = []
    for reason, count in sorted(skipped.items(), key=lambda item: (-item[1], item[0])):
        shown = [_place(origin, path) for origin in skipped_at[reason][:SHOWN_PER_REASON]]
        more = ", ..." if count > SHOWN_PER_REASON else ""
        parts.append(f"{reason} {count} (e.g. {', '.join(shown)}{more})")
    return "; ".join(parts)


def _place(origin: str, path: str | None) -> str:
    """An origin without the repeated path: "line 70" or "record 3"."""
    if path is None or not origin.startswith(f"{path}:"):
        return origin
    place = origin.removeprefix(f"{path}:")
    return f"line {place}" if place.isdigit() else place
