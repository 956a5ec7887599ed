"""Validation: per-example results of a method on held-out examples, and their summary.

Per-example rows are what the run folder keeps (`preftune.runfolder`, evaluations/step-N.jsonl);
every summary number is computed from them, so a report rebuilt from the folder shows the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from preftune.logprobs import SequenceLogps
from preftune.methods.base import ExampleLayout, Loss

# Margins this close to 0 are ties, for every metric: cached reference log-probs come from a
# differently packed batch, so a policy equal to its reference shows float noise of this order.
TIE_TOLERANCE = 1e-4


@torch.no_grad()
def evaluate_examples(
    examples: Sequence,
    *,
    loss: Loss,
    loss_inputs: dict[str, Any],
    layout: ExampleLayout,
    policy_logps: Callable[[object], SequenceLogps],
    reference_logps: Callable[[object], SequenceLogps] | None,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    first_index: int = 0,
    index_stride: int = 1,
) -> list[dict[str, Any]]:
    """One row per example (see preftune/runfolder.py for the keys), in the order of `examples`.

    `first_index`/`index_stride` number the rows when each process evaluates a strided shard.
    """
    rows: list[dict[str, Any]] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        batch = layout.collate(chunk, pad_id=pad_id).to(device)
        policy_raw = policy_logps(batch)
        reference_raw = reference_logps(batch) if reference_logps is not None else None
        policy = layout.split(policy_raw, chunk, batch)
        reference = layout.split(reference_raw, chunk, batch) if reference_raw is not None else None
        output = loss(policy, reference, **loss_inputs)
        per_example = {"loss": output.losses, **output.metrics}
        per_example = {key: value.detach().float().cpu().tolist() for key, value in per_example.items()}
        answers = layout.answers
        policy_sums = policy_raw.sum.detach().float().cpu().reshape(-1, len(chunk))[:answers]
        counts = policy_raw.count.cpu().reshape(-1, len(chunk))[:answers]
        reference_sums = (
            reference_raw.sum.detach().float().cpu().reshape(-1, len(chunk))[:answers] if reference_raw is not None else None
        )
        for offset, example in enumerate(chunk):
            row: dict[str, Any] = {
                "example": first_index + (start + offset) * index_stride,
                "origin": example.source,
                "prompt_tokens": len(example.prompt_ids),
                "answer_tokens": [int(c) for c in counts[:, offset].tolist()],
                "policy_logps": policy_sums[:, offset].tolist(),
                "reference_logps": reference_sums[:, offset].tolist() if reference_sums is not None else None,
            }
            if example.labels is not None:
                row["labels"] = [bool(label) for label in example.labels[:answers]]
            row.update({key: values[offset] for key, values in per_example.items()})
            rows.append(row)
    return rows


def summarize_evaluation(rows: list[dict[str, Any]], prefix: str = "eval/") -> dict[str, float]:
    """Means of every per-example value, per-token answer log-probs, and the ranking fractions.

    One tie rule for every ranking number: a margin within ±TIE_TOLERANCE is a tie, counted
    neither right nor wrong. `rewards/accuracies` = share of margins > tol, `negative_margin_fraction`
    = share < −tol (the implicit-reward margin, from summed log-probs), and
    `negative_margin_fraction_per_token` uses the length-normalised margin
    (mean log πθ(c) − mean log πθ(r)) − (mean log πref(c) − mean log πref(r)), the quantity CPO's
    constraint acts on with `length_normalize: true`.
    """
    if not rows:
        return {}
    numeric = [key for key, value in rows[0].items() if isinstance(value, (int, float)) and key not in ("example", "prompt_tokens")]
    summary = {f"{prefix}{key}": sum(row[key] for row in rows) / len(rows) for key in numeric}
    answers = len(rows[0]["answer_tokens"])
    names = ["chosen", "rejected"] if answers == 2 else ["completion"]
    for slot, name in enumerate(names):
        summary[f"{prefix}logps/{name}"] = sum(row["policy_logps"][slot] / row["answer_tokens"][slot] for row in rows) / len(rows)
        if rows[0]["reference_logps"] is not None:
            # The same examples every evaluation: a moving value means the reference is not frozen.
            summary[f"{prefix}reference/logps/{name}"] = (
                sum(row["reference_logps"][slot] / row["answer_tokens"][slot] for row in rows) / len(rows)
            )
    if "rewards/margins" in rows[0]:
        margins = torch.tensor([row["rewards/margins"] for row in rows])
        summary[f"{prefix}rewards/accuracies"] = (margins > TIE_TOLERANCE).float().mean().item()
        summary[f"{prefix}negative_margin_fraction"] = (margins < -TIE_TOLERANCE).float().mean().item()
        summary[f"{prefix}tie_fraction"] = (margins.abs() <= TIE_TOLERANCE).float().mean().item()
    if answers == 2 and rows[0]["reference_logps"] is not None:
        per_token = torch.tensor([per_token_margin(row) for row in rows])
        summary[f"{prefix}negative_margin_fraction_per_token"] = (per_token < -TIE_TOLERANCE).float().mean().item()
    summary[f"{prefix}num_pairs"] = float(len(rows))
    return summary


def per_token_margin(row: dict[str, Any]) -> float:
    """The length-normalised policy-minus-reference margin of one paired evaluation row."""
    (pc, pr), (rc, rr), (nc, nr) = row["policy_logps"], row["reference_logps"], row["answer_tokens"]
    return (pc / nc - pr / nr) - (rc / nc - rr / nr)
