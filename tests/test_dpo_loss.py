"""DPO loss against hand calculations."""

import math

import pytest
import torch

from preftune.losses.dpo import dpo_loss


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_dpo_matches_hand_calculation():
    policy_chosen = torch.tensor([-10.0, -7.5])
    policy_rejected = torch.tensor([-12.0, -7.0])
    reference_chosen = torch.tensor([-11.0, -8.0])
    reference_rejected = torch.tensor([-11.5, -6.0])
    out = dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta=0.5)

    # pair 0: h = 0.5 * ((-10 + 12) - (-11 + 11.5)) = 0.5 * 1.5 = 0.75
    # pair 1: h = 0.5 * ((-7.5 + 7) - (-8 + 6))     = 0.5 * 1.5 = 0.75 (policy prefers rejected less than reference)
    expected_h = [0.75, 0.75]
    expected = [-math.log(_sigmoid(h)) for h in expected_h]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.metrics["rewards/chosen"].tolist() == pytest.approx([0.5 * 1.0, 0.5 * 0.5])
    assert out.metrics["rewards/rejected"].tolist() == pytest.approx([0.5 * -0.5, 0.5 * -1.0])
    assert out.metrics["rewards/margins"].tolist() == pytest.approx(expected_h)
    assert out.metrics["rewards/accuracies"].tolist() == [1.0, 1.0]


def test_dpo_label_smoothing_matches_hand_calculation():
    h = 0.1 * ((-3.0 - -5.0) - (-4.0 - -4.0))  # 0.2
    out = dpo_loss(
        torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.0]), beta=0.1, label_smoothing=0.2
    )
    expected = -0.8 * math.log(_sigmoid(h)) - 0.2 * math.log(_sigmoid(-h))
    assert out.losses.item() == pytest.approx(expected, rel=1e-6)


def test_dpo_equals_log2_when_policy_is_reference():
    logps = torch.tensor([-3.0, -40.0, -0.5])
    out = dpo_loss(logps, logps - 1.0, logps, logps - 1.0, beta=0.3)
    assert out.losses.tolist() == pytest.approx([math.log(2.0)] * 3)
    assert out.metrics["rewards/accuracies"].sum() == 0  # a tie is not a win


def test_dpo_gradient_pushes_chosen_up_and_rejected_down():
    chosen = torch.tensor([-5.0], requires_grad=True)
    rejected = torch.tensor([-5.0], requires_grad=True)
    dpo_loss(chosen, rejected, torch.tensor([-5.0]), torch.tensor([-5.0]), beta=0.1).losses.sum().backward()
    assert chosen.grad.item() == pytest.approx(-0.05)  # -β σ(-h) at h = 0
    assert rejected.grad.item() == pytest.approx(0.05)


def test_dpo_rejects_invalid_label_smoothing():
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=0.1, label_smoothing=0.5)
