"""Intervals for a before → after change, and the verdict that carries its noise.

Every number the report judges comes from paired per-example values: the same validation
examples evaluated before and after training (`evaluations/step-N.jsonl`), so the change of
example i is d_i = after_i − before_i and the question is whether mean(d) differs from 0.

    standard error    mean(d) ± z · sd(d) / √n          sd with n − 1, z = Φ⁻¹((1 + confidence) / 2)
    proportion        p ± z · √(p (1 − p) / n)          Wald interval of a fraction of n examples
    paired bootstrap  percentiles of mean(after[I]) − mean(before[I]) over resampled index sets I
                      (n indices drawn with replacement, the same I for before and after, seeded)

`verdict` says "✓ rose" / "✗ fell" (✓ when the direction is the one wanted) or "no clear change"
when the interval spans 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np

DEFAULT_CONFIDENCE = 0.95
DEFAULT_RESAMPLES = 2000
NO_CLEAR_CHANGE = "no clear change"

Wanted = Literal["higher", "lower"]


@dataclass(frozen=True)
class Interval:
    """An estimate with a two-sided interval at `confidence`, from `method` over `n` values."""

    estimate: float
    low: float
    high: float
    confidence: float
    method: str
    n: int

    @property
    def spans_zero(self) -> bool:
        return self.low <= 0.0 <= self.high

    def describe(self, digits: int = 3) -> str:
        """e.g. `+0.125 [+0.050, +0.200] (95% paired bootstrap, n=64)`."""
        return (
            f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}] "
            f"({self.confidence:.0%} {self.method}, n={self.n})"
        )


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf((1.0 + confidence) / 2.0)


def _paired(before: Sequence[float], after: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    before_values = np.asarray(before, dtype=np.float64)
    after_values = np.asarray(after, dtype=np.float64)
    if before_values.shape != after_values.shape or before_values.ndim != 1:
        raise ValueError(f"paired values need two equal-length lists, got {before_values.shape} and {after_values.shape}")
    if before_values.size == 0:
        raise ValueError("no paired values")
    return before_values, after_values


def mean_difference_interval(
    before: Sequence[float], after: Sequence[float], *, confidence: float = DEFAULT_CONFIDENCE
) -> Interval:
    """mean(d) ± z · sd(d)/√n for paired d_i = after_i − before_i (zero width for n = 1)."""
    before_values, after_values = _paired(before, after)
    differences = after_values - before_values
    n = differences.size
    mean = float(differences.mean())
    half = _z(confidence) * float(differences.std(ddof=1)) / math.sqrt(n) if n > 1 else 0.0
    return Interval(mean, mean - half, mean + half, confidence, "standard error", n)


def proportion_interval(values: Sequence[float | bool], *, confidence: float = DEFAULT_CONFIDENCE) -> Interval:
    """p ± z · √(p(1 − p)/n) for the fraction p of true (1) values among n."""
    flags = np.asarray(values, dtype=np.float64)
    if flags.size == 0:
        raise ValueError("no values")
    n = flags.size
    p = float(flags.mean())
    half = _z(confidence) * math.sqrt(p * (1.0 - p) / n)
    return Interval(p, p - half, p + half, confidence, "standard error", n)


def sign_test_p(successes: int, trials: int) -> float:
    """One-sided exact sign test: P(X ≥ successes) for X ~ Binomial(trials, ½), the chance of at least this many
    moves in the wanted direction if each were a fair coin flip (ties are left out of `trials` by the caller)."""
    if not 0 <= successes <= trials:
        raise ValueError(f"successes {successes} must lie in [0, trials {trials}]")
    return sum(math.comb(trials, k) for k in range(successes, trials + 1)) / 2**trials


def paired_bootstrap(
    before: Sequence[float],
    after: Sequence[float],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Interval:
    """Percentile interval of mean(after[I]) − mean(before[I]) over `resamples` seeded index draws I."""
    before_values, after_values = _paired(before, after)
    differences = after_values - before_values
    n = differences.size
    indices = np.random.default_rng(seed).integers(0, n, size=(resamples, n))
    means = differences[indices].mean(axis=1)  # mean(after[I]) − mean(before[I]) = mean(d[I])
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return Interval(float(differences.mean()), float(low), float(high), confidence, "paired bootstrap", n)


def verdict_from_interval(interval: Interval, wanted: Wanted) -> str:
    """"no clear change" when the interval spans 0; else "✓"/"✗" (direction wanted or not) + "rose"/"fell"."""
    if wanted not in ("higher", "lower"):
        raise ValueError(f"wanted must be 'higher' or 'lower', got {wanted!r}")
    if interval.spans_zero:
        return NO_CLEAR_CHANGE
    rose = interval.estimate > 0
    good = rose if wanted == "higher" else not rose
    return f"{'✓' if good else '✗'} {'rose' if rose else 'fell'}"


def verdict(
    before: Sequence[float], after: Sequence[float], wanted: Wanted, *, seed: int = 0, resamples: int = DEFAULT_RESAMPLES
) -> str:
    """The verdict on paired per-example values, judged by their paired bootstrap interval."""
    return verdict_from_interval(paired_bootstrap(before, after, seed=seed, resamples=resamples), wanted)
