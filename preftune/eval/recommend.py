"""Which method to train with: measure the data and the reference model, then follow the design's decision tree.

Two parts, kept apart so every branch is testable without a model:

- measuring (`measure_traits`): the data's kind (paired, unpaired good/bad labels, a reward
  signal without pairs), size, synthetic share, length bias and duplicate rate (from
  `preftune.data.audit`), and the **reference model's preference accuracy** on a seeded sample of
  pairs (`measure_reference_accuracy`);
- deciding (`decide`): a pure function of those `DataTraits`, returning a `Recommendation`.

Decision tree (thresholds are the module constants):

    only principles, no data          → Constitutional AI            (not trainable by preftune yet)
    a reward signal but no pairs      → GRPO / RLHF                  (not trainable by preftune yet)
    unpaired good/bad labels          → KTO                          loss_type kto
    paired, synthetic share > 50%     → CPO + distribution filter    loss_type cpo, filter_synthetic_outliers
                                                                     (mode hard + length_balance if accuracy < 50%)
    paired, reference accuracy > 70%  → DPO                          loss_type sigmoid
    paired, 50% ≤ accuracy ≤ 70%      → CPO soft                     loss_type cpo, constraints.mode soft
    paired, accuracy < 50%            → CPO hard + length rebalance  constraints.mode hard, data.length_balance
    paired, accuracy not measured     → CPO soft (the safe middle)

A "longer is better" (or "shorter") length bias found by the audit adds `data.length_balance: true`
to any paired branch. `write_recommended_config` turns a trainable recommendation into a YAML run
config with the current keys.
"""

from __future__ import annotations

import math
import random
import textwrap
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from preftune.atomic import atomic_write_text
from preftune.config import RunConfig, validate_config
from preftune.data.audit import DataAudit, audit_pairs, audit_unpaired
from preftune.data.collate import collate_pairs
from preftune.data.formats import FORMAT_KINDS, PAIRED, UNPAIRED, detect_format, load_examples
from preftune.data.pipeline import resolve_data_path
from preftune.data.readers import read_records
from preftune.data.tokenize import tokenize_examples
from preftune.errors import ConfigError, DataError
from preftune.logprobs import sequence_logps
from preftune.methods.evaluation import TIE_TOLERANCE

DPO_ACCURACY = 0.70  # above: the reference already ranks most pairs right, plain DPO suffices
SOFT_ACCURACY = 0.50  # at or above (up to DPO_ACCURACY): CPO with the soft constraint; below: hard + rebalance
MOSTLY_SYNTHETIC = 0.50  # synthetic share above which the synthetic distribution is filtered
DUPLICATE_NOTE = 0.05  # duplicate rate worth a note in the reason
REWARD_FIELDS = ("reward", "score")

OVERHEAD = {
    "dpo": "1× (the baseline): a policy forward and backward plus one reference forward per pair; the reference "
    "log-probs are cached on disk, so later epochs pay only the policy",
    "cpo": "≈ DPO (1×): the same forwards; the Lagrange multiplier update is one scalar per step (negligible)",
    "cpo_filter": "≈ DPO (1×) plus a one-off pass over the data for the filter statistic (length differences: no model)",
    "kto": "≈ DPO per example: policy and reference score each completion and one mismatched completion "
    "(for the KL baseline) sharing its prompt",
    "grpo": "several × DPO (roughly 3–6×): sampling a group of completions per prompt, scoring them with the reward "
    "signal, and (PPO) a value model; generation dominates",
    "constitutional_ai": "several × DPO: the model generates, critiques and revises answers against the principles "
    "before any preference training, then trains on the result",
}


@dataclass(frozen=True)
class ReferenceAccuracy:
    """How often the reference model prefers the chosen answer: margin m = logp(chosen) − logp(rejected).

    `correct` counts m > TIE_TOLERANCE, `wrong` m < −TIE_TOLERANCE, `ties` the rest, which count as
    neither: accuracy = correct / (correct + wrong), with the binomial standard error
    sqrt(accuracy · (1 − accuracy) / (correct + wrong)). Log-probs are per-token means when
    `length_normalized` (so a short answer does not win by having fewer tokens), else sums.
    """

    correct: int
    wrong: int
    ties: int
    length_normalized: bool

    @property
    def decided(self) -> int:
        return self.correct + self.wrong

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.decided if self.decided else None

    @property
    def standard_error(self) -> float | None:
        if not self.decided:
            return None
        return math.sqrt(self.accuracy * (1 - self.accuracy) / self.decided)


@torch.no_grad()
def measure_reference_accuracy(
    model: torch.nn.Module,
    pairs: Sequence,
    *,
    pad_id: int,
    batch_size: int = 8,
    length_normalize: bool = True,
    chunk_size: int = 512,
) -> ReferenceAccuracy:
    """The reference's preference accuracy on tokenised pairs (`TokenizedExample`s with 2 answers), through the log-prob engine."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    margins = []
    try:
        for start in range(0, len(pairs), batch_size):
            batch = collate_pairs(pairs[start : start + batch_size], pad_id=pad_id).to(device)
            chosen, rejected = sequence_logps(model, batch, chunk_size=chunk_size).by_answer(2)
            margin = chosen.mean - rejected.mean if length_normalize else chosen.sum - rejected.sum
            margins.append(margin.float().cpu())
    finally:
        model.train(was_training)
    margin = torch.cat(margins) if margins else torch.empty(0)
    return ReferenceAccuracy(
        correct=int((margin > TIE_TOLERANCE).sum()),
        wrong=int((margin < -TIE_TOLERANCE).sum()),
        ties=int((margin.abs() <= TIE_TOLERANCE).sum()),
        length_normalized=length_normalize,
    )


@dataclass
class DataTraits:
    """What `decide` looks at. `kind`: "paired", "unpaired" (good/bad labels), "reward" (a reward signal, no pairs), "principles"."""

    kind: str
    size: int
    synthetic_share: float | None = None  # synthetic records / all records; None = unknown (no provenance known)
    length_bias: str | None = None  # the audit's direction: "longer", "shorter" or None
    share_chosen_longer: float | None = None
    duplicate_rate: float = 0.0
    reference_accuracy: float | None = None  # None = not measured (unpaired data, or no model)
    reference_accuracy_se: float | None = None
    reference_sample: int = 0  # decided pairs the accuracy is measured on


@dataclass
class Recommendation:
    """A method and the config keys that select it; `settings` holds config fragments (`method`, `data`)."""

    method: str  # "dpo", "cpo", "kto", "grpo", "constitutional_ai"
    settings: dict[str, dict[str, Any]]
    reason: str
    expected_overhead: str
    branch: str
    traits: DataTraits
    trainable: bool = True  # False: preftune cannot train this method yet; no config can be written
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"recommended: {self.method} (branch {self.branch})", f"why: {self.reason}"]
        lines += [f"note: {note}" for note in self.notes]
        lines.append(f"expected compute overhead: {self.expected_overhead}")
        if self.settings:
            lines.append("settings: " + yaml.safe_dump(self.settings, sort_keys=False, default_flow_style=True).strip())
        return "\n".join(lines)


def decide(traits: DataTraits) -> Recommendation:
    """The decision tree of the module docstring, as a pure function of the measured traits."""
    if traits.kind == "principles":
        return Recommendation(
            "constitutional_ai", {}, "only principles are given, no preference data: generate and revise answers against "
            "them (Constitutional AI) to create the preferences; `preftune constitute --prompts P --model M --output pairs.jsonl` "
            "writes them, then recommend again on pairs.jsonl", OVERHEAD["constitutional_ai"], "constitutional_ai", traits,
            trainable=False,
        )
    if traits.kind == "reward":
        return Recommendation(
            "grpo", {}, f"{traits.size} prompts carry a reward signal but no chosen/rejected pairs: optimise the reward "
            "online (GRPO, or PPO-style RLHF)", OVERHEAD["grpo"], "online_rl", traits, trainable=False,
        )
    notes = _notes(traits)
    if traits.kind == "unpaired":
        reason = f"{traits.size} unpaired records labelled good/bad and no pairs: KTO learns from each label on its own"
        return Recommendation("kto", {"method": {"loss_type": "kto"}}, reason, OVERHEAD["kto"], "kto", traits, notes=notes)
    if traits.kind != "paired":
        raise ValueError(f"unknown data kind {traits.kind!r}")

    accuracy = traits.reference_accuracy
    measured = _accuracy_text(traits)
    data: dict[str, Any] = {}
    if traits.synthetic_share is not None and traits.synthetic_share > MOSTLY_SYNTHETIC:
        hard = accuracy is not None and accuracy < SOFT_ACCURACY
        data = {"filter_synthetic_outliers": True, **({"length_balance": True} if hard else {})}
        reason = (
            f"{100 * traits.synthetic_share:.0f}% of the pairs are synthetic (> {100 * MOSTLY_SYNTHETIC:.0f}%): constrain the "
            "margin (CPO) and drop synthetic pairs outside the human distribution"
            + (f"; {measured} is below 50%, so the hard constraint and length rebalancing" if hard else "")
        )
        method = {"loss_type": "cpo", "constraints": {"mode": "hard" if hard else "soft"}}
        branch, overhead = "cpo_synthetic_filter", OVERHEAD["cpo_filter"]
    elif accuracy is None:
        method, branch, overhead = {"loss_type": "cpo", "constraints": {"mode": "soft"}}, "cpo_soft_unmeasured", OVERHEAD["cpo"]
        reason = "the reference accuracy was not measured: CPO with the soft constraint is the safe middle of the tree"
    elif accuracy > DPO_ACCURACY:
        method, branch, overhead = {"loss_type": "sigmoid"}, "dpo", OVERHEAD["dpo"]
        reason = f"{measured} is above {100 * DPO_ACCURACY:.0f}%: the reference already agrees with the labels, plain DPO suffices"
    elif accuracy >= SOFT_ACCURACY:
        method, branch, overhead = {"loss_type": "cpo", "constraints": {"mode": "soft"}}, "cpo_soft", OVERHEAD["cpo"]
        reason = (
            f"{measured} is between {100 * SOFT_ACCURACY:.0f}% and {100 * DPO_ACCURACY:.0f}%: the reference disagrees with many "
            "labels; CPO's soft constraint pushes the margin of those pairs up in proportion to how far they fall short"
        )
    else:
        method, branch, overhead = {"loss_type": "cpo", "constraints": {"mode": "hard"}}, "cpo_hard_rebalance", OVERHEAD["cpo"]
        data = {"length_balance": True}
        reason = (
            f"{measured} is below {100 * SOFT_ACCURACY:.0f}%: the reference prefers the rejected answers more often than not; "
            "the hard constraint tracks the fraction of violating pairs, and length rebalancing removes the easiest wrong cue"
        )
    if accuracy is not None and traits.reference_accuracy_se:
        for boundary in (DPO_ACCURACY, SOFT_ACCURACY):
            if abs(accuracy - boundary) < 1.96 * traits.reference_accuracy_se:
                notes.append(
                    f"the accuracy is within its 95% interval of the {100 * boundary:.0f}% boundary: the neighbouring "
                    "branch is as defensible; a larger --sample narrows it"
                )
    if traits.length_bias is not None and not data.get("length_balance"):
        data["length_balance"] = True
        notes.append(
            f"the audit found a '{traits.length_bias} is better' length bias (chosen longer in "
            f"{100 * traits.share_chosen_longer:.0f}% of pairs): data.length_balance is switched on"
        )
    settings = {"method": method, **({"data": data} if data else {})}
    name = "dpo" if method["loss_type"] == "sigmoid" else "cpo"
    return Recommendation(name, settings, reason, overhead, branch, traits, notes=notes)


def _accuracy_text(traits: DataTraits) -> str:
    if traits.reference_accuracy is None:
        return "the reference accuracy (not measured)"
    se = f" ± {100 * traits.reference_accuracy_se:.1f}" if traits.reference_accuracy_se is not None else ""
    return f"the reference accuracy {100 * traits.reference_accuracy:.1f}%{se} (n={traits.reference_sample})"


def _notes(traits: DataTraits) -> list[str]:
    notes = []
    if traits.duplicate_rate > DUPLICATE_NOTE:
        notes.append(
            f"{100 * traits.duplicate_rate:.1f}% of the records are (near) duplicates: deduplicate before training, "
            "or they weigh double and leak into validation"
        )
    return notes


def data_kind(path: str | Path, format: str = "auto") -> str:
    """"reward" (a prompt with a reward/score and no chosen/completion), "unpaired" (a format of labelled
    completions: kto, sharegpt_kto) or "paired", judged from the first record unless `format` is forced."""
    if format != "auto":
        return "unpaired" if FORMAT_KINDS[format] == UNPAIRED else "paired"
    first = next(iter(read_records(path)), None)
    value = first.value if first is not None else None
    if isinstance(value, dict) and any(key in value for key in REWARD_FIELDS) and not {"chosen", "completion"} & value.keys():
        return "reward"
    detected = detect_format(value)
    return "unpaired" if detected is not None and FORMAT_KINDS[detected] == UNPAIRED else "paired"


@dataclass
class Measurement:
    """Everything `measure_traits` found: the traits for `decide`, the audit and the reference accuracy."""

    traits: DataTraits
    audit: DataAudit | None
    reference: ReferenceAccuracy | None


def measure_traits(
    data_files: Sequence[str],
    *,
    synthetic_files: Sequence[str] = (),
    model: torch.nn.Module | None = None,
    tokenizer=None,
    sample: int = 200,
    seed: int = 0,
    format: str = "auto",
    max_length: int = 512,
    max_prompt_length: int | None = None,
    batch_size: int = 8,
    length_normalize: bool = True,
) -> Measurement:
    """Load the files (human or unlabelled `data_files`, `synthetic_files`), audit them, and measure the reference.

    The synthetic share: with `synthetic_files`, the files say it (the data files are human, as
    `data.sources` would have them); without, the records' own provenance when every record
    carries one; else unknown (None).
    The reference accuracy is measured when the data is paired and a `model` (with its
    `tokenizer`) is given: on `sample` pairs drawn with `random.Random(seed)` from all files,
    tokenised to `max_length` (pairs the tokeniser drops are left out).
    """
    files = [*data_files, *synthetic_files]
    if not files:
        raise ConfigError("recommend needs at least one data file")
    paths = [resolve_data_path(spec) for spec in files]
    kinds = {data_kind(path, format) for path in paths}
    if len(kinds) > 1:
        raise DataError(f"the files mix data kinds {sorted(kinds)}: recommend one kind at a time")
    (kind,) = kinds
    if kind == "reward":
        size = sum(1 for path in paths for _ in read_records(path))
        return Measurement(DataTraits("reward", size), None, None)
    accept = (UNPAIRED,) if kind == "unpaired" else (PAIRED,)
    loaded = [load_examples(path, format=format, tokenizer=tokenizer, accept=accept)[0] for path in paths]
    records = [record for items in loaded for record in items]
    if synthetic_files:
        synthetic_share = sum(len(items) for items in loaded[len(data_files) :]) / len(records)
    elif all(record.provenance is not None for record in records):
        synthetic_share = sum(record.provenance == "synthetic" for record in records) / len(records)
    else:
        synthetic_share = None
    audit = audit_unpaired(records, tokenizer, seed=seed) if kind == "unpaired" else audit_pairs(records, tokenizer)
    traits = DataTraits(
        kind=kind,
        size=len(records),
        synthetic_share=synthetic_share,
        length_bias=audit.length_bias.direction,
        share_chosen_longer=audit.length_bias.share_chosen_longer,
        duplicate_rate=audit.duplicate_rate,
    )
    reference = None
    if kind == "paired" and model is not None:
        if tokenizer is None:
            raise ConfigError("measuring the reference accuracy needs the model's tokenizer")
        chosen = random.Random(seed).sample(records, min(sample, len(records)))
        tokenized, _ = tokenize_examples(chosen, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
        reference = measure_reference_accuracy(
            model, tokenized, pad_id=tokenizer.pad_token_id, batch_size=batch_size, length_normalize=length_normalize
        )
        traits.reference_accuracy = reference.accuracy
        traits.reference_accuracy_se = reference.standard_error
        traits.reference_sample = reference.decided
    return Measurement(traits, audit, reference)


def recommend(data_files: Sequence[str], **options) -> Recommendation:
    """`decide(measure_traits(data_files, **options).traits)`; see `measure_traits` for the options."""
    return decide(measure_traits(data_files, **options).traits)


def write_recommended_config(
    recommendation: Recommendation,
    path: str | Path,
    *,
    data_file: str | None = None,
    synthetic_files: Sequence[str] = (),
    model_name_or_path: str = "smollm2-135m",
    output_dir: str | None = None,
) -> RunConfig:
    """Write a ready-to-run YAML config (current keys) selecting the recommended method; returns it validated.

    With `synthetic_files`, the data goes into `data.sources` (`data_file` as human, the rest
    synthetic); else into `data.train_file` (whose records' own provenance then drives
    `filter_synthetic_outliers`). 10% of the training data is held out for validation.
    """
    if not recommendation.trainable:
        raise ConfigError(
            f"{recommendation.method} is not trainable by this version of preftune, so no run config can be written"
        )
    if data_file is None:
        raise ConfigError("write_recommended_config needs the data file the run trains on")
    data: dict[str, Any] = {"validation_file": None, "validation_split": 0.1}
    if synthetic_files:
        data["sources"] = [{"path": data_file, "source": "human"}] + [
            {"path": spec, "source": "synthetic"} for spec in synthetic_files
        ]
    else:
        data["train_file"] = data_file
    data.update(recommendation.settings.get("data", {}))
    raw = {
        "output_dir": output_dir or f"runs/recommended-{recommendation.branch}",
        "model": {"name_or_path": model_name_or_path},
        "data": data,
        "method": recommendation.settings["method"],
        "training": {"learning_rate": 5.0e-5, "per_device_train_batch_size": 8, "num_train_epochs": 1},
    }
    config = validate_config(raw, source=str(path))
    header = [
        f"# Written by `preftune recommend`: {recommendation.method} (branch {recommendation.branch}).",
        *[f"# {line}" for line in _wrap(f"Why: {recommendation.reason}")],
        *[f"# {line}" for note in recommendation.notes for line in _wrap(f"Note: {note}")],
        *[f"# {line}" for line in _wrap(f"Expected compute overhead: {recommendation.expected_overhead}")],
    ]
    atomic_write_text(path, "\n".join(header) + "\n" + yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return config


def _wrap(text: str) -> list[str]:
    return textwrap.wrap(text, width=100)
