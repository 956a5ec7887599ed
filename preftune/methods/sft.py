"""SFT on the chosen answers: the reward-free baseline."""

from __future__ import annotations

from preftune.losses.sft import sft_loss
from preftune.methods.base import Method, MethodSettings, PolicyOnlyLoss, means

METHOD = Method(
    name="sft",
    summary="SFT baseline: −per-token log-prob of the chosen answer; rejected answers only scored",
    settings=MethodSettings,
    needs_reference=False,
    build_loss=lambda s: PolicyOnlyLoss(sft_loss, means, {}),
)
