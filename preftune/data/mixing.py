"""Mixing human and synthetic preference data: a human-share floor, a KL check, optional outlier filtering.

Each `SourceGroup` is a list of pairs (`Example`s with two answers: chosen, rejected), its
provenance ("human" or "synthetic") and a weight in (0, 1]: the fraction of the group to use.
The group's provenance is the provenance of its pairs: `mix_sources` returns every kept pair with
`Example.provenance` set to it (a pair that already says so is returned as it is; one that said
the other provenance is counted as `relabelled`). `groups_by_provenance` builds the groups from
the provenance the records themselves carry. `mix_sources` never invents or repeats data; in order it

1. keeps `round(weight · n)` pairs of each group (seeded sample, file order kept);
2. when `filter_outliers`, drops synthetic pairs whose statistic lies outside the human
   distribution's [q_lo, q_hi] quantile range (default 5th–95th percentile);
3. when `human_ratio` is set, treats it as a FLOOR on human / (human + synthetic): if the mix has
   too little human data, synthetic pairs are subsampled (each synthetic group by the same factor,
   largest remainders first) down to the most the floor allows, floor(H · (1 − r) / r);
4. computes KL(synthetic ‖ human) of a per-pair statistic (`histogram_kl`) before and after the
   steps above, and warns when the final value exceeds `kl_threshold`.

The statistic is the length difference len(chosen) − len(rejected) (tokens with a tokenizer,
else characters) unless every group carries a precomputed per-pair `statistic` (for example the
reference model's margin, computed by a higher layer).
"""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from preftune.data.audit import length_function
from preftune.data.records import PROVENANCES, Example
from preftune.errors import ConfigError, DataError

DEFAULT_KL_THRESHOLD = 0.15
DEFAULT_BINS = 20
DEFAULT_SMOOTHING = 0.5
DEFAULT_QUANTILES = (0.05, 0.95)


@dataclass
class SourceGroup:
    """Pairs of one provenance; `statistic` ([len(pairs)], optional) replaces the default length difference."""

    pairs: Sequence
    provenance: str  # "human" | "synthetic"
    weight: float = 1.0  # fraction of the group to use, in (0, 1]
    name: str = ""  # for reports, e.g. the file path
    statistic: Sequence[float] | None = None

    def __post_init__(self) -> None:
        if self.provenance not in PROVENANCES:
            raise ConfigError(f"source {self.name!r}: provenance must be 'human' or 'synthetic', got {self.provenance!r}")
        if not 0.0 < self.weight <= 1.0:
            raise ConfigError(f"source {self.name!r}: weight must be in (0, 1] (the fraction of the file to use), got {self.weight}")
        if self.statistic is not None and len(self.statistic) != len(self.pairs):
            raise ConfigError(f"source {self.name!r}: {len(self.statistic)} statistic values for {len(self.pairs)} pairs")


def groups_by_provenance(pairs: Sequence[Example], provenance: Sequence[str] | Mapping[str, str] | None = None) -> list[SourceGroup]:
    """One group per provenance, in the order human, synthetic; each group keeps the pairs' order.

    The provenance of a pair is its own `Example.provenance` (None: every pair must carry one), or
    comes from a parallel list of provenances, or from a mapping `pair.origin → provenance`.
    """
    if provenance is None:
        unknown = [pair.origin for pair in pairs if pair.provenance is None]
        if unknown:
            raise DataError(
                f"{len(unknown)} of {len(pairs)} pairs carry no provenance (e.g. {unknown[0]}): give each record "
                "provenance: human|synthetic, or list the files under data.sources"
            )
        labels = [pair.provenance for pair in pairs]
    elif isinstance(provenance, Mapping):
        labels = [provenance[pair.origin] for pair in pairs]
    else:
        if len(provenance) != len(pairs):
            raise ConfigError(f"{len(provenance)} provenance labels for {len(pairs)} pairs")
        labels = list(provenance)
    return [
        SourceGroup([pair for pair, label in zip(pairs, labels) if label == kind], kind, name=kind)
        for kind in PROVENANCES
        if kind in labels
    ]


def kl_divergence(p_counts: Sequence[float], q_counts: Sequence[float], *, smoothing: float = DEFAULT_SMOOTHING) -> float:
    """KL(P ‖ Q) = Σ p_i · ln(p_i / q_i) in nats, from two histograms over the same bins.

    Additive smoothing: p_i = (c_i + α) / (Σc + α·B), the same for q, so an empty bin of Q does not
    make the divergence infinite. With α = 0, bins where p_i = 0 contribute 0 and a bin with
    p_i > 0 = q_i gives +inf.
    """
    p = np.asarray(p_counts, dtype=float) + smoothing
    q = np.asarray(q_counts, dtype=float) + smoothing
    if p.shape != q.shape or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("kl_divergence needs two non-empty histograms over the same bins")
    p, q = p / p.sum(), q / q.sum()
    support = p > 0
    with np.errstate(divide="ignore"):
        return float(np.sum(p[support] * np.log(p[support] / q[support])))


def histogram_kl(
    values: Sequence[float], reference: Sequence[float], *, bins: int = DEFAULT_BINS, smoothing: float = DEFAULT_SMOOTHING
) -> float:
    """KL(values ‖ reference) of two samples: `bins` equal-width bins spanning the pooled min..max, then `kl_divergence`."""
    values, reference = np.asarray(values, dtype=float), np.asarray(reference, dtype=float)
    if values.size == 0 or reference.size == 0:
        raise ValueError("histogram_kl needs two non-empty samples")
    low = min(values.min(), reference.min())
    high = max(values.max(), reference.max())
    if high == low:
        return 0.0
    edges = np.linspace(low, high, bins + 1)
    return kl_divergence(np.histogram(values, edges)[0], np.histogram(reference, edges)[0], smoothing=smoothing)


@dataclass
class GroupReport:
    name: str
    provenance: str
    weight: float
    available: int
    after_weight: int
    filtered_outliers: int
    subsampled_for_ratio: int
    kept: int
    relabelled: int = 0  # kept pairs whose own provenance was the other one: the group's provenance wins


@dataclass
class MixReport:
    """What `mix_sources` did, per group and overall; `to_dict()` is JSON-able."""

    groups: list[GroupReport]
    human_ratio_floor: float | None
    achieved_human_ratio: float
    statistic: str  # what the KL is computed on
    kl_before: float | None  # KL(synthetic ‖ human) of the weighted groups, before filtering and the floor
    kl_after: float | None  # of the final mix
    kl_threshold: float
    outlier_range: tuple[float, float] | None  # the human [q_lo, q_hi] range synthetic pairs had to fall in
    warnings: list[str] = field(default_factory=list)

    @property
    def kept(self) -> int:
        return sum(group.kept for group in self.groups)

    def to_dict(self) -> dict:
        return {**asdict(self), "kept": self.kept}

    def summary(self) -> str:
        lines = []
        for g in self.groups:
            lines.append(
                f"source {g.name or '<unnamed>'} ({g.provenance}, weight {g.weight:g}): {g.available} pairs, "
                f"{g.after_weight} after weight, {g.filtered_outliers} filtered as outliers, "
                f"{g.subsampled_for_ratio} subsampled for the human-ratio floor → {g.kept} kept"
                + (f" ({g.relabelled} of them said they were {_other(g.provenance)}: relabelled {g.provenance})" if g.relabelled else "")
            )
        floor = "none" if self.human_ratio_floor is None else f"{self.human_ratio_floor:g}"
        line = f"mix: {self.kept} pairs, human share {self.achieved_human_ratio:.3f} (floor {floor})"
        if self.kl_after is not None:
            before = f"{self.kl_before:.3f} before filtering/floor, " if self.kl_before is not None else ""
            line += f"; KL(synthetic ‖ human) of {self.statistic}: {before}{self.kl_after:.3f} final (threshold {self.kl_threshold:g})"
        if self.outlier_range is not None:
            line += f"; outlier range [{self.outlier_range[0]:g}, {self.outlier_range[1]:g}]"
        lines.append(line)
        lines += [f"WARNING: {warning}" for warning in self.warnings]
        return "\n".join(lines)


def mix_sources(
    groups: Sequence[SourceGroup],
    *,
    human_ratio: float | None = None,
    seed: int = 0,
    tokenizer=None,
    kl_threshold: float = DEFAULT_KL_THRESHOLD,
    filter_outliers: bool = False,
    quantiles: tuple[float, float] = DEFAULT_QUANTILES,
    bins: int = DEFAULT_BINS,
    smoothing: float = DEFAULT_SMOOTHING,
) -> tuple[list, MixReport]:
    """Mix the groups (steps in the module docstring); returns the pairs (group order, file order within) and a report."""
    if not groups:
        raise ConfigError("mix_sources needs at least one source group")
    if human_ratio is not None and not 0.0 <= human_ratio <= 1.0:
        raise ConfigError(f"human_ratio must be in [0, 1], got {human_ratio}")
    with_statistic = [group.statistic is not None for group in groups]
    if any(with_statistic) and not all(with_statistic):
        raise ConfigError("give a precomputed statistic for every source group or for none")
    if all(with_statistic):
        statistic_name = "the given statistic"
        statistics = [np.asarray(group.statistic, dtype=float) for group in groups]
    else:
        length_of, unit = length_function(tokenizer)
        statistic_name = f"length difference (chosen − rejected, {unit})"
        statistics = [np.asarray([length_of(p.chosen) - length_of(p.rejected) for p in group.pairs], dtype=float) for group in groups]

    rng = random.Random(seed)
    # Indices into each group's pairs, narrowed step by step.
    kept = [sorted(rng.sample(range(len(g.pairs)), round(g.weight * len(g.pairs)))) for g in groups]
    reports = [GroupReport(g.name, g.provenance, g.weight, len(g.pairs), len(k), 0, 0, 0) for g, k in zip(groups, kept)]
    human = [i for i, g in enumerate(groups) if g.provenance == "human"]
    synthetic = [i for i, g in enumerate(groups) if g.provenance == "synthetic"]

    def values(members: list[int]) -> np.ndarray:
        parts = [statistics[i][kept[i]] for i in members]
        return np.concatenate(parts) if parts else np.empty(0)

    def kl() -> float | None:
        syn, hum = values(synthetic), values(human)
        return histogram_kl(syn, hum, bins=bins, smoothing=smoothing) if syn.size and hum.size else None

    kl_before = kl()
    outlier_range = None
    if filter_outliers and synthetic:
        human_values = values(human)
        if human_values.size == 0:
            raise DataError("filter_synthetic_outliers needs human data to define the distribution synthetic pairs must fall in")
        low, high = (float(v) for v in np.quantile(human_values, quantiles))
        outlier_range = (low, high)
        for i in synthetic:
            inside = [j for j in kept[i] if low <= statistics[i][j] <= high]
            reports[i].filtered_outliers = len(kept[i]) - len(inside)
            kept[i] = inside

    human_count = sum(len(kept[i]) for i in human)
    synthetic_count = sum(len(kept[i]) for i in synthetic)
    if human_ratio is not None and human_ratio > 0 and synthetic_count:
        if human_count == 0:
            raise DataError(f"human_ratio {human_ratio:g} is a floor on human data, but the data holds no human pairs")
        # The epsilon keeps an exact quotient (70 human at r = 0.7 → 30) from flooring to one less.
        allowed = math.floor(human_count * (1 - human_ratio) / human_ratio + 1e-9)
        if allowed < synthetic_count:
            for i, target in zip(synthetic, _proportional([len(kept[i]) for i in synthetic], allowed)):
                reports[i].subsampled_for_ratio = len(kept[i]) - target
                kept[i] = sorted(rng.sample(kept[i], target))

    for i, report in enumerate(reports):
        report.kept = len(kept[i])
    total = sum(report.kept for report in reports)
    if total == 0:
        raise DataError("the source mix kept no pairs")
    achieved = sum(reports[i].kept for i in human) / total
    kl_after = kl()
    warnings = []
    if kl_after is not None and kl_after > kl_threshold:
        warnings.append(
            f"KL(synthetic ‖ human) of {statistic_name} is {kl_after:.3f} > kl_divergence_threshold {kl_threshold:g}: "
            "the synthetic pairs teach a different preference than the human ones"
            + ("" if filter_outliers else "; consider data.filter_synthetic_outliers: true")
        )
    mixed = []
    for i, group in enumerate(groups):
        for j in kept[i]:
            pair = group.pairs[j]
            if pair.provenance != group.provenance:
                reports[i].relabelled += pair.provenance is not None
                pair = dataclasses.replace(pair, provenance=group.provenance)
            mixed.append(pair)
    relabelled = sum(report.relabelled for report in reports)
    if relabelled:
        warnings.append(
            f"{relabelled} kept pairs said the other provenance than their source: data.sources[].source sets the "
            "provenance of the whole file"
        )
    report = MixReport(reports, human_ratio, achieved, statistic_name, kl_before, kl_after, kl_threshold, outlier_range, warnings)
    return mixed, report


def _other(provenance: str) -> str:
    return next(kind for kind in PROVENANCES if kind != provenance)


def _proportional(sizes: list[int], total: int) -> list[int]:
    """Split `total` over groups in proportion to `sizes` (largest remainders first), never above a size."""
    whole = sum(sizes)
    exact = [size * total / whole for size in sizes]
    shares = [math.floor(value) for value in exact]
    by_remainder = sorted(range(len(sizes)), key=lambda i: -(exact[i] - shares[i]))
    for i in by_remainder[: total - sum(shares)]:
        shares[i] += 1
    return shares
