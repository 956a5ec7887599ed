"""IPO, hinge, robust DPO, SimPO, ORPO and SFT against hand calculations and known limits."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.config import validate_method_settings
from preftune.logprobs import SequenceLogps
from preftune.methods import METHODS, PairLogps, get_method
from preftune.losses.dpo import dpo_loss
from preftune.losses.hinge import hinge_loss
from preftune.losses.ipo import ipo_loss
from preftune.losses.orpo import log1mexp, orpo_loss
from preftune.losses.robust import robust_dpo_loss
from preftune.losses.sft import sft_loss
from preftune.losses.simpo import simpo_loss


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _pair(chosen_sum, chosen_count, rejected_sum, rejected_count) -> PairLogps:
    as_tensor = lambda values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
    return PairLogps(
        SequenceLogps(as_tensor(chosen_sum), as_tensor(chosen_count)),
        SequenceLogps(as_tensor(rejected_sum), as_tensor(rejected_count)),
    )


def _loss(loss_type: str, **method):
    return get_method(loss_type).build_loss(validate_method_settings({"loss_type": loss_type, **method}))


# ---- IPO ----------------------------------------------------------------------------------------


def test_ipo_matches_hand_calculation_on_per_token_means():
    # policy: chosen -4 over 4 tokens (mean -1), rejected -6 over 3 (mean -2); reference means -1.5, -1.5
    policy = _pair([-4.0], [4.0], [-6.0], [3.0])
    reference = _pair([-6.0], [4.0], [-4.5], [3.0])
    out = _loss("ipo", beta=0.25)(policy, reference)
    # h = (-1 - -2) - (-1.5 - -1.5) = 1; target 1/(2·0.25) = 2; loss = (1 - 2)² = 1
    assert out.losses.tolist() == pytest.approx([1.0])
    assert out.metrics["rewards/chosen"].tolist() == pytest.approx([0.25 * 0.5])
    assert out.metrics["rewards/rejected"].tolist() == pytest.approx([0.25 * -0.5])
    assert out.metrics["rewards/accuracies"].tolist() == [1.0]


def test_ipo_with_policy_equal_to_reference_is_the_squared_target():
    logps = torch.tensor([-0.3, -2.0, -5.0])
    out = ipo_loss(logps, logps - 0.4, logps, logps - 0.4, beta=0.1)
    assert out.losses.tolist() == pytest.approx([(1 / (2 * 0.1)) ** 2] * 3)


def test_ipo_is_zero_and_flat_exactly_at_the_target_margin():
    chosen = torch.tensor([-1.0], requires_grad=True)
    out = ipo_loss(chosen, torch.tensor([-6.0]), torch.tensor([-1.0]), torch.tensor([-1.0]), beta=0.1)  # h = 5 = 1/(2β)
    out.losses.sum().backward()
    assert out.losses.item() == pytest.approx(0.0)
    assert chosen.grad.item() == pytest.approx(0.0)


# ---- hinge --------------------------------------------------------------------------------------


def test_hinge_matches_hand_calculation_and_stops_pushing_past_the_margin():
    chosen = torch.tensor([-10.0, -10.0], requires_grad=True)
    # margins: pair 0: (-10 + 11.5) - 0 = 1.5 → h = 0.75 → loss 0.25; pair 1: 3 → h = 1.5 → loss 0
    out = hinge_loss(chosen, torch.tensor([-11.5, -13.0]), torch.tensor([-9.0, -9.0]), torch.tensor([-9.0, -9.0]), beta=0.5)
    assert out.losses.tolist() == pytest.approx([0.25, 0.0])
    out.losses.sum().backward()
    assert chosen.grad.tolist() == pytest.approx([-0.5, 0.0])


def test_hinge_with_policy_equal_to_reference_is_one():
    logps = torch.tensor([-3.0, -7.0])
    assert hinge_loss(logps, logps - 2, logps, logps - 2, beta=0.3).losses.tolist() == pytest.approx([1.0, 1.0])


# ---- robust DPO ---------------------------------------------------------------------------------


def test_robust_matches_hand_calculation():
    # h = 0.1 · ((-3 + 5) - 0) = 0.2, ε = 0.2
    out = robust_dpo_loss(
        torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.0]), beta=0.1, label_smoothing=0.2
    )
    expected = (-0.8 * _log_sigmoid(0.2) + 0.2 * _log_sigmoid(-0.2)) / 0.6
    assert out.losses.item() == pytest.approx(expected, rel=1e-6)


def test_robust_is_unbiased_under_the_flip_rate():
    """E over a flip with probability ε of the robust loss = the clean DPO loss (the point of rDPO)."""
    policy_chosen, policy_rejected = torch.tensor([-3.0, -9.0]), torch.tensor([-5.0, -4.0])
    reference_chosen, reference_rejected = torch.tensor([-4.0, -6.0]), torch.tensor([-4.5, -6.5])
    eps = 0.3
    kept = robust_dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.5, label_smoothing=eps)
    flipped = robust_dpo_loss(policy_rejected, policy_chosen, reference_rejected, reference_chosen, beta=0.5, label_smoothing=eps)
    clean = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.5)
    torch.testing.assert_close((1 - eps) * kept.losses + eps * flipped.losses, clean.losses)


def test_robust_without_noise_is_dpo_and_log2_at_the_reference():
    logps = torch.tensor([-3.0, -40.0])
    out = robust_dpo_loss(logps, logps - 1, logps, logps - 1, beta=0.3, label_smoothing=0.0)
    assert out.losses.tolist() == pytest.approx([math.log(2.0)] * 2)
    with pytest.raises(ValueError, match="flip rate"):
        robust_dpo_loss(logps, logps, logps, logps, beta=0.1, label_smoothing=0.5)


# ---- SimPO --------------------------------------------------------------------------------------


def test_simpo_matches_hand_calculation_on_per_token_means():
    policy = _pair([-4.0], [4.0], [-6.0], [3.0])  # means -1 and -2
    out = _loss("simpo", beta=2.0, simpo_gamma=0.5)(policy, None)
    assert out.losses.item() == pytest.approx(-_log_sigmoid(2.0 * 1.0 - 0.5))
    assert out.metrics["rewards/chosen"].item() == pytest.approx(-2.0)
    assert out.metrics["rewards/margins"].item() == pytest.approx(2.0)
    with_sft = _loss("simpo", beta=2.0, simpo_gamma=0.5, simpo_sft_weight=0.3)(policy, None)
    assert with_sft.losses.item() == pytest.approx(-_log_sigmoid(1.5) + 0.3 * 1.0)
    assert with_sft.metrics["nll/chosen"].item() == pytest.approx(1.0)


def test_simpo_limits_equal_answers_give_log2_without_margin_and_more_with_one():
    logps = torch.tensor([-1.5, -0.2])
    assert simpo_loss(logps, logps, beta=2.0, gamma=0.0).losses.tolist() == pytest.approx([math.log(2.0)] * 2)
    assert simpo_loss(logps, logps, beta=2.0, gamma=1.0).losses.tolist() == pytest.approx([-_log_sigmoid(-1.0)] * 2)


# ---- ORPO ---------------------------------------------------------------------------------------


def test_orpo_matches_hand_calculation_of_the_odds_ratio():
    chosen, rejected, beta = -0.5, -1.0, 0.1
    log_odds = (chosen - math.log(1 - math.exp(chosen))) - (rejected - math.log(1 - math.exp(rejected)))
    out = orpo_loss(torch.tensor([chosen], dtype=torch.float64), torch.tensor([rejected], dtype=torch.float64), beta=beta)
    assert out.metrics["orpo/log_odds"].item() == pytest.approx(log_odds, rel=1e-12)
    assert out.metrics["orpo/log_odds_ratio"].item() == pytest.approx(_log_sigmoid(log_odds), rel=1e-12)
    assert out.losses.item() == pytest.approx(0.5 - beta * _log_sigmoid(log_odds), rel=1e-12)
    assert out.metrics["nll/chosen"].item() == pytest.approx(0.5)


def test_orpo_uses_per_token_means_through_its_spec():
    policy = _pair([-2.0], [4.0], [-3.0], [3.0])  # means -0.5 and -1.0
    direct = orpo_loss(torch.tensor([-0.5], dtype=torch.float64), torch.tensor([-1.0], dtype=torch.float64), beta=0.2)
    assert _loss("orpo", beta=0.2)(policy, None).losses.item() == pytest.approx(direct.losses.item())


@pytest.mark.parametrize("x", [-1e-12, -1e-6, -0.3, -0.6931, -0.7, -1.0, -5.0, -40.0])
def test_log1mexp_is_accurate_on_both_sides_of_the_switch(x):
    assert log1mexp(torch.tensor(x, dtype=torch.float64)).item() == pytest.approx(math.log(-math.expm1(x)), rel=1e-12)


def test_orpo_is_finite_when_an_answer_has_probability_one():
    chosen = torch.tensor([0.0, 0.0, -1e-9], requires_grad=True)
    rejected = torch.tensor([-1.0, 0.0, -1e-9], requires_grad=True)
    out = orpo_loss(chosen, rejected, beta=0.1)
    (out.losses.sum()).backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(out.metrics["orpo/log_odds"]).all()
    assert torch.isfinite(chosen.grad).all() and torch.isfinite(rejected.grad).all()
    assert out.metrics["orpo/log_odds"][1].item() == 0.0  # both certain: no preference either way


# ---- SFT ----------------------------------------------------------------------------------------


def test_sft_is_the_chosen_nll_and_ignores_the_rejected_answer():
    chosen = torch.tensor([-1.25, -0.5], requires_grad=True)
    rejected = torch.tensor([-2.0, -0.1], requires_grad=True)
    out = sft_loss(chosen, rejected)
    out.losses.sum().backward()
    assert out.losses.tolist() == pytest.approx([1.25, 0.5])
    assert chosen.grad.tolist() == pytest.approx([-1.0, -1.0])
    assert rejected.grad is None
    assert out.metrics["rewards/accuracies"].tolist() == [1.0, 0.0]


# ---- registry -----------------------------------------------------------------------------------


def test_reference_free_losses_declare_it():
    needs = {name: method.needs_reference for name, method in METHODS.items()}
    assert {name for name, value in needs.items() if not value} >= {"simpo", "orpo", "sft"}
    assert needs["ipo"] and needs["hinge"] and needs["robust"] and needs["sigmoid"]
