"""The projection step a method may ask for (`ProjectionSpec`, CPO's `projection_steps`), run by the
loop right after each optimiser step.

Up to `spec.steps` plain-SGD steps on the mean penalty over the optimiser step's examples, on the
same micro-batches, until none of them is violated. Each pass is one forward per micro-batch that
both counts the violated examples and, while steps remain, backpropagates
`sum(penalty) × world_size / examples_in_step` as the main step does; gradients are all-reduced and
clipped to `max_grad_norm` like the main step's. The optimiser's state (Adam's moments, its step
count) and the schedule are untouched.

Non-finite values never land: a pass whose gradient norm is not finite is not applied, and a step
after which some example's penalty is not finite is undone exactly (the trainable weights before it
are kept until the next pass has checked it: one more copy of the trainable weights, small under
LoRA); either ends the projection and is reported as `problem`, which the loop turns into an alert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from preftune.methods.base import ProjectionSpec


@dataclass(frozen=True)
class ProjectionResult:
    metrics: dict[str, float]
    steps_taken: int
    problem: str | None  # what stopped the projection early, when something was not finite


def project(trainer: Any, spec: ProjectionSpec, shards: list[list], examples_in_step: int) -> ProjectionResult:
    """Project the policy of `trainer` (the loop's `Trainer`: its micro-batch forward, reductions, optimiser)
    toward the feasible region of `spec` on the step's micro-batches."""
    device = trainer.accelerator.device
    taken, before, problem = 0, None, None
    previous: list[torch.Tensor] | None = None  # the weights before the last step, until the pass after it checked it
    checked = 0.0  # the violated fraction of the last pass whose penalties were all finite
    while True:
        descend = taken < spec.steps
        counts = {"violated": torch.zeros((), device=device), "nonfinite": torch.zeros((), device=device)}
        for shard in shards:
            if not shard:
                continue
            with torch.set_grad_enabled(descend):
                policy, reference = trainer.micro_batch_logps(shard)
                flags = spec.violated(policy, reference)
                penalty = spec.penalty(policy, reference)
                counts["violated"] += flags.float().sum().detach()
                counts["nonfinite"] += (~torch.isfinite(penalty.detach())).float().sum()
                # A shard with no violated example has a zero penalty and a zero gradient: skip its backward.
                if descend and bool(flags.any()):
                    trainer.accelerator.backward(penalty.sum() * trainer.world_size / examples_in_step)
        totals = trainer.sum_across_processes(counts)
        after = totals["violated"].item() / examples_in_step
        if totals["nonfinite"].item() > 0:
            if previous is not None:  # undo the step that made it non-finite, exactly
                with torch.no_grad():
                    for parameter, kept in zip(trainer.trainable, previous):
                        parameter.copy_(kept)
                taken -= 1
                after = checked
            problem = "a non-finite penalty"
            trainer.optimizer.zero_grad(set_to_none=True)
            break
        checked = after
        before = after if before is None else before
        if after == 0.0 or not descend:
            trainer.optimizer.zero_grad(set_to_none=True)
            break
        trainer.all_reduce_gradients()
        norm = trainer.clip_gradients().item()
        if not math.isfinite(norm):
            problem = f"gradient norm {norm}"
            trainer.optimizer.zero_grad(set_to_none=True)
            break
        with torch.no_grad():
            previous = [parameter.detach().clone() for parameter in trainer.trainable]
            for parameter in trainer.trainable:
                if parameter.grad is not None:
                    parameter.add_(parameter.grad, alpha=-spec.lr)
        trainer.optimizer.zero_grad(set_to_none=True)
        taken += 1
    metrics = {
        "projection/steps_taken": float(taken),
        "projection/violated_before": before if before is not None else after,
        "projection/violated_after": after,
    }
    if problem is not None:
        metrics["projection/nonfinite"] = 1.0
    return ProjectionResult(metrics, taken, problem)
