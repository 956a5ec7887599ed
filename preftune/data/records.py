"""The records that flow from a data file to the trainer, and the report of what loading kept."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_EXAMPLES_PER_REASON = 3


@dataclass(frozen=True)
class PreferencePair:
    """One prompt with a preferred and a dispreferred answer, as text.

    `prompt` is ready to tokenize (for chat data the chat template is already applied, ending
    with the assistant generation prompt); `chosen` and `rejected` are the answer texts only,
    exactly as they follow the prompt (leading spaces kept, no EOS appended).
    """

    prompt: str
    chosen: str
    rejected: str
    source: str  # "path:line" (JSONL) or "path:record N" (JSON, Parquet), for messages and reports


@dataclass(frozen=True)
class TokenizedPair:
    """A pair as token ids: the model sees `prompt_ids + chosen_ids` and `prompt_ids + rejected_ids`.

    `prompt_ids` starts with the tokenizer's BOS if it adds one. Each answer ends with exactly one
    EOS, unless it was truncated to fit `max_length` (then it simply stops: it did not end).
    """

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    source: str


@dataclass
class LoadReport:
    """What happened while loading one file: records read, pairs kept, skips per reason."""

    path: str
    format: str
    read: int = 0
    kept: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    examples: dict[str, list[str]] = field(default_factory=dict)  # reason -> up to 3 sources

    def add_skip(self, reason: str, source: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES_PER_REASON:
            examples.append(source)

    def summary(self) -> str:
        """One line, e.g. `train.jsonl (hh_rlhf): read 1796, kept 1790, skipped 6: empty_answer 4 (e.g. line 70, ...); ...`."""
        line = f"{self.path} ({self.format}): read {self.read}, kept {self.kept}"
        if not self.skipped:
            return line
        reasons = "; ".join(
            f"{reason} {count} (e.g. {self._where(self.examples[reason])}{', ...' if count > len(self.examples[reason]) else ''})"
            for reason, count in sorted(self.skipped.items(), key=lambda item: (-item[1], item[0]))
        )
        return f"{line}, skipped {sum(self.skipped.values())}: {reasons}"

    def _where(self, sources: list[str]) -> str:
        """Sources without the repeated path: "line 70" or "record 3"."""
        places = [source.removeprefix(f"{self.path}:") for source in sources]
        return ", ".join(f"line {place}" if place.isdigit() else place for place in places)
