"""The long-run memory check, short: 300 steps with evaluation and checkpoints on, RSS must not trend up.

Marked `slow` (minutes on a shared 2-core machine), so `pytest -q` skips it; run it with
`pytest -m slow tests/test_long_run_memory.py`, or the full check with `python -m benchmarks.long_run_memory`.
"""

from __future__ import annotations

import pytest

from benchmarks.long_run_memory import measure, slope


def test_slope_is_the_least_squares_slope():
    assert slope([(0, 1), (1, 3), (2, 5)]) == 2.0
    assert slope([(0, 0), (1, 1), (2, 0), (3, 1)]) == pytest.approx(0.2)


@pytest.mark.slow
def test_memory_does_not_grow_over_300_steps(tmp_path):
    result = measure(300, every=10, tolerance_mb=20.0, workdir=tmp_path)
    assert [step for step, _ in result.samples] == list(range(10, 301, 10))
    assert result.passed, f"RSS grew {result.growth_mb} MB over steps 150-300 ({result.slope_kb_per_step} KB/step)"
