"""Constrained DPO (`cpo`) and contrastive CPO (`contrastive_cpo`) losses against hand calculations."""

from __future__ import annotations

import math

import pytest
import torch

from preftune.config import validate_config
from preftune.errors import ConfigError
from preftune.logprobs import SequenceLogps
from preftune.losses.contrastive_cpo import contrastive_cpo_loss
from preftune.losses.cpo import constrained_dpo_loss as constrained_dpo_formula
from preftune.methods import PairLogps, get_method
from preftune.methods.cpo import ConstraintSettings, constraint_margin


def _neg_log_sigmoid(x: float) -> float:
    return math.log1p(math.exp(-x))


def constrained_dpo_loss(policy: PairLogps, reference: PairLogps, *, length_normalize: bool = True, **options):
    """The pure formula on pair log-probs, with the method's margin (means or sums)."""
    margin = constraint_margin(policy, reference, length_normalize=length_normalize)
    return constrained_dpo_formula(
        policy.chosen.sum, policy.rejected.sum, reference.chosen.sum, reference.rejected.sum, margin, **options
    )


def _pairs(chosen_sums, chosen_counts, rejected_sums, rejected_counts, *, requires_grad: bool = False) -> PairLogps:
    chosen = torch.tensor(chosen_sums, requires_grad=requires_grad)
    rejected = torch.tensor(rejected_sums, requires_grad=requires_grad)
    return PairLogps(SequenceLogps(chosen, torch.tensor(chosen_counts)), SequenceLogps(rejected, torch.tensor(rejected_counts)))


# Two pairs. Per-token means:      policy c = [-2, -2], r = [-3, -2];  reference c = [-2.25, -2], r = [-3, -2.5]
# Length-normalised margins m:     pair 0: (1) - (0.75) = 0.25        pair 1: (0) - (0.5) = -0.5
# Summed margins m:                pair 0: (2) - (0.75) = 1.25        pair 1: (-2) - (-1)  = -1
# DPO (β = 0.1, sums): h = 0.1·[1.25, -1] → dpo = [-log σ(0.125), -log σ(-0.1)]
POLICY = dict(chosen_sums=[-10.0, -6.0], chosen_counts=[5.0, 3.0], rejected_sums=[-12.0, -4.0], rejected_counts=[4.0, 2.0])
REFERENCE = _pairs([-11.25, -6.0], [5.0, 3.0], [-12.0, -5.0], [4.0, 2.0])
DPO = [_neg_log_sigmoid(0.125), _neg_log_sigmoid(-0.1)]


@pytest.mark.parametrize(
    ("length_normalize", "threshold", "hinge"),
    [
        (True, 0.1, [0.0, 0.6]),  # relu(0.1 - 0.25), relu(0.1 + 0.5)
        (True, 0.4, [0.15, 0.9]),  # e.g. margin_threshold 0.1 at temperature 0.25
        (False, 0.1, [0.0, 1.1]),  # relu(0.1 - 1.25), relu(0.1 + 1)
        (False, 1.5, [0.25, 2.5]),
    ],
)
def test_constrained_loss_is_dpo_plus_lambda_times_hinge(length_normalize, threshold, hinge):
    out = constrained_dpo_loss(
        _pairs(**POLICY), REFERENCE, beta=0.1, lagrange_multiplier=2.0, threshold=threshold, length_normalize=length_normalize
    )
    assert out.losses.tolist() == pytest.approx([d + 2.0 * h for d, h in zip(DPO, hinge)], rel=1e-6)
    assert out.metrics["constraint/hinge"].tolist() == pytest.approx(hinge, abs=1e-6)
    assert out.metrics["constraint/violated"].tolist() == [float(h > 0) for h in hinge]
    expected_margins = [0.25, -0.5] if length_normalize else [1.25, -1.0]
    assert out.metrics["constraint/margin"].tolist() == pytest.approx(expected_margins)
    # DPO's own reward metrics are reported unchanged (summed log-probs, β-scaled).
    assert out.metrics["rewards/margins"].tolist() == pytest.approx([0.125, -0.1])


def test_zero_multiplier_is_exactly_dpo():
    out = constrained_dpo_loss(_pairs(**POLICY), REFERENCE, beta=0.1, lagrange_multiplier=0.0, threshold=5.0)
    assert out.losses.tolist() == pytest.approx(DPO, rel=1e-6)


def test_label_smoothing_reaches_the_dpo_part():
    out = constrained_dpo_loss(
        _pairs(**POLICY), REFERENCE, beta=0.1, lagrange_multiplier=1.0, threshold=0.1, label_smoothing=0.2
    )
    smoothed = 0.8 * _neg_log_sigmoid(-0.1) + 0.2 * _neg_log_sigmoid(0.1)
    assert out.losses[1].item() == pytest.approx(smoothed + 1.0 * 0.6, rel=1e-6)


@pytest.mark.parametrize(
    ("temperature", "scaled", "expected"), [(1.0, True, 0.1), (0.25, True, 0.4), (2.0, True, 0.05), (0.25, False, 0.1)]
)
def test_threshold_is_divided_by_temperature_when_scaled(temperature, scaled, expected):
    settings = ConstraintSettings(margin_threshold=0.1, temperature=temperature, temperature_scaled_threshold=scaled)
    assert settings.threshold == pytest.approx(expected)


def test_registered_loss_uses_the_configured_threshold_and_normalisation():
    method = validate_config(
        {"method": {"loss_type": "constrained_dpo", "beta": 0.1, "constraints": {"margin_threshold": 0.1, "temperature": 0.25, "length_normalize": True}}}
    ).method
    loss = get_method(method.loss_type).build_loss(method)
    out = loss(_pairs(**POLICY), REFERENCE, lagrange_multiplier=2.0)
    assert out.metrics["constraint/hinge"].tolist() == pytest.approx([0.15, 0.9])
    assert out.losses.tolist() == pytest.approx([DPO[0] + 0.3, DPO[1] + 1.8], rel=1e-6)


def test_gradient_is_dpo_gradient_plus_lambda_over_length_and_never_reaches_lambda():
    policy = _pairs(**POLICY, requires_grad=True)
    multiplier = torch.tensor(2.0, requires_grad=True)  # even a tensor must be used as a constant
    out = constrained_dpo_loss(policy, REFERENCE, beta=0.1, lagrange_multiplier=multiplier, threshold=0.1)
    out.losses.sum().backward()
    assert multiplier.grad is None
    sigmoid = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    # d dpo / d sum_c = -β σ(-h); d (λ relu(τ - m)) / d sum_c = -λ / |c| on a violating pair, 0 otherwise.
    expected_chosen = [-0.1 * sigmoid(-0.125), -0.1 * sigmoid(0.1) - 2.0 / 3.0]
    expected_rejected = [0.1 * sigmoid(-0.125), 0.1 * sigmoid(0.1) + 2.0 / 2.0]
    assert policy.chosen.sum.grad.tolist() == pytest.approx(expected_chosen, rel=1e-5)
    assert policy.rejected.sum.grad.tolist() == pytest.approx(expected_rejected, rel=1e-5)


def test_cpo_and_contrastive_cpo_are_different_registered_losses():
    constrained, contrastive = get_method("cpo"), get_method("contrastive_cpo")
    assert get_method("constrained_dpo") is constrained
    assert constrained.needs_reference and not contrastive.needs_reference
    assert "CONSTRAINED" in constrained.summary and "contrastive_cpo" in constrained.summary
    assert "CONTRASTIVE" in contrastive.summary and "Xu et al. 2024" in contrastive.summary


def test_contrastive_cpo_matches_hand_calculation():
    policy = _pairs([-10.0, -6.0], [5.0, 3.0], [-12.0, -3.0], [4.0, 2.0])
    out = contrastive_cpo_loss(policy.chosen.sum, policy.rejected.sum, policy.chosen.mean, beta=0.1, alpha=0.5)
    # h = 0.1 · (c − r) = [0.2, -0.3]; NLL = −mean log πθ(c) = [2, 2]
    expected = [_neg_log_sigmoid(0.2) + 0.5 * 2.0, _neg_log_sigmoid(-0.3) + 0.5 * 2.0]
    assert out.losses.tolist() == pytest.approx(expected, rel=1e-6)
    assert out.metrics["nll/chosen"].tolist() == pytest.approx([2.0, 2.0])
    assert out.metrics["rewards/margins"].tolist() == pytest.approx([0.2, -0.3])


def test_contrastive_cpo_ignores_any_reference_and_raises_the_chosen_likelihood():
    method = validate_config({"method": {"loss_type": "contrastive_cpo", "beta": 0.1, "cpo_alpha": 1.0}}).method
    loss = get_method("contrastive_cpo").build_loss(method)
    policy = _pairs([-10.0], [5.0], [-10.0], [5.0], requires_grad=True)
    out = loss(policy, None)
    assert out.losses.item() == pytest.approx(loss(policy, REFERENCE).losses[0].item())
    out.losses.sum().backward()
    # -β σ(0) from the preference term, -α/|c| from the NLL: both push log πθ(c) up.
    assert policy.chosen.sum.grad.item() == pytest.approx(-0.05 - 1.0 / 5.0)
    assert policy.rejected.sum.grad.item() == pytest.approx(0.05)


def test_a_trl_style_cpo_config_is_an_error_that_points_to_contrastive_cpo():
    with pytest.raises(ConfigError, match="contrastive_cpo.*CONSTRAINED DPO"):
        validate_config({"method": {"loss_type": "cpo", "cpo_alpha": 1.0}})
    assert validate_config({"method": {"loss_type": "contrastive_cpo", "cpo_alpha": 0.5}}).method.cpo_alpha == 0.5


def test_cli_help_tells_the_two_cpos_apart():
    from preftune.cli import build_parser

    help_text = build_parser().format_help()
    assert "CONSTRAINED DPO" in help_text and "contrastive_cpo" in help_text and "Xu et al. 2024" in help_text
