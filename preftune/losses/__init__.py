"""Preference losses: one pure function per module, and the registry the trainer looks them up in.

Adding a loss = one module with a pure function and a `SPEC`, one line in `_SPECS`, tests.
"""

from __future__ import annotations

from preftune.errors import ConfigError
from preftune.losses import contrastive_cpo, cpo, dpo, hinge, ipo, kto, orpo, robust, sft, simpo
from preftune.losses.base import ExampleLayout, Loss, LossOutput, LossSpec, PairLogps, UnpairedLogps, reward_metrics

_SPECS: list[LossSpec] = [
    dpo.SPEC, ipo.SPEC, hinge.SPEC, robust.SPEC, simpo.SPEC, orpo.SPEC, kto.SPEC, sft.SPEC, cpo.SPEC, contrastive_cpo.SPEC,
]
# `cpo` is preftune's CONSTRAINED DPO; TRL's contrastive CPO is `contrastive_cpo` (docs/CPO.md).
ALIASES = {"dpo": "sigmoid", "constrained_dpo": "cpo"}
LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in _SPECS}


def get_loss_spec(loss_type: str) -> LossSpec:
    name = ALIASES.get(loss_type, loss_type)
    if name not in LOSSES:
        known = ", ".join(sorted([*LOSSES, *ALIASES]))
        raise ConfigError(f"unknown loss_type '{loss_type}'; choose one of: {known}")
    return LOSSES[name]


__all__ = [
    "LOSSES", "ALIASES", "ExampleLayout", "Loss", "LossOutput", "LossSpec", "PairLogps", "UnpairedLogps", "get_loss_spec",
    "reward_metrics",
]
