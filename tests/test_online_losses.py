"""GRPO, PPO and Bradley–Terry losses against hand calculations; gradients; aggregation modes."""

import math

import pytest
import torch

from preftune.losses.aggregation import aggregate_token_losses
from preftune.losses.bradley_terry import bradley_terry_loss
from preftune.losses.grpo import grpo_loss, k3_kl
from preftune.losses.ppo import entropy_from_logits, explained_variance, ppo_loss, ppo_policy_loss, ppo_value_loss

MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def _grpo_inputs():
    # ratios ρ: sequence 0 → [1.5, 0.5, 1.0]; sequence 1 → [0.5, 1.1, (padding)]
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
    log_ratio = torch.log(torch.tensor([[1.5, 0.5, 1.0], [0.5, 1.1, 7.0]]))
    logps = (old + log_ratio).requires_grad_(True)
    advantages = torch.tensor([1.0, -2.0])
    return logps, old, advantages


def test_grpo_clipped_surrogate_matches_hand_calculation():
    logps, old, advantages = _grpo_inputs()
    out = grpo_loss(logps, advantages, MASK, old_logps=old, epsilon_low=0.2)
    # seq 0, A=+1:  min(1.5, 1.2)=1.2   min(0.5, 0.8)=0.5   min(1, 1)=1     → ℓ = [-1.2, -0.5, -1.0]
    # seq 1, A=-2:  min(-1.0, -1.6)=-1.6 min(-2.2, -2.4)... clip(1.1)=1.1 → -2.2 → ℓ = [1.6, 2.2]
    expected = torch.tensor([[-1.2, -0.5, -1.0], [1.6, 2.2, 0.0]])
    assert torch.allclose(out.per_token * MASK, expected, atol=1e-6)
    # sequence (GRPO): mean(-2.7/3, 3.8/2) = mean(-0.9, 1.9) = 0.5
    assert out.loss.value.item() == pytest.approx(0.5, abs=1e-6)
    assert out.loss.denominator == 2.0
    # clipped tokens: seq 1 token 0 (ρ=0.5 < 0.8, A<0) low; seq 0 token 0 (ρ=1.5 > 1.2, A>0) high; 5 tokens
    assert out.metrics["clip_ratio/low"].item() == pytest.approx(1 / 5)
    assert out.metrics["clip_ratio/high"].item() == pytest.approx(1 / 5)
    assert out.metrics["clip_ratio/region"].item() == pytest.approx(2 / 5)
    assert out.metrics["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.0 + 0.5 + 1.1) / 5, rel=1e-6)
    assert "kl" not in out.metrics


def test_grpo_aggregations_match_hand_calculation():
    logps, old, advantages = _grpo_inputs()
    token = grpo_loss(logps, advantages, MASK, old_logps=old, aggregation="token")
    assert token.loss.value.item() == pytest.approx((-2.7 + 3.8) / 5, abs=1e-6)  # DAPO: 0.22
    dr = grpo_loss(logps, advantages, MASK, old_logps=old, aggregation="dr_grpo", max_completion_length=4)
    assert dr.loss.value.item() == pytest.approx(1.1 / (2 * 4), abs=1e-6)  # 0.1375
    dr_default = grpo_loss(logps, advantages, MASK, old_logps=old, aggregation="dr_grpo")
    assert dr_default.loss.value.item() == pytest.approx(1.1 / (2 * 3), abs=1e-6)  # padded width 3


def test_split_aggregation_sums_to_the_full_batch_value():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0], [6.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    for mode in ("sequence", "token", "dr_grpo"):
        full = aggregate_token_losses(per_token, mask, mode, max_completion_length=3)
        first = aggregate_token_losses(per_token[:1], mask[:1], mode, max_completion_length=3)
        rest = aggregate_token_losses(per_token[1:], mask[1:], mode, max_completion_length=3)
        combined = (first.numerator + rest.numerator) / (first.denominator + rest.denominator)
        assert combined.item() == pytest.approx(full.value.item())
    # hand: sequence = mean(2, 4.5, 6) = 4.1667; token = 21 / 6 = 3.5; dr_grpo = 21 / 9
    assert aggregate_token_losses(per_token, mask, "sequence").value.item() == pytest.approx(12.5 / 3)
    assert aggregate_token_losses(per_token, mask, "token").value.item() == pytest.approx(3.5)
    assert aggregate_token_losses(per_token, mask, "dr_grpo").value.item() == pytest.approx(21 / 9)


def test_grpo_clip_higher_uses_its_own_upper_bound():
    logps, old, advantages = _grpo_inputs()
    out = grpo_loss(logps, advantages, MASK, old_logps=old, epsilon_low=0.2, epsilon_high=0.28)
    assert out.per_token[0, 0].item() == pytest.approx(-1.28, abs=1e-6)
    assert out.per_token[1, 0].item() == pytest.approx(1.6, abs=1e-6)  # the lower bound is still 0.8


def test_grpo_kl_term_matches_k3_and_is_exactly_zero_at_the_reference():
    logps, old, advantages = _grpo_inputs()
    base = grpo_loss(logps, advantages, MASK, old_logps=old)
    reference = logps.detach() + 0.5
    with_kl = grpo_loss(logps, advantages, MASK, old_logps=old, reference_logps=reference, beta=0.1)
    k3 = math.exp(0.5) - 0.5 - 1  # 0.148721
    assert torch.allclose(with_kl.per_token - base.per_token, torch.full_like(base.per_token, 0.1 * k3), atol=1e-6)
    assert with_kl.metrics["kl"].item() == pytest.approx(k3, rel=1e-5)

    same = grpo_loss(logps, advantages, MASK, old_logps=old, reference_logps=logps.detach().clone(), beta=0.1)
    assert same.metrics["kl"].item() == 0.0
    assert torch.equal(k3_kl(logps.detach(), logps.detach()), torch.zeros_like(logps))
    assert torch.equal(same.per_token, base.per_token)
    with pytest.raises(ValueError, match="reference_logps"):
        grpo_loss(logps, advantages, MASK, beta=0.1)


def test_grpo_on_policy_gradient_is_advantage_over_length():
    logps, _, advantages = _grpo_inputs()
    out = grpo_loss(logps, advantages, MASK)  # old_logps=None: ρ = 1
    out.loss.value.backward()
    # ∂/∂logp_t of (1/G) Σ_i (1/|o_i|) Σ_t −A_i ρ_t = −A_i / (G |o_i|): seq 0 → −1/6, seq 1 → +2/4
    expected = torch.tensor([[-1 / 6, -1 / 6, -1 / 6], [0.5, 0.5, 0.0]])
    assert torch.allclose(logps.grad, expected, atol=1e-6)


def test_ppo_policy_loss_matches_hand_calculation():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    old = torch.tensor([[-1.0, -1.0, -1.0, -1.0]])
    logps = (old + torch.log(torch.tensor([[1.5, 0.5, 1.0, 3.0]]))).requires_grad_(True)
    advantages = torch.tensor([[1.0, -1.0, 2.0, 5.0]])
    loss, metrics = ppo_policy_loss(logps, old, advantages, mask, clip_range=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(0.5, 0.8) = 0.8 (clipped); token 2: -2
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.0) / 3, abs=1e-6)
    assert metrics["policy/clip_fraction"].item() == pytest.approx(2 / 3)
    approx_kl = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5)) + 0.0) / 3
    assert metrics["policy/approx_kl"].item() == pytest.approx(approx_kl, rel=1e-5)
    loss.backward()
    # clipped tokens carry no gradient; token 2: ∂(−A ρ)/∂logp / 3 = −2/3
    assert torch.allclose(logps.grad, torch.tensor([[0.0, 0.0, -2 / 3, 0.0]]), atol=1e-6)


def test_ppo_value_loss_matches_hand_calculation():
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    values = torch.tensor([[1.0, 2.0, 0.0]], requires_grad=True)
    old_values = torch.tensor([[0.5, 2.0, 0.1]])
    returns = torch.tensor([[2.0, 1.0, 0.0]])
    loss, metrics = ppo_value_loss(values, old_values, returns, mask, clip_range=0.2)
    # token 0: V_clip = 0.7, errors 1 vs 1.69 → 1.69 (clipped); token 1: 1; token 2: 0
    assert loss.item() == pytest.approx(0.5 * (1.69 + 1.0 + 0.0) / 3, abs=1e-6)
    assert metrics["value/clip_fraction"].item() == pytest.approx(1 / 3)
    loss.backward()
    assert values.grad[0, 0].item() == 0.0  # the clipped error is constant in V
    assert values.grad[0, 1].item() == pytest.approx(0.5 * 2 * (2.0 - 1.0) / 3)


def test_entropy_and_explained_variance_match_hand_calculation():
    assert entropy_from_logits(torch.zeros(2, 4)).tolist() == pytest.approx([math.log(4)] * 2)
    assert entropy_from_logits(torch.tensor([[0.0, -1e9]])).item() == pytest.approx(0.0, abs=1e-6)
    mask = torch.ones(1, 3)
    returns = torch.tensor([[1.0, 2.0, 3.0]])
    # residual [0, 0, 1]: variance 2/9; returns variance 2/3 → 1 − 1/3
    assert explained_variance(torch.tensor([[1.0, 2.0, 2.0]]), returns, mask).item() == pytest.approx(2 / 3)
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0)
    assert explained_variance(torch.full((1, 3), 2.0), returns, mask).item() == pytest.approx(0.0)


def test_ppo_loss_combines_its_parts_with_the_coefficients():
    mask = torch.tensor([[1.0, 1.0]])
    logps = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    values = torch.tensor([[0.5, 0.0]], requires_grad=True)
    entropy = torch.tensor([[1.0, 3.0]])
    out = ppo_loss(
        logps, logps.detach(), torch.tensor([[1.0, -1.0]]), values, values.detach(), torch.tensor([[1.5, 0.0]]), mask,
        entropy=entropy, value_coef=0.5, entropy_coef=0.01,
    )
    # policy: ρ = 1 → mean(-1, 1) = 0; value: ½ mean(1, 0) = 0.25; entropy mean 2
    assert out.policy_loss.item() == pytest.approx(0.0)
    assert out.value_loss.item() == pytest.approx(0.25)
    assert out.loss.item() == pytest.approx(0.5 * 0.25 - 0.01 * 2.0)
    out.loss.backward()
    assert logps.grad[0].tolist() == pytest.approx([-0.5, 0.5])


def test_bradley_terry_matches_hand_calculation_and_gradients():
    chosen = torch.tensor([2.0, 0.5], requires_grad=True)
    rejected = torch.tensor([1.0, 1.5], requires_grad=True)
    out = bradley_terry_loss(chosen, rejected)
    sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert out.losses.tolist() == pytest.approx([-math.log(sigmoid(1.0)), -math.log(sigmoid(-1.0))], rel=1e-6)
    assert out.metrics["reward/accuracy"].tolist() == [1.0, 0.0]
    assert out.metrics["reward/margin"].tolist() == pytest.approx([1.0, -1.0])
    out.losses.sum().backward()
    # ∂/∂r_c of −log σ(d) = −σ(−d); ∂/∂r_r = +σ(−d)
    assert chosen.grad.tolist() == pytest.approx([-sigmoid(-1.0), -sigmoid(1.0)], rel=1e-6)
    assert rejected.grad.tolist() == pytest.approx([sigmoid(-1.0), sigmoid(1.0)], rel=1e-6)
    with_margin = bradley_terry_loss(chosen.detach(), rejected.detach(), margin=torch.tensor([0.5, 0.0]))
    assert with_margin.losses[0].item() == pytest.approx(-math.log(sigmoid(0.5)), rel=1e-6)
    assert with_margin.metrics["reward/accuracy"].tolist() == [1.0, 0.0]  # accuracy ignores the margin
