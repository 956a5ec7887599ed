"""PPO for RLHF (Schulman et al. 2017; Ziegler et al. 2019; InstructGPT) as a method of the one loop.

The policy gets a value head (a linear layer on the final hidden states the engine returns with
`hidden_states=True`). Per rollout batch (one per `ppo_epochs` optimiser steps):

    generate one completion per prompt (adapter on; seeded by (seed, step)) → reward r (the terms)
    πold log-probs and values V_old, πref log-probs (engine, no gradient)
    r_t = r · [t = last] − β (log πold − log πref)_t          (β from the KL controller)
    A, R = GAE(r_t, V_old; γ, λ);  A whitened over the step's tokens

and each micro-batch's loss per example (token mean over its completion, `ppo_loss`'s terms):

    ℓ_t = max(−A ρ, −A clip(ρ, 1 ± ε)) + c_v · ½ max((V − R)², (V_old + clip(V − V_old, ±ε_v) − R)²)

Logged besides the losses: `policy/entropy`, the rollout policy's mean next-token entropy over each
completion (nats, from the logits generation computed; no extra forward), and
`value/explained_variance` = 1 − Var(R − V_old) / Var(R) over the step's completion tokens (the
value head's fit to the returns it is trained on: 1 = perfect, 0 = no better than the mean, < 0
worse; CleanRL's and TRL's `explained_variance`).

The KL coefficient is a controller (`KLCoefficient`, fixed or adaptive, its state checkpointed)
that reads the step's measured KL and hands β to the next rollout through the loss inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from pydantic import Field

from preftune.control import Controller
from preftune.data.collate import PackedBatch
from preftune.data.records import TokenizedExample
from preftune.logprobs import SequenceLogps, sequence_logps
from preftune.losses import LossOutput
from preftune.losses.aggregation import masked_mean
from preftune.losses.ppo import explained_variance
from preftune.methods.base import (
    LAYOUTS, DataShape, ExampleLayout, GroupLogps, Method, MethodSettings, RolloutContext, RolloutReuse, collate_groups,
    per_token_matrix, token_matrix,
)
from preftune.methods.grpo import rollout_seed
from preftune.online.advantages import gae, reward_at_last_token
from preftune.online.generation import GenerationSettings, generate
from preftune.online.kl_control import AdaptiveKLController, FixedKLController
from preftune.online.rewards import CombinedReward, RewardTerm, check_reward_columns, validate_reward_terms

VALUE_HEAD = "value_head"


@dataclass(frozen=True)
class PPOSample(TokenizedExample):
    """A prompt with its one generated completion and what the rollout computed for it, per token."""

    old_logps: tuple[float, ...] = ()
    old_values: tuple[float, ...] = ()
    advantages: tuple[float, ...] = ()
    returns: tuple[float, ...] = ()
    kl: float = 0.0  # Σ_t (log πold − log πref): the sequence's KL estimate
    entropy: float = 0.0  # the rollout policy's mean next-token entropy over the completion (nats)
    explained_variance: float = 0.0  # 1 − Var(R − V_old) / Var(R) over the step's completion tokens
    reward_terms: dict[str, float] = field(default_factory=dict)


class PPOSettings(MethodSettings):
    generation: GenerationSettings = Field(default_factory=lambda: GenerationSettings(max_new_tokens=64), description="how completions are sampled")
    rewards: list[RewardTerm] = Field(
        default_factory=lambda: validate_reward_terms([{"function": "length", "target": 50}]),
        description="reward terms (docs/ONLINE.md), e.g. a trained reward model: {function: reward_model, path: ...}",
    )
    kl_coef: float = Field(0.05, ge=0.0, description="β: initial weight of the per-token KL penalty in the reward")
    adaptive_kl: bool = Field(False, description="move β toward target_kl (Ziegler et al. 2019); false = fixed β")
    target_kl: float = Field(6.0, gt=0.0, description="the adaptive controller's target sequence KL")
    kl_horizon: int = Field(10000, ge=1, description="the adaptive controller's horizon, in samples")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="GAE discount γ")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE λ")
    clip_range: float = Field(0.2, gt=0.0, description="ε: policy ratio clip")
    value_clip_range: float = Field(0.2, gt=0.0, description="ε_v: value clip around V_old")
    value_coef: float = Field(0.1, ge=0.0, description="c_v: weight of the value loss")
    whiten_advantages: bool = Field(True, description="whiten the advantages over the step's completion tokens")
    ppo_epochs: int = Field(4, ge=1, description="optimiser steps per rollout batch: step s trains on the rollout of step k·⌊s/k⌋")

    def sampling(self) -> GenerationSettings:
        return self.generation.model_copy(update={"num_return_sequences": 1})


def attach_value_head(policy: torch.nn.Module, settings: PPOSettings, seed: int) -> None:
    """A `hidden → 1` linear value head, zero-initialised bias, weights seeded by `seed` (same in every run)."""
    hidden = policy.config.hidden_size
    dtype = next(policy.parameters()).dtype
    device = next(policy.parameters()).device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(hidden, 1).to(dtype=dtype)
        torch.nn.init.normal_(head.weight, std=1.0 / (hidden + 1))
        torch.nn.init.zeros_(head.bias)
    policy.add_module(VALUE_HEAD, head.to(device))


@dataclass
class ValuedLogps(SequenceLogps):
    values: torch.Tensor | None = None  # [targets]: V at each predicting position


def logps_and_values(model: torch.nn.Module, batch: PackedBatch) -> ValuedLogps:
    """The engine's per-token log-probs plus the value head on the same final hidden states."""
    logps = sequence_logps(model, batch, per_token=True, hidden_states=True)
    head = getattr(model, VALUE_HEAD)
    values = head(logps.hidden.to(head.weight.dtype)).squeeze(-1).float()
    return ValuedLogps(logps.sum, logps.count, logps.token_logps, None, values)


PPO_LAYOUT = ExampleLayout(
    LAYOUTS[DataShape.GROUP].collate, LAYOUTS[DataShape.GROUP].split, answers=None, per_token=True, forward=logps_and_values
)


class KLCoefficient(Controller):
    """β of PPO's KL penalty: handed to the rollout as the loss input `kl_coef`; adaptive β moves after each step."""

    name = "kl_coefficient"

    def __init__(self, settings: PPOSettings):
        self.controller = (
            AdaptiveKLController(settings.kl_coef, target=settings.target_kl, horizon=settings.kl_horizon)
            if settings.adaptive_kl else FixedKLController(settings.kl_coef)
        )

    def loss_inputs(self) -> dict[str, Any]:
        return {"kl_coef": self.controller.value}

    def on_step_end(self, context) -> dict[str, float]:
        if "kl" in context.metrics:
            self.controller.update(context.metrics["kl"], int(context.metrics.get("pairs", 1)))
        return {"kl_coef": self.controller.value}

    def state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state)


class PPORollout:
    def __init__(self, settings: PPOSettings):
        self.settings = settings
        self.reward = CombinedReward.from_terms(settings.rewards)
        self.reuse = RolloutReuse(settings.ppo_epochs)

    def __call__(self, context: RolloutContext, micro_batches: list[list[Any]]) -> list[list[PPOSample]]:
        if (kept := self.reuse.reused(context)) is not None:
            return kept
        block = self.reuse.block(context.step)
        if context.reference_logps is None:
            raise ValueError("PPO's KL penalty needs the reference")
        flat = [example for batch in micro_batches for example in batch]
        generations = generate(
            context.policy, context.tokenizer, [e.prompt_ids for e in flat], self.settings.sampling(),
            seed=rollout_seed(context.seed, block, context.evaluation),
        )
        prompts = context.tokenizer.batch_decode([e.prompt_ids for e in flat], skip_special_tokens=True)
        scores = self.reward.score(prompts, generations.texts, **self.reward.columns_for(flat, generations.prompt_index))
        samples = [
            PPOSample(example.prompt_ids, (generations.completion_ids[i],), scores=(scores.total[i],), provenance="synthetic",
                      origin=example.origin, entropy=generations.entropy[i], reward_terms={name: values[i] for name, values in scores.per_function.items()})
            for i, example in enumerate(flat)
        ]
        sizes = [len(batch) for batch in micro_batches]
        batches = [samples[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(len(sizes))]
        beta = float(context.inputs.get("kl_coef", self.settings.kl_coef))
        computed = [self._advantages(context, batch, beta) for batch in batches if batch]
        if self.settings.whiten_advantages and computed:
            everything = torch.cat([adv[mask.bool()] for _, adv, _, mask, _ in computed])
            mean, std = everything.mean(), everything.var(unbiased=False).add(1e-8).sqrt()
        variance_explained = step_explained_variance(
            torch.cat([values[mask.bool()] for _, _, _, mask, (values, _) in computed]),
            torch.cat([returns[mask.bool()] for _, _, returns, mask, _ in computed]),
        ) if computed else 0.0
        result, index = [], 0
        for batch in batches:
            if not batch:
                result.append([])
                continue
            logps, advantages, returns, mask, (values, kl) = computed[index]
            index += 1
            if self.settings.whiten_advantages:
                advantages = (advantages - mean) / std * mask
            rows = []
            for e, sample in enumerate(batch):
                n = int(mask[e].sum().item())
                rows.append(replace(
                    sample, old_logps=tuple(logps[e, :n].tolist()), old_values=tuple(values[e, :n].tolist()),
                    advantages=tuple(advantages[e, :n].tolist()), returns=tuple(returns[e, :n].tolist()), kl=float(kl[e].item()),
                    explained_variance=variance_explained,
                ))
            result.append(rows)
        self.reuse.keep(context, result)
        return result

    def _advantages(self, context: RolloutContext, batch: list[PPOSample], beta: float):
        packed = collate_groups(batch, pad_id=context.pad_id)
        policy = context.policy_logps(packed)
        reference = context.reference_logps(packed)
        sequences = packed.target_sequence.to(policy.token_logps.device)
        logps, mask = per_token_matrix(policy, sequences, packed.num_examples, 1)
        values, _ = token_matrix(policy.values, sequences, policy.count, packed.num_examples, 1)
        reference_tokens, _ = per_token_matrix(reference, sequences.to(reference.token_logps.device), packed.num_examples, 1)
        logps, mask, values = logps[:, 0], mask[:, 0], values[:, 0]
        kl_tokens = (logps - reference_tokens[:, 0].to(logps.device)) * mask
        score = torch.tensor([s.scores[0] for s in batch], device=logps.device)
        token_rewards = reward_at_last_token(score, mask) - beta * kl_tokens
        advantages, returns = gae(token_rewards, values, mask, gamma=self.settings.gamma, lam=self.settings.lam)
        return logps, advantages, returns, mask, (values, kl_tokens.sum(dim=1))


def step_explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    """`losses.ppo.explained_variance` over the step's tokens (1-D tensors); 0 instead of NaN when the
    returns do not vary (nothing to explain: the ratio is NaN or −inf), so a constant-reward step logs a finite metric."""
    value = explained_variance(values, returns, torch.ones_like(returns)).item()
    return value if math.isfinite(value) else 0.0


def _matrix(rows: list[tuple[float, ...]], width: int, device) -> torch.Tensor:
    out = torch.zeros(len(rows), width, device=device)
    for e, values in enumerate(rows):
        out[e, : len(values)] = torch.tensor(values, device=device)
    return out


class PPOLoss:
    def __init__(self, settings: PPOSettings):
        self.settings = settings

    def __call__(self, policy: GroupLogps, reference: GroupLogps | None, kl_coef: float | None = None) -> LossOutput:
        s = self.settings
        samples: list[PPOSample] = list(policy.examples)
        logps, mask, values = policy.tokens[:, 0], policy.mask[:, 0], policy.values[:, 0]
        width, device = logps.shape[1], logps.device
        old_logps = _matrix([x.old_logps for x in samples], width, device)
        old_values = _matrix([x.old_values for x in samples], width, device)
        advantages = _matrix([x.advantages for x in samples], width, device)
        returns = _matrix([x.returns for x in samples], width, device)
        ratio = torch.exp(logps - old_logps)
        policy_terms = torch.max(-advantages * ratio, -advantages * torch.clamp(ratio, 1 - s.clip_range, 1 + s.clip_range))
        clipped_values = old_values + torch.clamp(values - old_values, -s.value_clip_range, s.value_clip_range)
        value_terms = 0.5 * torch.max((values - returns) ** 2, (clipped_values - returns) ** 2)
        policy_loss = masked_mean(policy_terms, mask, dim=1)
        value_loss = masked_mean(value_terms, mask, dim=1)
        log_ratio = (logps - old_logps).detach()
        metrics = {
            "reward": torch.tensor([x.scores[0] for x in samples], device=device),
            "kl": torch.tensor([x.kl for x in samples], device=device),
            "policy/loss": policy_loss.detach(),
            "value/loss": value_loss.detach(),
            "policy/clip_fraction": masked_mean(
                (-advantages * torch.clamp(ratio, 1 - s.clip_range, 1 + s.clip_range) > -advantages * ratio).float().detach(), mask, dim=1
            ),
            "policy/approx_kl": masked_mean(torch.exp(log_ratio) - 1 - log_ratio, mask, dim=1),
            "completion_length": mask.sum(dim=1),
            "policy/entropy": torch.tensor([x.entropy for x in samples], device=device),
            "value/explained_variance": torch.tensor([x.explained_variance for x in samples], device=device),
        }
        for name in samples[0].reward_terms:
            metrics[f"reward/{name}"] = torch.tensor([x.reward_terms[name] for x in samples], device=device)
        return LossOutput(policy_loss + s.value_coef * value_loss, metrics)


METHOD = Method(
    name="ppo",
    summary="PPO (RLHF): one sampled completion per prompt, reward − β·KL per token, GAE with a value head, clipped policy and value losses",
    settings=PPOSettings,
    build_loss=PPOLoss,
    data_shape=DataShape.PROMPTS,
    needs_reference=True,
    reference_in_loss=False,  # the reference's log-probs enter the rollout's per-token rewards only
    controllers=lambda s: [KLCoefficient(s)],
    build_rollout=PPORollout,
    check_examples=lambda s, examples: check_reward_columns(s.rewards, examples),
    example_layout=PPO_LAYOUT,
    attach_heads=attach_value_head,
)
