"""KTO loss against hand calculations: the z_ref baseline, label weights, one-label batches, limits."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.losses.kto import kto_loss


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_kto_matches_hand_calculation_with_the_mismatched_kl_baseline():
    desirable = torch.tensor([True, False, True])
    out = kto_loss(
        torch.tensor([-10.0, -12.0, -8.0]),
        torch.tensor([-20.0, -15.0, -9.0]),
        torch.tensor([-11.0, -11.0, -8.5]),
        torch.tensor([-21.0, -15.5, -10.0]),
        desirable,
        beta=0.5,
        desirable_weight=1.0,
        undesirable_weight=1.5,
    )
    # log-ratios r = [1, -1, 0.5]; mismatched log-ratios [1, 0.5, 1] → z_ref = 2.5 / 3
    z = 2.5 / 3
    expected = [
        1.0 * (1 - _sigmoid(0.5 * (1.0 - z))),
        1.5 * (1 - _sigmoid(0.5 * (z - -1.0))),
        1.0 * (1 - _sigmoid(0.5 * (0.5 - z))),
    ]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.metrics["kl"].tolist() == pytest.approx([z] * 3)
    assert out.metrics["rewards/implicit"].tolist() == pytest.approx([0.5, -0.5, 0.25])
    assert out.metrics["rewards/margins"].tolist() == pytest.approx([0.5, 0.5, 0.25])  # undesirable: sign flipped
    assert out.metrics["rewards/accuracies"].tolist() == [1.0, 1.0, 1.0]


def test_kto_baseline_is_clamped_at_zero_and_carries_no_gradient():
    policy_mismatched = torch.tensor([-30.0, -30.0], requires_grad=True)
    policy_completion = torch.tensor([-5.0, -5.0], requires_grad=True)
    out = kto_loss(
        policy_completion,
        policy_mismatched,
        torch.tensor([-6.0, -4.0]),
        torch.tensor([-20.0, -20.0]),  # policy far below the reference on mismatched answers: raw estimate -10
        torch.tensor([True, False]),
        beta=0.1,
    )
    assert out.metrics["kl"].tolist() == [0.0, 0.0]
    assert out.losses.tolist() == pytest.approx([1 - _sigmoid(0.1 * 1.0), 1 - _sigmoid(0.1 * 1.0)])
    out.losses.sum().backward()
    assert policy_mismatched.grad is None
    # desirable: raise its log-prob (negative gradient); undesirable: lower it
    assert policy_completion.grad[0] < 0 < policy_completion.grad[1]


@pytest.mark.parametrize("label", [True, False])
def test_kto_works_on_a_batch_with_one_kind_of_label(label):
    policy = torch.tensor([-4.0, -6.0, -5.0], requires_grad=True)
    out = kto_loss(
        policy, torch.tensor([-7.0, -7.0, -7.0]), torch.tensor([-5.0, -5.0, -5.0]), torch.tensor([-7.0, -7.0, -7.0]),
        torch.tensor([label] * 3), beta=1.0, desirable_weight=2.0, undesirable_weight=0.5,
    )
    out.losses.sum().backward()
    weight, sign = (2.0, 1.0) if label else (0.5, -1.0)
    expected = [weight * (1 - _sigmoid(sign * r)) for r in (1.0, -1.0, 0.0)]
    assert out.losses.tolist() == pytest.approx(expected)
    assert torch.isfinite(policy.grad).all() and (sign * policy.grad < 0).all()


def test_kto_with_policy_equal_to_reference_is_half_the_label_weight():
    logps = torch.tensor([-3.0, -9.0, -1.0, -4.0])
    out = kto_loss(logps, logps - 2, logps, logps - 2, torch.tensor([True, False, True, False]), beta=0.3, undesirable_weight=1.4)
    assert out.losses.tolist() == pytest.approx([0.5, 0.7, 0.5, 0.7])
