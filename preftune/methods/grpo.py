"""GRPO (Shao et al. 2024, DeepSeekMath) as a method of the one training loop, with the DAPO and
Dr. GRPO variants (decoupled clip range, token-level or constant-length aggregation, no std scaling).

Data: prompt-only records (`DataShape.PROMPTS`; a paired file's prompts also work). Per optimiser
step the rollout turns each micro-batch of prompts into GROUP examples:

    generate G completions per prompt (adapter on; seeded by (seed, step))
    → rewards r (the configured terms, weighted) stored as the group's scores
    → πold per-token log-probs through the engine when num_iterations > 1

and the loss (per example = per prompt group) is

    A_i = (r_i − mean r) / (std r + eps)      (scale_std: false drops the division)
    ℓ_i,t = −min(ρ A_i, clip(ρ, 1 − ε_low, 1 + ε_high) A_i) + β KL_k3(πθ ‖ πref)_i,t

aggregated per group so that the loop's per-example scaling (Σ_examples loss_e / examples_in_step)
reproduces each mode exactly over the whole step:

    sequence: loss_e = (1/G) Σ_i (1/|o_i|) Σ_t ℓ_i,t
    token:    loss_e = Σ_i Σ_t ℓ_i,t · n / N      (n prompts, N completion tokens of the step on this process)
    dr_grpo:  loss_e = Σ_i Σ_t ℓ_i,t / (G · max_new_tokens)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from preftune.data.records import TokenizedExample
from preftune.losses import LossOutput
from preftune.losses.aggregation import masked_mean, masked_sum
from preftune.losses.grpo import grpo_loss, k3_kl
from preftune.methods.base import (
    DataShape, GroupLogps, Method, MethodSettings, RolloutContext, RolloutReuse, collate_groups, per_token_matrix,
)
from preftune.online.advantages import group_advantages
from preftune.online.generation import GenerationSettings, generate
from preftune.online.rewards import CombinedReward, RewardTerm, check_reward_columns, validate_reward_terms


@dataclass(frozen=True)
class RolloutGroup(TokenizedExample):
    """A prompt with its G generated answers. `scores` are the total rewards; `reward_terms` each term's
    unweighted rewards; `old_logps` πold's per-token log-probs per answer (None = one update per rollout,
    πold = πθ); `token_weight` = n / N for token aggregation; `stopped` per answer (False = cut by max_new_tokens);
    `entropy` per answer: the policy's mean next-token entropy over the answer at generation (nats)."""

    reward_terms: dict[str, tuple[float, ...]] = field(default_factory=dict)
    old_logps: tuple[tuple[float, ...], ...] | None = None
    token_weight: float = 1.0
    stopped: tuple[bool, ...] = ()
    entropy: tuple[float, ...] = ()


class GRPOSettings(MethodSettings):
    num_generations: int = Field(4, ge=2, description="G: completions per prompt (the group advantages need G >= 2)")
    generation: GenerationSettings = Field(
        default_factory=lambda: GenerationSettings(max_new_tokens=64),
        description="how completions are sampled (docs/ONLINE.md); num_return_sequences is num_generations",
    )
    rewards: list[RewardTerm] = Field(
        default_factory=lambda: validate_reward_terms([{"function": "length", "target": 50}]),
        description="reward terms summed with their weights: built-ins (regex, length, exact_match, contains, "
        "reward_model) or 'package.module:function' (docs/ONLINE.md); the default, a 50-word length target, is a placeholder",
    )
    beta: float = Field(0.04, ge=0.0, description="β: weight of the k3 KL to the reference; 0 = no reference is built")
    epsilon_low: float = Field(0.2, ge=0.0, description="ε_low: the ratio is clipped below at 1 − ε_low")
    epsilon_high: float | None = Field(None, ge=0.0, description="ε_high: clipped above at 1 + ε_high (DAPO: 0.28); null = ε_low")
    aggregation: Literal["sequence", "token", "dr_grpo"] = Field(
        "sequence", description="sequence = GRPO (mean per completion), token = DAPO (mean per token), dr_grpo = Σ / (G · max_new_tokens)"
    )
    scale_std: bool = Field(True, description="divide the group-centred reward by its std (GRPO); false = Dr. GRPO")
    num_iterations: int = Field(
        1, ge=1, description="policy updates per rollout batch (μ): step s trains on the rollout of step μ·⌊s/μ⌋ with the clipped ratio"
    )

    @field_validator("rewards", mode="before")
    @classmethod
    def _rewards(cls, value: Any) -> Any:
        return validate_reward_terms(value, key="method.rewards") if isinstance(value, list) else value

    @model_validator(mode="after")
    def _sampling(self) -> GRPOSettings:
        if self.generation.temperature == 0:
            raise ValueError("generation.temperature 0 (greedy) gives G identical completions and zero advantages: sample (> 0)")
        if self.generation.num_return_sequences not in (1, self.num_generations):
            raise ValueError("generation.num_return_sequences is set by num_generations: leave it out")
        return self

    def sampling(self) -> GenerationSettings:
        return self.generation.model_copy(update={"num_return_sequences": self.num_generations})


def rollout_seed(seed: int, step: int, evaluation: bool) -> int:
    """The generation seed of one rollout: a pure function of (seed, step), another stream for validation."""
    return (seed * 1_000_003 + step) * 2 + int(evaluation)


class GRPORollout:
    """Prompts → GROUP examples (see the module docstring). Keeps the last training rollout for num_iterations > 1."""

    def __init__(self, settings: GRPOSettings):
        self.settings = settings
        self.reward = CombinedReward.from_terms(settings.rewards)
        self.reuse = RolloutReuse(settings.num_iterations)

    def __call__(self, context: RolloutContext, micro_batches: list[list[Any]]) -> list[list[RolloutGroup]]:
        if (kept := self.reuse.reused(context)) is not None:
            return kept
        block = self.reuse.block(context.step)
        groups = self._generate(context, micro_batches, seed=rollout_seed(context.seed, block, context.evaluation))
        if self.settings.num_iterations > 1 and not context.evaluation:
            groups = [self._with_old_logps(context, batch) for batch in groups]
        self.reuse.keep(context, groups)
        return groups

    def _generate(self, context: RolloutContext, micro_batches: list[list[Any]], *, seed: int) -> list[list[RolloutGroup]]:
        flat = [example for batch in micro_batches for example in batch]
        G = self.settings.num_generations
        generations = generate(context.policy, context.tokenizer, [e.prompt_ids for e in flat], self.settings.sampling(), seed=seed)
        prompts = context.tokenizer.batch_decode([e.prompt_ids for e in flat], skip_special_tokens=True)
        scores = self.reward.score(
            [prompts[i] for i in generations.prompt_index], generations.texts, **self.reward.columns_for(flat, generations.prompt_index)
        )
        tokens = sum(len(ids) for ids in generations.completion_ids)
        token_weight = len(flat) / max(tokens, 1)
        groups = []
        for index, example in enumerate(flat):
            rows = range(index * G, (index + 1) * G)
            groups.append(RolloutGroup(
                example.prompt_ids,
                tuple(generations.completion_ids[row] for row in rows),
                scores=tuple(scores.total[row] for row in rows),
                provenance="synthetic",
                origin=example.origin,
                reward_terms={name: tuple(values[row] for row in rows) for name, values in scores.per_function.items()},
                token_weight=token_weight,
                stopped=tuple(generations.stopped[row] for row in rows),
                entropy=tuple(generations.entropy[row] for row in rows),
            ))
        sizes = [len(batch) for batch in micro_batches]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        return [groups[start : start + size] for start, size in zip(starts, sizes)]

    def _with_old_logps(self, context: RolloutContext, groups: list[RolloutGroup]) -> list[RolloutGroup]:
        if not groups:
            return groups
        batch = collate_groups(groups, pad_id=context.pad_id)
        logps = context.policy_logps(batch)
        tokens, mask = per_token_matrix(logps, batch.target_sequence.to(logps.token_logps.device), batch.num_examples, batch.answers_per_example)
        old = []
        for e, group in enumerate(groups):
            old.append(tuple(tuple(tokens[e, g, : len(ids)].tolist()) for g, ids in enumerate(group.answer_ids)))
        return [replace(group, old_logps=values) for group, values in zip(groups, old)]


class GRPOLoss:
    """Per-example (per prompt group) GRPO loss from `GroupLogps`; see the module docstring."""

    def __init__(self, settings: GRPOSettings):
        self.settings = settings

    def __call__(self, policy: GroupLogps, reference: GroupLogps | None) -> LossOutput:
        s = self.settings
        E, G, T = policy.tokens.shape
        groups: list[RolloutGroup] = list(policy.examples)
        device = policy.tokens.device
        rewards = torch.tensor([group.scores for group in groups], dtype=torch.float32, device=device)  # [E, G]
        advantages = group_advantages(rewards.reshape(-1), G, scale_std=s.scale_std)
        mask = policy.mask.reshape(E * G, T)
        old = _old_logps(groups, G, T, device) if groups[0].old_logps is not None else None
        reference_tokens = reference.tokens.reshape(E * G, T) if reference is not None and s.beta > 0 else None
        logps = policy.tokens.reshape(E * G, T)
        output = grpo_loss(
            logps, advantages, mask, old_logps=old, reference_logps=reference_tokens, beta=s.beta,
            epsilon_low=s.epsilon_low, epsilon_high=s.epsilon_high, aggregation="token",
        )
        per_token = output.per_token.view(E, G, T)
        mask3 = policy.mask
        if s.aggregation == "sequence":
            losses = masked_mean(per_token, mask3, dim=2).mean(dim=1)
        elif s.aggregation == "token":
            weights = torch.tensor([group.token_weight for group in groups], device=device)
            losses = masked_sum(per_token, mask3, dim=2).sum(dim=1) * weights
        else:
            losses = masked_sum(per_token, mask3, dim=2).sum(dim=1) / (G * s.generation.max_new_tokens)

        metrics = {
            "reward": rewards.mean(dim=1),
            "reward_std": rewards.std(dim=1),
            "completion_length": mask3.sum(dim=2).mean(dim=1),
            "completion_stopped": torch.tensor([sum(g.stopped) / G if g.stopped else 1.0 for g in groups], device=device),
            "advantage_abs": advantages.view(E, G).abs().mean(dim=1),
            # the rollout policy's mean next-token entropy (nats), from generation's logits: no extra forward
            "entropy": torch.tensor([sum(g.entropy) / G if g.entropy else 0.0 for g in groups], device=device),
        }
        for name in groups[0].reward_terms:
            metrics[f"reward/{name}"] = torch.tensor([sum(g.reward_terms[name]) / G for g in groups], device=device)
        if reference_tokens is not None:
            kl = k3_kl(logps.detach(), reference_tokens).view(E, G, T)
            metrics["kl"] = masked_sum(kl, mask3, dim=(1, 2)) / mask3.sum(dim=(1, 2)).clamp(min=1)
        old_or_self = old if old is not None else logps.detach()
        ratio = torch.exp(logps.detach() - old_or_self).view(E, G, T)
        spread = advantages.view(E, G, 1).expand(E, G, T)
        eps_high = s.epsilon_high if s.epsilon_high is not None else s.epsilon_low
        clipped = ((ratio < 1 - s.epsilon_low) & (spread < 0)) | ((ratio > 1 + eps_high) & (spread > 0))
        metrics["clip_ratio"] = masked_sum(clipped.float(), mask3, dim=(1, 2)) / mask3.sum(dim=(1, 2)).clamp(min=1)
        return LossOutput(losses, metrics)


def _old_logps(groups: list[RolloutGroup], G: int, T: int, device) -> torch.Tensor:
    old = torch.zeros(len(groups), G, T, device=device)
    for e, group in enumerate(groups):
        for g, values in enumerate(group.old_logps):
            old[e, g, : len(values)] = torch.tensor(values, device=device)
    return old.view(len(groups) * G, T)


METHOD = Method(
    name="grpo",
    summary=(
        "GRPO: G sampled completions per prompt, group-normalised rewards, clipped ratio + β·KL(k3) to the reference; "
        "DAPO/Dr. GRPO via aggregation, epsilon_high, scale_std (prompt-only data)"
    ),
    settings=GRPOSettings,
    build_loss=GRPOLoss,
    data_shape=DataShape.PROMPTS,
    needs_reference=lambda s: s.beta > 0,
    build_rollout=GRPORollout,
    check_examples=lambda s, examples: check_reward_columns(s.rewards, examples),
)

__all__ = ["GRPOLoss", "GRPORollout", "GRPOSettings", "METHOD", "RolloutGroup", "rollout_seed"]
