"""Hold out a validation set from one list of pairs, reproducibly."""

from __future__ import annotations

import random
from typing import TypeVar

from preftune.errors import ConfigError

T = TypeVar("T")


def split_train_validation(pairs: list[T], validation: float | int, seed: int) -> tuple[list[T], list[T]]:
    """(train, validation): a seeded random subset held out, both halves in their original order.

    `validation` is a fraction in [0, 1) or a count (int >= 0); 0 holds out nothing. A positive
    request never yields an empty validation set when there are at least 2 pairs (a fraction
    rounds up to 1); one that would leave no training pairs is a `ConfigError`.
    """
    if isinstance(validation, bool) or not isinstance(validation, (int, float)):
        raise ConfigError(f"validation split must be a fraction in [0, 1) or a count, got {validation!r}")
    if isinstance(validation, float):
        if not 0.0 <= validation < 1.0:
            raise ConfigError(f"a fractional validation split must be in [0, 1), got {validation}")
        count = max(1, round(validation * len(pairs))) if validation > 0 else 0
    else:
        if validation < 0:
            raise ConfigError(f"a validation count cannot be negative, got {validation}")
        count = validation
    if count >= len(pairs) and count > 0:
        raise ConfigError(f"holding out {count} of {len(pairs)} pairs for validation would leave none to train on")

    held_out = set(random.Random(seed).sample(range(len(pairs)), count))
    train = [pair for index, pair in enumerate(pairs) if index not in held_out]
    validation_pairs = [pair for index, pair in enumerate(pairs) if index in held_out]
    return train, validation_pairs
