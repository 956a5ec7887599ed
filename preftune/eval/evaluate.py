"""Validation: preference accuracy, reward margins and answer log-probs of the policy on held-out examples."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from preftune.losses import ExampleLayout, Loss
from preftune.logprobs import SequenceLogps


@torch.no_grad()
def evaluate_examples(
    examples: Sequence,
    *,
    loss: Loss,
    layout: ExampleLayout,
    policy_logps: Callable[[object], SequenceLogps],
    reference_logps: Callable[[object], SequenceLogps] | None,
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Per-example results ([examples] each): the loss's metrics plus `loss` and the answers' `logps/*`.

    Examples are pairs or unpaired examples, as `layout` (the method's) packs them. `logps/*`
    (`chosen`, `rejected` for pairs, `completion` for unpaired examples) are per-token means, so
    they compare across answers of different lengths.
    """
    collected: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = layout.collate(chunk, pad_id=pad_id).to(device)
        policy = layout.split(policy_logps(batch), chunk)
        reference = layout.split(reference_logps(batch), chunk) if reference_logps is not None else None
        output = loss(policy, reference)
        values = {"loss": output.losses, **policy.answer_logps(), **output.metrics}
        for key, value in values.items():
            collected.setdefault(key, []).append(value.detach().float().cpu())
    return {key: torch.cat(parts) for key, parts in collected.items()}


# Reward margins this close to 0 are ties: cached reference log-probs come from a differently packed
# batch, so a policy equal to its reference shows float noise of this order, not a ranking.
TIE_TOLERANCE = 1e-4


def summarize_evaluation(per_pair: dict[str, torch.Tensor], prefix: str = "eval/") -> dict[str, float]:
    """Means of every per-pair value, plus the fraction of pairs the policy ranks the wrong way."""
    summary = {f"{prefix}{key}": value.mean().item() for key, value in per_pair.items()}
    if "rewards/margins" in per_pair:
        summary[f"{prefix}negative_margin_fraction"] = (per_pair["rewards/margins"] < -TIE_TOLERANCE).float().mean().item()
    summary[f"{prefix}num_pairs"] = float(len(per_pair["loss"]))
    return summary
