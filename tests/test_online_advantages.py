"""GAE, whitening, group-relative advantages and the KL controllers against hand calculations."""

import json

import pytest
import torch

from preftune.errors import CheckpointError
from preftune.online.advantages import gae, group_advantages, reward_at_last_token, sequence_to_token, whiten
from preftune.online.kl_control import AdaptiveKLController, FixedKLController


def test_gae_matches_hand_calculation():
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 2.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4], [1.0, 0.3, 9.0]])  # 9.0 sits on padding and must be ignored
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: t=2 δ = 1 − 0.4 = 0.6 → A=0.6
    #        t=1 δ = 0.9·0.4 − 0.2 = 0.16 → A = 0.16 + 0.72·0.6 = 0.592
    #        t=0 δ = 0.9·0.2 − 0.5 = −0.32 → A = −0.32 + 0.72·0.592 = 0.10624
    # row 1: t=1 is the last token: δ = 2 − 0.3 = 1.7 → A = 1.7
    #        t=0 δ = 0.5 + 0.9·0.3 − 1.0 = −0.23 → A = −0.23 + 0.72·1.7 = 0.994
    assert advantages.tolist()[0] == pytest.approx([0.10624, 0.592, 0.6], abs=1e-6)
    assert advantages.tolist()[1] == pytest.approx([0.994, 1.7, 0.0], abs=1e-6)
    assert returns.tolist()[0] == pytest.approx([0.60624, 0.792, 1.0], abs=1e-6)
    assert returns.tolist()[1] == pytest.approx([1.994, 2.0, 0.0], abs=1e-6)


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    assert returns.tolist() == [[6.0, 5.0, 3.0]]
    assert advantages.tolist() == [[5.5, 4.5, 2.5]]


def test_whiten_uses_only_masked_elements():
    values = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    # mean 2, population variance 2/3
    scale = (2 / 3) ** -0.5
    assert whiten(values, mask).tolist() == pytest.approx([-scale, 0.0, scale, 0.0], rel=1e-6)
    assert whiten(values, mask, shift_mean=False).tolist() == pytest.approx([2 - scale, 2.0, 2 + scale, 0.0], rel=1e-6)


def test_group_advantages_match_hand_calculation():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    # group 0: mean 0.5, sample std sqrt(4 · 0.25 / 3) = 0.57735; group 1: all equal → 0
    std = (1 / 3) ** 0.5
    a = 0.5 / (std + 1e-4)
    assert group_advantages(rewards, 4).tolist() == pytest.approx([a, -a, -a, a, 0, 0, 0, 0], rel=1e-6)
    assert group_advantages(rewards, 4, scale_std=False).tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(rewards, 1)
    with pytest.raises(ValueError, match="group_size=3"):
        group_advantages(rewards, 3)


def test_sequence_values_onto_the_token_grid():
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    per_sequence = torch.tensor([2.0, -1.0, 5.0])
    assert sequence_to_token(per_sequence, mask).tolist() == [[2.0, 2.0, 2.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    assert reward_at_last_token(per_sequence, mask).tolist() == [[0.0, 0.0, 2.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]


def test_adaptive_kl_controller_follows_ziegler_rule():
    controller = AdaptiveKLController(0.1, target=6.0, horizon=10_000)
    # KL 9: error clip(0.5) = 0.2 → β = 0.1 · (1 + 0.2 · 256 / 10000) = 0.100512
    assert controller.update(9.0, 256) == pytest.approx(0.100512)
    controller.value = 0.1
    # KL 3: error clip(−0.5) = −0.2 → 0.1 · (1 − 0.00512)
    assert controller.update(3.0, 256) == pytest.approx(0.099488)
    controller.value = 0.1
    # KL 6.6: error 0.1 (inside the clip) → 0.1 · (1 + 0.1 · 100 / 10000)
    assert controller.update(6.6, 100) == pytest.approx(0.1001)


def test_kl_controllers_round_trip_through_json():
    controller = AdaptiveKLController(0.2, target=4.0, horizon=1000)
    for kl in (8.0, 1.0, 5.0):
        controller.update(kl, 64)
    state = json.loads(json.dumps(controller.state_dict()))
    restored = AdaptiveKLController(0.2, target=4.0, horizon=1000)
    restored.load_state_dict(state)
    assert restored.value == controller.value
    assert restored.update(7.0, 64) == controller.update(7.0, 64)

    fixed = FixedKLController(0.05)
    assert fixed.update(100.0, 64) == 0.05
    with pytest.raises(CheckpointError, match="'adaptive'"):
        fixed.load_state_dict(state)
    with pytest.raises(CheckpointError, match="target"):
        AdaptiveKLController(0.2, target=5.0, horizon=1000).load_state_dict(state)
