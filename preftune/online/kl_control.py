"""KL-coefficient controllers for PPO's per-token KL penalty r_t − β · KL_t (Ziegler et al. 2019).

Plain classes with JSON-able `state_dict()` / `load_state_dict()` so a checkpoint can restore β exactly.
"""

from __future__ import annotations

from typing import Any

from preftune.errors import CheckpointError, ConfigError


class FixedKLController:
    """β stays at its initial value; `update` is a no-op so both controllers are used the same way."""

    kind = "fixed"

    def __init__(self, value: float):
        if value < 0:
            raise ConfigError(f"the KL coefficient must be >= 0, got {value}")
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al. (2019), eq. 2: move β so the measured KL tracks a target.

        e   = clip(KL / target − 1, −0.2, 0.2)
        β  ← β · (1 + e · n_steps / horizon)

    `n_steps` is how many samples (or steps, in the caller's unit) the measured KL covers;
    `horizon` sets how fast β reacts (10 000 in the paper, counted in samples).
    """

    kind = "adaptive"
    ERROR_CLIP = 0.2

    def __init__(self, init_value: float, *, target: float, horizon: int):
        if init_value <= 0:
            raise ConfigError(f"the adaptive KL coefficient must start > 0 (it only scales), got {init_value}")
        if target <= 0 or horizon <= 0:
            raise ConfigError(f"the KL target and horizon must be > 0, got target={target}, horizon={horizon}")
        self.value = float(init_value)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1, -self.ERROR_CLIP), self.ERROR_CLIP)
        self.value *= 1 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, self.kind)
        if (float(state["target"]), int(state["horizon"])) != (self.target, self.horizon):
            raise CheckpointError(
                f"the checkpoint's adaptive KL controller has target={state['target']}, horizon={state['horizon']}; "
                f"this run has target={self.target}, horizon={self.horizon}"
            )
        self.value = float(state["value"])


def _check_kind(state: dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise CheckpointError(f"the checkpoint holds a {state.get('kind')!r} KL controller, this run uses {kind!r}")
