"""Reward-model training (InstructGPT's Bradley–Terry on preference pairs, Llama 2's optional margin)
as a method of the one training loop.

The policy is a sequence-classification model (`preftune.online.reward_model.build_reward_model`,
`model_kind="reward_model"`): a scalar head read at each text's last token. The layout collates a
micro-batch of pairs to the (prompt + chosen, prompt + rejected) token lists; its `forward` scores
them with `reward_logits` instead of the log-prob engine, returned in the engine's answer-slot-major
order (`SequenceLogps.sum` = the rewards [chosen…, rejected…], `count` = the answers' tokens), so
evaluation rows and their summary work unchanged: a row's `policy_logps` are its two rewards, and
`eval/rewards/accuracies` is the validation accuracy (share of pairs with r_c > r_r).

    loss_i = −log σ(r_c,i − r_r,i − m_i),   m_i = margin (+ score_chosen − score_rejected with margin_from_scores)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import Field

from preftune.logprobs import SequenceLogps
from preftune.losses import LossOutput
from preftune.losses.bradley_terry import bradley_terry_loss
from preftune.methods.base import ExampleLayout, Method, MethodSettings, PairLogps
from preftune.online.reward_model import export_reward_model, reward_logits

REWARD_MODEL_FOLDER = "reward-model"  # final/reward-model/: a HF sequence-classification folder


class RewardModelSettings(MethodSettings):
    margin: float = Field(0.0, description="m: a constant margin the chosen reward must beat the rejected one by")
    margin_from_scores: bool = Field(
        False, description="add score_chosen − score_rejected of each pair (when the data has scores) to the margin (Llama 2)"
    )


@dataclass
class RewardPairs(PairLogps):
    """The rewards of a micro-batch of pairs (in `.sum`) and each pair's margin from its scores (0 without scores)."""

    score_margins: torch.Tensor


@dataclass
class RewardPairBatch:
    """Token ids of prompt + answer per text: [chosen of every pair…, rejected of every pair…]; the EOS is not scored."""

    texts: list[list[int]]
    answer_tokens: list[int]
    margins: list[float]
    pad_id: int
    num_examples: int

    def to(self, device) -> RewardPairBatch:
        return self  # `reward_logits` puts the ids on the model's device


def _readable(prompt: list[int], answer: list[int], pad_id: int) -> list[int]:
    # The reward is read at the last token, which cannot be the pad token: an EOS that is also the pad is dropped.
    return prompt + (answer[:-1] if len(answer) > 1 and answer[-1] == pad_id else answer)


def collate_reward_pairs(pairs, *, pad_id: int) -> RewardPairBatch:
    answers = [pair.chosen_ids for pair in pairs] + [pair.rejected_ids for pair in pairs]
    prompts = [pair.prompt_ids for pair in pairs] * 2
    margins = [
        (pair.scores[0] - pair.scores[1]) if pair.scores is not None else 0.0
        for pair in pairs
    ]
    return RewardPairBatch(
        texts=[_readable(p, a, pad_id) for p, a in zip(prompts, answers)],
        answer_tokens=[len(a) for a in answers],
        margins=margins,
        pad_id=pad_id,
        num_examples=len(pairs),
    )


def score_reward_pairs(model, batch: RewardPairBatch) -> SequenceLogps:
    rewards = reward_logits(model, batch.texts, batch.pad_id).float()
    counts = torch.tensor(batch.answer_tokens, device=rewards.device)
    return SequenceLogps(rewards, counts)


def _reward_pairs(scores: SequenceLogps, examples, batch: RewardPairBatch) -> RewardPairs:
    chosen, rejected = scores.by_answer(2)
    return RewardPairs(chosen, rejected, torch.tensor(batch.margins, device=chosen.sum.device))


REWARD_PAIRS = ExampleLayout(collate_reward_pairs, _reward_pairs, answers=2, forward=score_reward_pairs)


class RewardModelLoss:
    def __init__(self, settings: RewardModelSettings):
        self.settings = settings

    def __call__(self, policy: RewardPairs, reference: None) -> LossOutput:
        margin = torch.full_like(policy.chosen.sum, self.settings.margin)
        if self.settings.margin_from_scores:
            margin = margin + policy.score_margins
        output = bradley_terry_loss(policy.chosen.sum, policy.rejected.sum, margin=margin)
        metrics = output.metrics
        # The names every pairwise method logs, so accuracy/margin curves and evaluation summaries apply as they are.
        return LossOutput(output.losses, {
            "rewards/chosen": metrics["reward/chosen"],
            "rewards/rejected": metrics["reward/rejected"],
            "rewards/margins": metrics["reward/margin"],
            "rewards/accuracies": metrics["reward/accuracy"],
        })


def export(model, tokenizer, final: Path) -> None:
    export_reward_model(model, tokenizer, final / REWARD_MODEL_FOLDER)


METHOD = Method(
    name="reward_model",
    summary="reward model: a scalar head on the LM, Bradley–Terry −log σ(r_c − r_r − m) on pairs; exported as a sequence-classification folder",
    settings=RewardModelSettings,
    build_loss=RewardModelLoss,
    needs_reference=False,
    model_kind="reward_model",
    example_layout=REWARD_PAIRS,
    export=export,
)
