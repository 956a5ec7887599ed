"""The methods registry. Adding a method = one module with a `METHOD` declaration + one line in `_METHODS` + tests."""

from __future__ import annotations

from preftune.errors import ConfigError
from preftune.methods import contrastive_cpo, cpo, dpo, grpo, hinge, ipo, kto, orpo, ppo, reward_model, robust, sft, simpo
from preftune.methods.base import DataShape, Method, MethodSettings, PairLogps, UnpairedLogps

_METHODS: list[Method] = [
    dpo.METHOD, ipo.METHOD, hinge.METHOD, robust.METHOD, simpo.METHOD, orpo.METHOD, kto.METHOD, sft.METHOD,
    cpo.METHOD, contrastive_cpo.METHOD, grpo.METHOD, ppo.METHOD, reward_model.METHOD,
]
METHODS: dict[str, Method] = {method.name: method for method in _METHODS}
# `cpo` is preftune's CONSTRAINED DPO; TRL's contrastive CPO is `contrastive_cpo` (docs/CPO.md).
ALIASES: dict[str, str] = {alias: method.name for method in _METHODS for alias in method.aliases}


def get_method(loss_type: str) -> Method:
    name = ALIASES.get(loss_type, loss_type)
    if name not in METHODS:
        known = ", ".join(sorted([*METHODS, *ALIASES]))
        raise ConfigError(f"unknown loss_type '{loss_type}'; choose one of: {known}")
    return METHODS[name]


__all__ = ["ALIASES", "METHODS", "DataShape", "Method", "MethodSettings", "PairLogps", "UnpairedLogps", "get_method"]
