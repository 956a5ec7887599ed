import math

import pytest

from preftune.eval.stats import (
    NO_CLEAR_CHANGE,
    mean_difference_interval,
    paired_bootstrap,
    proportion_interval,
    verdict,
    verdict_from_interval,
)


def test_standard_error_interval_of_a_paired_mean_difference_by_hand():
    # d = [1, 2, 3, 4]: mean 2.5, sd (n−1) = √(5/3) = 1.2910, se = 0.6455, z(95%) = 1.959964
    interval = mean_difference_interval([0, 0, 0, 0], [1, 2, 3, 4])
    half = 1.959964 * math.sqrt(5 / 3) / 2
    assert interval.estimate == pytest.approx(2.5)
    assert interval.low == pytest.approx(2.5 - half, rel=1e-5)
    assert interval.high == pytest.approx(2.5 + half, rel=1e-5)
    assert interval.n == 4 and not interval.spans_zero


def test_proportion_interval_by_hand():
    # p = 1/4 of 4: se = √(0.25 · 0.75 / 4) = 0.216506
    interval = proportion_interval([True, False, False, False], confidence=0.95)
    assert interval.estimate == 0.25
    assert interval.high - interval.estimate == pytest.approx(1.959964 * 0.216506, rel=1e-5)
    assert interval.spans_zero  # 0.25 − 0.424 < 0


def test_paired_bootstrap_of_two_differences_covers_exactly_their_range():
    # d = [1, 3]: a resampled mean is 1, 2 or 3 with probabilities 1/4, 1/2, 1/4, so the 95% percentile interval is [1, 3].
    interval = paired_bootstrap([0, 0], [1, 3], seed=3)
    assert (interval.estimate, interval.low, interval.high) == (2.0, 1.0, 3.0)


def test_paired_bootstrap_pairs_the_examples():
    # Large per-example spread, identical shift of +1 for every example: the paired interval is exactly [1, 1].
    before = [-50.0, 3.0, 20.0, 100.0, 7.0]
    interval = paired_bootstrap(before, [value + 1.0 for value in before])
    assert (interval.low, interval.high) == pytest.approx((1.0, 1.0))


def test_paired_bootstrap_is_seeded():
    before, after = [0.1, 0.5, -0.2, 0.3, 0.0, 0.9], [0.3, 0.1, 0.4, 0.2, 0.6, 0.5]
    assert paired_bootstrap(before, after, seed=7) == paired_bootstrap(before, after, seed=7)
    assert paired_bootstrap(before, after, seed=7) != paired_bootstrap(before, after, seed=8)


def test_verdicts():
    assert verdict([0, 0, 0], [1, 2, 1], "higher") == "✓ rose"
    assert verdict([0, 0, 0], [1, 2, 1], "lower") == "✗ rose"
    assert verdict([1, 2, 1], [0, 0, 0], "lower") == "✓ fell"
    assert verdict([1, 2, 1], [0, 0, 0], "higher") == "✗ fell"
    assert verdict([0, 0], [-1, 1], "higher") == NO_CLEAR_CHANGE  # the interval [-1, 1] spans zero
    assert verdict([0.5, 0.5], [0.5, 0.5], "higher") == NO_CLEAR_CHANGE
    with pytest.raises(ValueError):
        verdict_from_interval(mean_difference_interval([0], [1]), "up")


def test_unpaired_lengths_are_refused():
    with pytest.raises(ValueError):
        paired_bootstrap([1, 2], [1])
