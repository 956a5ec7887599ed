"""Holding out a validation set: deterministic, order-preserving, never silently empty."""

from __future__ import annotations

import pytest

from preftune.data import split_train_validation
from preftune.errors import ConfigError

ITEMS = list(range(100))


def test_split_is_deterministic_per_seed_and_partitions_the_pairs():
    train, validation = split_train_validation(ITEMS, 0.1, seed=42)
    assert (train, validation) == split_train_validation(ITEMS, 0.1, seed=42)
    assert len(validation) == 10 and len(train) == 90
    assert sorted(train + validation) == ITEMS
    assert train == sorted(train) and validation == sorted(validation)  # original order kept
    assert split_train_validation(ITEMS, 0.1, seed=43)[1] != validation
    assert validation != ITEMS[:10] and validation != ITEMS[-10:]  # shuffled, not a slice


def test_count_and_small_fraction():
    assert len(split_train_validation(ITEMS, 7, seed=0)[1]) == 7
    train, validation = split_train_validation(["a", "b"], 0.01, seed=0)  # rounds up to one pair
    assert len(validation) == 1 and len(train) == 1
    assert split_train_validation(ITEMS, 0, seed=0) == (ITEMS, [])
    assert split_train_validation(ITEMS, 0.0, seed=0) == (ITEMS, [])


@pytest.mark.parametrize("validation", [1.0, -0.5, 100, 150, -1, True, "0.1"])
def test_invalid_or_train_emptying_requests_raise(validation):
    with pytest.raises(ConfigError):
        split_train_validation(ITEMS, validation, seed=0)
