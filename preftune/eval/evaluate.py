"""Validation: preference accuracy, reward margins and answer log-probs of the policy on held-out pairs."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from preftune.data.collate import collate_pairs
from preftune.losses import Loss, PairLogps
from preftune.logprobs import SequenceLogps


@torch.no_grad()
def evaluate_pairs(
    pairs: Sequence,
    *,
    loss: Loss,
    policy_logps: Callable[[object], SequenceLogps],
    reference_logps: Callable[[object], SequenceLogps] | None,
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Per-pair results over `pairs` ([pairs] each): the loss's metrics plus `loss`, `logps/chosen`, `logps/rejected`.

    `logps/*` are per-token means, so they compare across answers of different lengths.
    """
    collected: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(pairs), batch_size):
        batch = collate_pairs(pairs[start : start + batch_size], pad_id=pad_id).to(device)
        chosen, rejected = policy_logps(batch).by_answer(2)
        reference = None
        if reference_logps is not None:
            reference = PairLogps(*reference_logps(batch).by_answer(2))
        output = loss(PairLogps(chosen, rejected), reference)
        values = {"loss": output.losses, "logps/chosen": chosen.mean, "logps/rejected": rejected.mean, **output.metrics}
        for key, value in values.items():
            collected.setdefault(key, []).append(value.detach().float().cpu())
    return {key: torch.cat(parts) for key, parts in collected.items()}


def summarize_evaluation(per_pair: dict[str, torch.Tensor], prefix: str = "eval/") -> dict[str, float]:
    """Means of every per-pair value, plus the fraction of pairs the policy ranks the wrong way."""
    summary = {f"{prefix}{key}": value.mean().item() for key, value in per_pair.items()}
    if "rewards/margins" in per_pair:
        summary[f"{prefix}negative_margin_fraction"] = (per_pair["rewards/margins"] < 0).float().mean().item()
    summary[f"{prefix}num_pairs"] = float(len(per_pair["loss"]))
    return summary
