"""Data audits: what a preference file teaches before a model ever sees it, and length balancing.

`audit_pairs` (pairs: `Example`s with two answers, `.chosen/.rejected`) and `audit_unpaired` (KTO
examples: one labelled answer, `.completion/.label`) return a `DataAudit`; `audit_records` picks one:

- counts; **exact duplicates** (records repeating an earlier record's texts exactly) and **near
  duplicates** (repeating it after normalisation: Unicode NFKC, case folded, every punctuation
  character removed, runs of whitespace collapsed to one space; the key is the normalised texts
  themselves, so "near" means equal up to case, spacing and punctuation, nothing fuzzier). Near
  duplicates include the exact ones. Repeated prompts are counted the same exact way.
- identical pairs (chosen == rejected, exact and after normalisation), empty answers (only whitespace);
- length distributions (min / median / p90 / max / mean; linear-interpolated percentiles) of
  prompt and answers, in tokens when a tokenizer is given (`add_special_tokens=False`), else characters;
- a format heuristic (chat-template markers such as `<|im_start|>`, hh-rlhf `Human:/Assistant:`
  transcripts, plain text) and a script heuristic: each record's letters are counted by the first
  word of their Unicode name (LATIN, CYRILLIC, CJK, ...) and the record goes to its majority
  script; also the share of records that are pure ASCII. Heuristics, not language identification.
- **length bias** (the verbosity trap), see `LengthBias`;
- provenance: how many records say they are human, synthetic, or do not say (`Example.provenance`).

`length_balance` subsamples pairs so that a chosen answer is longer exactly as often as it is
shorter, and says which pairs it removed.
"""

from __future__ import annotations

import math
import random
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from preftune.data.records import Example
from preftune.errors import DataError

# A length bias is reported when the chosen answer is longer in more than this share of the pairs
# whose answers differ in length, AND the 95% interval of that share excludes 0.5 (so a small file
# with 7 of 10 is not flagged on noise). Symmetrically, below 1 − this share is a "shorter wins" bias.
LENGTH_BIAS_SHARE = 0.6
Z_95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 200
# Below this many desirable or undesirable examples a bootstrap interval is not worth reporting (with one
# of each it is a single point), so unpaired data that small gets no interval and no length-bias verdict.
MIN_BOOTSTRAP_EXAMPLES = 10
MAX_EXAMPLES = 3

CHAT_TEMPLATE_MARKERS = (
    "<|im_start|>",  # ChatML (Qwen, SmolLM)
    "<|start_header_id|>",  # Llama 3
    "[INST]",  # Llama 2, Mistral
    "<start_of_turn>",  # Gemma
    "<|user|>",  # Zephyr, Phi
    "<|assistant|>",
)
TRANSCRIPT_PATTERN = re.compile(r"(^|\n)\s*Human:.*\n\s*Assistant:", re.DOTALL)

LengthFn = Callable[[str], int]


def length_function(tokenizer=None) -> tuple[LengthFn, str]:
    """(text → length, unit): tokens without special tokens when a tokenizer is given, else characters."""
    if tokenizer is None:
        return len, "characters"
    return (lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])), "tokens"


def normalize_text(text: str) -> str:
    """The near-duplicate key: NFKC, casefold, punctuation removed, whitespace runs → one space, stripped."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    without_punctuation = "".join(ch for ch in folded if not unicodedata.category(ch).startswith("P"))
    return " ".join(without_punctuation.split())


@dataclass
class LengthStats:
    """Distribution of lengths (in the audit's unit); percentiles interpolate linearly between ranks."""

    min: float
    median: float
    p90: float
    max: float
    mean: float

    @classmethod
    def of(cls, lengths: Sequence[int]) -> LengthStats:
        values = np.asarray(lengths, dtype=float)
        if values.size == 0:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0)
        return cls(
            float(values.min()), float(np.median(values)), float(np.percentile(values, 90)), float(values.max()), float(values.mean())
        )


@dataclass
class LengthBias:
    """Does the preferred answer tend to be the longer one?

    For pairs, d = len(chosen) − len(rejected) per pair:

    - `share_chosen_longer` = #(d > 0) / #(d ≠ 0): pairs of equal length are left out;
      `interval` is its 95% Wilson score interval.
    - `mean_difference` = mean(d) over all pairs.
    - `correlation`: each pair is two labelled points, (d, +1) for the chosen side and (−d, −1)
      for the rejected side; the Pearson (point-biserial) correlation of length difference and
      label over those 2n points reduces to mean(d) / sqrt(mean(d²)) (both means are 0 by
      symmetry). +1: the chosen answer is always the longer one by the same amount; 0: no relation.

    For unpaired examples "chosen" means desirable (label true): the share is over every
    (desirable, undesirable) couple of examples with different lengths (the common-language effect
    size), its interval a seeded bootstrap (200 resamples, 2.5–97.5th percentiles; none with fewer
    than 10 examples of either label);
    `mean_difference` = mean desirable length − mean undesirable length; `correlation` is the
    point-biserial correlation of completion length with the label (+1/−1).

    `direction` is "longer" when share > LENGTH_BIAS_SHARE and the interval lies above 0.5,
    "shorter" when share < 1 − LENGTH_BIAS_SHARE and the interval lies below 0.5, else None.
    """

    compared: int  # pairs (or desirable/undesirable couples) whose lengths differ
    chosen_longer: int
    chosen_shorter: int
    equal_length: int
    share_chosen_longer: float | None
    interval: tuple[float, float] | None
    mean_difference: float
    correlation: float | None
    direction: str | None  # "longer" | "shorter" | None


@dataclass
class DataAudit:
    """The audit of one set of records; `to_dict()` is JSON-able, `summary()` is for people."""

    kind: str  # "paired" | "unpaired"
    unit: str  # "tokens" | "characters"
    count: int
    exact_duplicates: int
    near_duplicates: int  # includes the exact duplicates
    repeated_prompts: int
    empty_answers: dict[str, int]  # "chosen"/"rejected" or "completion" -> records with an empty answer
    lengths: dict[str, LengthStats]  # "prompt", "chosen", "rejected" (paired) or "prompt", "completion"
    formats: dict[str, int]  # "chat_template" | "transcript" | "plain" -> records
    scripts: dict[str, int]  # majority script -> records ("none" when a record has no letters)
    ascii_only: int
    length_bias: LengthBias
    identical_pairs: int = 0  # paired: chosen == rejected exactly
    identical_after_normalization: int = 0  # paired: equal once normalised (includes the exact ones)
    labels: dict[str, int] = field(default_factory=dict)  # unpaired: "desirable"/"undesirable" -> count
    conflicting_labels: int = 0  # unpaired: prompt + completion seen with both labels
    duplicate_examples: list[str] = field(default_factory=list)  # up to 3 "origin repeats origin"
    provenance: dict[str, int] = field(default_factory=dict)  # "human" | "synthetic" | "unknown" -> records
    warnings: list[str] = field(default_factory=list)

    @property
    def duplicate_rate(self) -> float:
        """Near duplicates (exact included) per record."""
        return self.near_duplicates / self.count if self.count else 0.0

    def to_dict(self) -> dict:
        data = asdict(self)
        data["duplicate_rate"] = self.duplicate_rate
        if self.length_bias.interval is not None:
            data["length_bias"]["interval"] = list(self.length_bias.interval)
        return data

    def summary(self) -> str:
        bias = self.length_bias
        answers = ("chosen", "rejected") if self.kind == "paired" else ("completion",)
        lines = [f"{self.count} {self.kind} records (lengths in {self.unit})"]
        if self.labels:
            lines.append("labels: " + ", ".join(f"{name} {count}" for name, count in self.labels.items()))
        lines.append(
            f"duplicates: exact {self.exact_duplicates}, near (case/space/punctuation folded, exact included) "
            f"{self.near_duplicates} ({100 * self.duplicate_rate:.1f}%), repeated prompts {self.repeated_prompts}"
        )
        if self.duplicate_examples:
            lines.append("  e.g. " + "; ".join(self.duplicate_examples))
        if self.kind == "paired":
            lines.append(
                f"identical pairs (chosen == rejected): {self.identical_pairs} exact, "
                f"{self.identical_after_normalization} after normalisation"
            )
        else:
            lines.append(f"conflicting labels (same prompt and completion, both labels): {self.conflicting_labels}")
        lines.append("empty answers: " + ", ".join(f"{name} {self.empty_answers[name]}" for name in answers))
        for name, stats in self.lengths.items():
            lines.append(
                f"{name + ' length':<18} min {stats.min:g}, median {stats.median:g}, p90 {stats.p90:g}, "
                f"max {stats.max:g}, mean {stats.mean:.1f}"
            )
        lines.append("format (heuristic): " + _shares(self.formats, self.count))
        if self.provenance:
            lines.append("provenance: " + _shares(self.provenance, self.count))
        lines.append(
            f"script (heuristic, majority of letters): {_shares(self.scripts, self.count)}; "
            f"pure ASCII {self.ascii_only} ({_percent(self.ascii_only, self.count)})"
        )
        side = "chosen" if self.kind == "paired" else "desirable"
        if bias.share_chosen_longer is None:
            lines.append(f"length bias: no {side} answer differs in length from its counterpart")
        else:
            interval = "too few examples for an interval" if bias.interval is None else (
                f"95% interval {100 * bias.interval[0]:.1f}–{100 * bias.interval[1]:.1f}%"
            )
            correlation = "n/a" if bias.correlation is None else f"{bias.correlation:+.3f}"
            lines.append(
                f"length bias: {side} longer in {100 * bias.share_chosen_longer:.1f}% of {bias.compared} "
                f"{'pairs' if self.kind == 'paired' else 'couples'} with different lengths "
                f"({interval}; {bias.equal_length} equal), "
                f"mean difference {bias.mean_difference:+.1f} {self.unit}, correlation with the label {correlation}"
            )
        lines += [f"WARNING: {warning}" for warning in self.warnings]
        return "\n".join(lines)


def audit_pairs(pairs: Sequence[Example], tokenizer=None) -> DataAudit:
    """Audit pairs (two answers: chosen, rejected); see the module docstring."""
    length_fn, unit = length_function(tokenizer)
    exact, near, prompts, examples = _duplicates(pairs, lambda p: (p.prompt, p.chosen, p.rejected))
    prompt_lengths = [length_fn(p.prompt) for p in pairs]
    chosen_lengths = [length_fn(p.chosen) for p in pairs]
    rejected_lengths = [length_fn(p.rejected) for p in pairs]
    differences = np.asarray(chosen_lengths, dtype=float) - np.asarray(rejected_lengths, dtype=float)
    audit = DataAudit(
        kind="paired",
        unit=unit,
        count=len(pairs),
        exact_duplicates=exact,
        near_duplicates=near,
        repeated_prompts=prompts,
        empty_answers={
            "chosen": sum(not p.chosen.strip() for p in pairs),
            "rejected": sum(not p.rejected.strip() for p in pairs),
        },
        lengths={
            "prompt": LengthStats.of(prompt_lengths),
            "chosen": LengthStats.of(chosen_lengths),
            "rejected": LengthStats.of(rejected_lengths),
        },
        formats=_format_counts(p.prompt + p.chosen for p in pairs),
        scripts=_script_counts(p.prompt + p.chosen + p.rejected for p in pairs),
        ascii_only=sum((p.prompt + p.chosen + p.rejected).isascii() for p in pairs),
        length_bias=paired_length_bias(differences),
        identical_pairs=sum(p.chosen == p.rejected for p in pairs),
        identical_after_normalization=sum(normalize_text(p.chosen) == normalize_text(p.rejected) for p in pairs),
        duplicate_examples=examples,
        provenance=_provenance_counts(pairs),
    )
    audit.warnings = _warnings(audit)
    return audit


def audit_unpaired(examples: Sequence[Example], tokenizer=None, *, seed: int = 0) -> DataAudit:
    """Audit unpaired (KTO) examples (one answer with a label); `seed` drives the bootstrap."""
    length_fn, unit = length_function(tokenizer)
    exact, near, prompts, duplicate_examples = _duplicates(examples, lambda e: (e.prompt, e.completion, str(e.label)))
    labels_seen: dict[tuple[str, str], set[bool]] = {}
    for example in examples:
        labels_seen.setdefault((example.prompt, example.completion), set()).add(example.label)
    completion_lengths = [length_fn(e.completion) for e in examples]
    desirable = np.asarray([n for n, e in zip(completion_lengths, examples) if e.label], dtype=float)
    undesirable = np.asarray([n for n, e in zip(completion_lengths, examples) if not e.label], dtype=float)
    audit = DataAudit(
        kind="unpaired",
        unit=unit,
        count=len(examples),
        exact_duplicates=exact,
        near_duplicates=near,
        repeated_prompts=prompts,
        empty_answers={"completion": sum(not e.completion.strip() for e in examples)},
        lengths={"prompt": LengthStats.of([length_fn(e.prompt) for e in examples]), "completion": LengthStats.of(completion_lengths)},
        formats=_format_counts(e.prompt + e.completion for e in examples),
        scripts=_script_counts(e.prompt + e.completion for e in examples),
        ascii_only=sum((e.prompt + e.completion).isascii() for e in examples),
        length_bias=unpaired_length_bias(desirable, undesirable, seed=seed),
        labels={"desirable": int(desirable.size), "undesirable": int(undesirable.size)},
        conflicting_labels=sum(len(labels) == 2 for labels in labels_seen.values()),
        duplicate_examples=duplicate_examples,
        provenance=_provenance_counts(examples),
    )
    audit.warnings = _warnings(audit)
    return audit


def audit_records(records: Sequence[Example], tokenizer=None) -> DataAudit:
    """`audit_unpaired` for labelled one-answer examples, `audit_pairs` for pairs (an empty list audits as pairs).

    Judged from the first record; other shapes (groups of K > 2 answers, prompts alone) are a `DataError`.
    """
    if not records or len(records[0].answers) == 2:
        return audit_pairs(records, tokenizer)
    if len(records[0].answers) == 1 and records[0].labels is not None:
        return audit_unpaired(records, tokenizer)
    raise DataError(
        f"the audit reads pairs or labelled examples; {records[0].origin or 'the first record'} has "
        f"{len(records[0].answers)} answer(s){'' if records[0].labels is not None else ' and no label'}"
    )


def paired_length_bias(differences: np.ndarray) -> LengthBias:
    """`LengthBias` from per-pair d = len(chosen) − len(rejected) (formulas in its docstring)."""
    longer, shorter = int((differences > 0).sum()), int((differences < 0).sum())
    compared = longer + shorter
    share = longer / compared if compared else None
    interval = wilson_interval(longer, compared) if compared else None
    rms = math.sqrt(float((differences**2).mean())) if differences.size else 0.0
    correlation = float(differences.mean()) / rms if rms > 0 else None
    return LengthBias(
        compared=compared,
        chosen_longer=longer,
        chosen_shorter=shorter,
        equal_length=int(differences.size - compared),
        share_chosen_longer=share,
        interval=interval,
        mean_difference=float(differences.mean()) if differences.size else 0.0,
        correlation=correlation,
        direction=_direction(share, interval),
    )


def unpaired_length_bias(desirable: np.ndarray, undesirable: np.ndarray, *, seed: int = 0) -> LengthBias:
    """`LengthBias` of desirable vs undesirable completion lengths (formulas in its docstring)."""
    longer, shorter = _longer_shorter_couples(desirable, undesirable)
    compared = longer + shorter
    share = longer / compared if compared else None
    interval = None
    if compared and min(desirable.size, undesirable.size) >= MIN_BOOTSTRAP_EXAMPLES:
        rng = np.random.default_rng(seed)
        shares = []
        for _ in range(BOOTSTRAP_RESAMPLES):
            d = rng.choice(desirable, desirable.size)
            u = rng.choice(undesirable, undesirable.size)
            more, less = _longer_shorter_couples(d, u)
            if more + less:
                shares.append(more / (more + less))
        interval = (float(np.percentile(shares, 2.5)), float(np.percentile(shares, 97.5)))
    lengths = np.concatenate([desirable, undesirable])
    labels = np.concatenate([np.ones(desirable.size), -np.ones(undesirable.size)])
    correlation = None
    if desirable.size and undesirable.size and lengths.std() > 0:
        correlation = float(np.corrcoef(lengths, labels)[0, 1])
    mean_difference = float(desirable.mean() - undesirable.mean()) if desirable.size and undesirable.size else 0.0
    return LengthBias(
        compared=compared,
        chosen_longer=longer,
        chosen_shorter=shorter,
        equal_length=int(desirable.size * undesirable.size - compared),
        share_chosen_longer=share,
        interval=interval,
        mean_difference=mean_difference,
        correlation=correlation,
        direction=_direction(share, interval),
    )


def wilson_interval(successes: int, trials: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a binomial share: (p + z²/2n ± z·sqrt(p(1−p)/n + z²/4n²)) / (1 + z²/n)."""
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = p + z * z / (2 * trials)
    spread = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return (centre - spread) / denominator, (centre + spread) / denominator


@dataclass
class BalanceReport:
    """What `length_balance` did: counts before and after, and what it removed by side."""

    unit: str
    before: dict[str, int]  # "chosen_longer", "chosen_shorter", "equal_length"
    after: dict[str, int]
    removed_chosen_longer: int
    removed_chosen_shorter: int
    removed_examples: list[str] = field(default_factory=list)  # up to 3 origins

    @property
    def removed(self) -> int:
        return self.removed_chosen_longer + self.removed_chosen_shorter

    def to_dict(self) -> dict:
        return {**asdict(self), "removed": self.removed}

    def summary(self) -> str:
        before, after = self.before, self.after
        line = (
            f"length balance ({self.unit}): chosen longer/shorter/equal {before['chosen_longer']}/"
            f"{before['chosen_shorter']}/{before['equal_length']} → {after['chosen_longer']}/"
            f"{after['chosen_shorter']}/{after['equal_length']}; removed {self.removed} pairs "
            f"({self.removed_chosen_longer} chosen-longer, {self.removed_chosen_shorter} chosen-shorter)"
        )
        return line + (f", e.g. {', '.join(self.removed_examples)}" if self.removed_examples else "")


def length_balance(pairs: Sequence, tokenizer=None, *, seed: int = 0) -> tuple[list, BalanceReport]:
    """Drop pairs so the chosen answer is longer exactly as often as it is shorter.

    Pairs with answers of equal length are all kept. The larger side (chosen longer or chosen
    shorter) is subsampled, uniformly at random with `random.Random(seed)`, down to the size of
    the smaller side; kept pairs stay in their original order. So afterwards the share of
    chosen-longer pairs among pairs with a length difference is exactly 0.5. Raises `DataError`
    when nothing would be left (every pair's chosen answer is longer, or every one shorter).
    """
    length_fn, unit = length_function(tokenizer)
    differences = [length_fn(p.chosen) - length_fn(p.rejected) for p in pairs]
    longer = [i for i, d in enumerate(differences) if d > 0]
    shorter = [i for i, d in enumerate(differences) if d < 0]
    equal = len(pairs) - len(longer) - len(shorter)
    majority, minority = (longer, shorter) if len(longer) >= len(shorter) else (shorter, longer)
    removed = set(random.Random(seed).sample(majority, len(majority) - len(minority)))
    kept = [pair for index, pair in enumerate(pairs) if index not in removed]
    if not kept:
        raise DataError(
            f"length balancing would remove all {len(pairs)} pairs: the chosen answer is "
            f"{'longer' if longer else 'shorter'} in every pair; turn data.length_balance off"
        )
    removed_longer = len(removed) if majority is longer else 0
    report = BalanceReport(
        unit=unit,
        before={"chosen_longer": len(longer), "chosen_shorter": len(shorter), "equal_length": equal},
        after={
            "chosen_longer": len(longer) - removed_longer,
            "chosen_shorter": len(shorter) - (len(removed) - removed_longer),
            "equal_length": equal,
        },
        removed_chosen_longer=removed_longer,
        removed_chosen_shorter=len(removed) - removed_longer,
        removed_examples=[pairs[i].origin for i in sorted(removed)[:MAX_EXAMPLES]],
    )
    return kept, report


def _duplicates(records: Sequence, texts: Callable) -> tuple[int, int, int, list[str]]:
    """(exact duplicates, near duplicates, repeated prompts, up to 3 "source repeats source")."""
    first_exact: dict[tuple, str] = {}
    near_seen: set[tuple] = set()
    prompts_seen: set[str] = set()
    exact = near = prompts = 0
    examples: list[str] = []
    for record in records:
        key = texts(record)
        near_key = tuple(normalize_text(text) for text in key)
        if key in first_exact:
            exact += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append(f"{record.origin} repeats {first_exact[key]}")
        else:
            first_exact[key] = record.origin
        near += near_key in near_seen
        near_seen.add(near_key)
        prompts += record.prompt in prompts_seen
        prompts_seen.add(record.prompt)
    return exact, near, prompts, examples


def _provenance_counts(records: Sequence[Example]) -> dict[str, int]:
    counts = Counter(record.provenance or "unknown" for record in records)
    return dict(counts.most_common())


def _format_counts(texts) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for text in texts:
        if any(marker in text for marker in CHAT_TEMPLATE_MARKERS):
            counts["chat_template"] += 1
        elif TRANSCRIPT_PATTERN.search(text):
            counts["transcript"] += 1
        else:
            counts["plain"] += 1
    return dict(counts.most_common())


def _script_counts(texts) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for text in texts:
        letters = Counter(_script(ch) for ch in text if ch.isalpha())
        counts[letters.most_common(1)[0][0] if letters else "none"] += 1
    return dict(counts.most_common())


def _script(ch: str) -> str:
    """The first word of a letter's Unicode name: LATIN, CYRILLIC, GREEK, ARABIC, CJK, HIRAGANA, HANGUL, ..."""
    return unicodedata.name(ch, "UNKNOWN").split(" ", 1)[0]


def _longer_shorter_couples(desirable: np.ndarray, undesirable: np.ndarray) -> tuple[int, int]:
    """Over all (desirable, undesirable) couples: how many have the desirable one longer, how many shorter."""
    ordered = np.sort(undesirable)
    below = np.searchsorted(ordered, desirable, side="left")  # undesirable strictly shorter
    not_above = np.searchsorted(ordered, desirable, side="right")
    return int(below.sum()), int((ordered.size - not_above).sum())


def _direction(share: float | None, interval: tuple[float, float] | None) -> str | None:
    if share is None or interval is None:
        return None
    if share > LENGTH_BIAS_SHARE and interval[0] > 0.5:
        return "longer"
    if share < 1 - LENGTH_BIAS_SHARE and interval[1] < 0.5:
        return "shorter"
    return None


def _warnings(audit: DataAudit) -> list[str]:
    warnings = []
    bias = audit.length_bias
    remedy = "data.length_balance: true" if audit.kind == "paired" else "rebalancing the completions' lengths per label"
    if bias.direction == "longer":
        warnings.append(
            f"the data teaches 'longer is better': the preferred answer is longer in {100 * bias.share_chosen_longer:.1f}% "
            f"of comparable pairs (> {100 * LENGTH_BIAS_SHARE:.0f}%, interval above 50%); a policy can win on verbosity "
            f"alone. Consider {remedy} or a length-normalised loss"
        )
    elif bias.direction == "shorter":
        warnings.append(
            f"the data teaches 'shorter is better': the preferred answer is shorter in "
            f"{100 * (1 - bias.share_chosen_longer):.1f}% of comparable pairs; consider {remedy}"
        )
    if audit.exact_duplicates:
        warnings.append(f"{audit.exact_duplicates} exact duplicate records: they count twice in the loss and can leak into validation")
    if audit.identical_pairs:
        warnings.append(f"{audit.identical_pairs} pairs have chosen == rejected: no preference to learn")
    empty = sum(audit.empty_answers.values())
    if empty:
        warnings.append(f"{empty} empty answers")
    if audit.conflicting_labels:
        warnings.append(f"{audit.conflicting_labels} completions are labelled both desirable and undesirable")
    return warnings


def _shares(counts: dict[str, int], total: int) -> str:
    return ", ".join(f"{name} {count} ({_percent(count, total)})" for name, count in counts.items()) or "none"


def _percent(count: int, total: int) -> str:
    return f"{100 * count / total:.1f}%" if total else "n/a"
