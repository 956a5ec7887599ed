"""IPO (Azar et al. 2023): a squared loss on the per-token log-ratio margin."""

from __future__ import annotations

from preftune.losses.ipo import ipo_loss
from preftune.methods.base import BetaSettings, Method, ReferenceRatioLoss, means

METHOD = Method(
    name="ipo",
    summary="IPO: (per-token log-ratio margin − 1/(2β))²; bounded, for near-deterministic preferences",
    settings=BetaSettings,
    build_loss=lambda s: ReferenceRatioLoss(ipo_loss, means, {"beta": s.beta}),
)
