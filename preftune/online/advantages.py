"""Advantage estimators for the online methods, pure torch.

- `gae`: generalised advantage estimation per token (Schulman et al. 2016) for PPO.
- `whiten`: masked standardisation of advantages.
- `group_advantages`: GRPO's group-relative advantage (Shao et al. 2024), with Dr. GRPO's
  unscaled variant (Liu et al. 2025).
- `sequence_to_token`, `reward_at_last_token`: move per-sequence numbers onto the token grid.

Shapes: `[sequences, tokens]` for per-token tensors, with `mask` 1 on completion tokens. Masks
are right-padded (each row's real tokens come first); a token followed by a masked token (or the
row's end) ends its episode.
"""

from __future__ import annotations

import torch

from preftune.losses.aggregation import masked_mean


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns), both `[sequences, tokens]`, zero where masked:

        δ_t = r_t + γ · V_{t+1} · m_{t+1} − V_t
        A_t = δ_t + γ · λ · A_{t+1} · m_{t+1}
        R_t = A_t + V_t                           (the value target)

    with V_T = A_T = 0 past the last column, so the value after a sequence's last token is 0.
    Computed without gradient: advantages and returns are targets.
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"rewards, values and mask must all be [sequences, tokens], got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    with torch.no_grad():
        mask = mask.to(values.dtype)
        rewards, values = rewards * mask, values * mask
        advantages = torch.zeros_like(values)
        next_value = torch.zeros_like(values[:, 0])
        next_advantage = torch.zeros_like(values[:, 0])
        for t in reversed(range(values.shape[1])):
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            advantages[:, t] = (delta + gamma * lam * next_advantage) * mask[:, t]
            next_value, next_advantage = values[:, t], advantages[:, t]
        returns = (advantages + values) * mask
    return advantages, returns


def whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − μ) / sqrt(σ² + eps) over the masked elements (μ, σ² population mean and variance);
    `shift_mean=False` adds μ back (scales only). Masked elements come out 0."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    whitened = (values - mean) * torch.rsqrt(variance + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask.to(values.dtype)


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale_std: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """GRPO's advantage per completion (`rewards: [prompts · G]`, the G completions of a prompt adjacent,
    as `preftune.online.generation.generate` returns them):

        A_i = (r_i − mean(r_group)) / (std(r_group) + eps)     scale_std=True  (GRPO)
        A_i =  r_i − mean(r_group)                             scale_std=False (Dr. GRPO)

    std is the sample standard deviation (Bessel-corrected, as TRL's GRPOTrainer), so G ≥ 2.
    A group whose rewards are all equal gets advantage 0 for every completion.
    """
    if group_size < 2:
        raise ValueError(f"group-relative advantages need at least 2 completions per prompt, got group_size={group_size}")
    if rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [prompts * group_size] with group_size={group_size}, got {tuple(rewards.shape)}")
    groups = rewards.view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale_std:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def sequence_to_token(per_sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[sequences]` → `[sequences, tokens]`: each sequence's value on each of its tokens, 0 where masked."""
    return per_sequence.unsqueeze(1) * mask.to(per_sequence.dtype)


def reward_at_last_token(per_sequence: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[sequences]` → `[sequences, tokens]`: the sequence's reward on its last unmasked token, 0 elsewhere
    (the per-token reward PPO adds its per-token KL penalty to). A row with no tokens gets nothing."""
    lengths = mask.to(torch.long).sum(dim=1)
    token_rewards = torch.zeros(mask.shape, dtype=per_sequence.dtype, device=per_sequence.device)
    rows = torch.nonzero(lengths > 0).squeeze(1)
    token_rewards[rows, lengths[rows] - 1] = per_sequence[rows]
    return token_rewards
