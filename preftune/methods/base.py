"""A method is one declaration: its loss formula, the data shape it consumes, whether it needs a
reference, its own validated settings, its controllers and the section it adds to the report.

The training loop takes a `Method` and knows no method names. The loss it builds is called once
per micro-batch as `loss(policy, reference, **inputs)`, where `policy`/`reference` are the
shape's log-probs (`PairLogps`, `UnpairedLogps`, `GroupLogps`) and `inputs` are the controllers'
`loss_inputs()` (e.g. CPO's λ).

An online method (GRPO) also declares a rollout: before collate, the loop hands it the step's
micro-batches of prompt examples and gets back GROUP examples (the prompt with its generated
answers, scored), which then go through the same collate → engine → loss path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from pydantic import Field

from preftune.control import Controller
from preftune.data.collate import PackedBatch, collate_pairs, collate_unpaired, pack_examples
from preftune.logprobs import SequenceLogps
from preftune.losses import LossOutput
from preftune.runfolder import RunRecords
from preftune.settings import Section


class DataShape(str, Enum):
    """What one training example is."""

    PAIRED = "paired"  # a prompt, a chosen and a rejected answer
    UNPAIRED = "unpaired"  # a prompt and one answer labelled desirable or not (KTO)
    GROUP = "group"  # a prompt with K answers (optionally scored)
    PROMPTS = "prompts"  # a prompt only; the answers are generated (online methods)


@dataclass
class PairLogps:
    """Answer log-probs of one model for a batch of preference pairs ([pairs] each)."""

    chosen: SequenceLogps
    rejected: SequenceLogps


@dataclass
class UnpairedLogps:
    """Answer log-probs of one model for a batch of unpaired (KTO) examples ([examples] each).

    `mismatched` scores another example's completion under this example's prompt (see
    `collate_unpaired`); `desirable` is the example's label.
    """

    completion: SequenceLogps
    mismatched: SequenceLogps
    desirable: torch.Tensor  # [examples] bool


@dataclass
class GroupLogps:
    """Per-token answer log-probs of one model for E examples of G answers each (GROUP shape).

    `tokens[e, g, t]` is log p of token t of answer g of example e, `mask` is 1 on real tokens
    (right-padded), `sequence` the per-answer `SequenceLogps` ([G · E], answer-slot-major as the
    engine returns them) and `examples` the examples themselves (their scores, old log-probs).
    """

    tokens: torch.Tensor  # [E, G, T]
    mask: torch.Tensor  # [E, G, T] float
    sequence: SequenceLogps
    examples: Sequence
    values: torch.Tensor | None = None  # [E, G, T]: a value head's per-token values, when the layout computes them (PPO)


def token_matrix(flat: torch.Tensor, batch_sequences: torch.Tensor, counts: torch.Tensor, num_examples: int, answers: int):
    """Per-target values (`[targets]`, in `target_sequence` order) as `[E, G, T]`, right-padded with 0, and the mask.

    `pack_examples` writes each sequence's targets in token order (rows hold the sequences in any
    order), so a stable sort by sequence puts target j of sequence s at `start_s + j`; sequence
    `g · E + e` is answer g of example e.
    """
    counts = counts.to(torch.long).to(flat.device)
    width = int(counts.max().item()) if counts.numel() else 0
    starts = torch.cumsum(counts, 0) - counts
    flat_sequence = batch_sequences.to(torch.long).to(flat.device)
    order = torch.sort(flat_sequence, stable=True).indices
    position = torch.empty_like(flat_sequence)
    position[order] = torch.arange(flat_sequence.numel(), device=flat_sequence.device) - starts[flat_sequence[order]]
    matrix = flat.new_zeros(answers * num_examples, width).index_put((flat_sequence, position), flat)
    mask = torch.zeros(answers * num_examples, width, device=flat.device)
    mask[flat_sequence, position] = 1.0
    # answer-slot-major [G, E, T] → example-major [E, G, T]
    return matrix.view(answers, num_examples, width).transpose(0, 1), mask.view(answers, num_examples, width).transpose(0, 1)


def per_token_matrix(logps: SequenceLogps, batch_sequences: torch.Tensor, num_examples: int, answers: int):
    """The engine's per-token log-probs as `[E, G, T]` and their mask (see `token_matrix`)."""
    return token_matrix(logps.token_logps, batch_sequences, logps.count, num_examples, answers)


@dataclass(frozen=True)
class ExampleLayout:
    """How examples of one shape are packed for the log-prob engine, and how its log-probs come back.

    `answers` lists which engine answer slots are the example's own answers (the ones evaluation
    rows record): both for pairs, the completion only for unpaired examples, all of them (None)
    for groups. `per_token` asks the engine for per-token log-probs.
    """

    collate: Callable[..., PackedBatch]  # (examples, *, pad_id) -> PackedBatch
    split: Callable[[SequenceLogps, Sequence, PackedBatch], Any]  # (engine output, examples, batch) -> the loss's log-probs
    answers: int | None
    per_token: bool = False
    # What scores a collated batch instead of the log-prob engine: (model, batch) -> SequenceLogps-shaped scores.
    forward: Callable[[torch.nn.Module, Any], SequenceLogps] | None = None


def _pair_logps(logps: SequenceLogps, examples: Sequence, batch: PackedBatch) -> PairLogps:
    return PairLogps(*logps.by_answer(2))


def _unpaired_logps(logps: SequenceLogps, examples: Sequence, batch: PackedBatch) -> UnpairedLogps:
    completion, mismatched = logps.by_answer(2)
    desirable = torch.tensor([example.label for example in examples], dtype=torch.bool, device=completion.sum.device)
    return UnpairedLogps(completion, mismatched, desirable)


def collate_groups(examples: Sequence, *, pad_id: int) -> PackedBatch:
    """Pack GROUP examples (a prompt and its G answers): the prompt is laid out once and shared by its G answers."""
    return pack_examples([example.prompt_ids for example in examples], [example.answer_ids for example in examples], pad_id=pad_id)


def _group_logps(logps: SequenceLogps, examples: Sequence, batch: PackedBatch) -> GroupLogps:
    tokens, mask = per_token_matrix(logps, batch.target_sequence, batch.num_examples, batch.answers_per_example)
    values = None
    if getattr(logps, "values", None) is not None:
        values, _ = token_matrix(logps.values, batch.target_sequence, logps.count, batch.num_examples, batch.answers_per_example)
    return GroupLogps(tokens, mask, logps, examples, values)


LAYOUTS: dict[DataShape, ExampleLayout] = {
    DataShape.PAIRED: ExampleLayout(collate_pairs, _pair_logps, answers=2),
    DataShape.UNPAIRED: ExampleLayout(collate_unpaired, _unpaired_logps, answers=1),
    # PROMPTS examples become GROUP examples in the method's rollout, before collate.
    DataShape.GROUP: ExampleLayout(collate_groups, _group_logps, answers=None, per_token=True),
    DataShape.PROMPTS: ExampleLayout(collate_groups, _group_logps, answers=None, per_token=True),
}


class Loss(Protocol):
    def __call__(self, policy: Any, reference: Any | None, **inputs: Any) -> LossOutput: ...


class MethodSettings(Section):
    """The settings every method has; each method's own schema extends this one."""

    loss_type: str = Field(description="the method; `preftune losses` lists them")


class BetaSettings(MethodSettings):
    beta: float = Field(0.1, gt=0.0, description="β: strength of the preference term (TRL's beta)")


@dataclass(frozen=True)
class ReportCurve:
    """A figure a method adds to its report section: the logged training metrics `metrics`, over steps."""

    title: str
    metrics: tuple[str, ...]


@dataclass(frozen=True)
class RolloutContext:
    """What a rollout sees: the policy (adapter on) and, when the method uses one, the reference; the
    tokenizer; the step (generation is seeded by `(seed, step)`, so a resumed run generates the same);
    `policy_logps(batch)` runs the engine on the policy without gradient (per-token; for πold);
    `evaluation` is True when it runs on validation prompts."""

    policy: torch.nn.Module
    tokenizer: Any
    step: int
    seed: int
    evaluation: bool
    policy_logps: Callable[[PackedBatch], SequenceLogps]
    pad_id: int
    # The reference's per-token log-probs without gradient (None when the method builds no reference).
    reference_logps: Callable[[PackedBatch], SequenceLogps] | None = None
    # The controllers' loss inputs at this step (e.g. PPO's KL coefficient).
    inputs: dict[str, Any] = field(default_factory=dict)


# (context, micro-batches of prompt examples) -> the same micro-batches as GROUP examples
Rollout = Callable[[RolloutContext, list[list[Any]]], list[list[Any]]]


class RolloutReuse:
    """One training rollout serves `every` consecutive steps (GRPO's num_iterations, PPO's ppo_epochs):
    the first step of each block generates, the others reuse it. Validation rollouts are never reused."""

    def __init__(self, every: int):
        self.every = every
        self._kept: tuple[int, Any] | None = None

    def block(self, step: int) -> int:
        """The step that generated (or will generate) the rollout `step` trains on; it also seeds it."""
        return step - step % self.every

    def reused(self, context: RolloutContext) -> Any | None:
        if context.evaluation or self._kept is None or self._kept[0] != self.block(context.step):
            return None
        return self._kept[1]

    def keep(self, context: RolloutContext, rollout: Any) -> None:
        if not context.evaluation and self.every > 1:
            self._kept = (self.block(context.step), rollout)


@dataclass(frozen=True)
class ProjectionSpec:
    """A projection step toward the feasible region, run by the loop right after each optimiser step.

    Up to `steps` plain-SGD steps θ ← θ − lr · ∇ mean_i penalty_i on the trainable parameters (the
    optimiser's moments untouched), on the same micro-batches as the optimiser step, stopping as soon
    as no example of the step is `violated`. Both functions take the shape's log-probs of the policy
    and of the reference (e.g. `PairLogps`): `penalty` returns [examples] (differentiable, 0 on a
    feasible example), `violated` returns [examples] bool.
    """

    steps: int
    lr: float
    penalty: Callable[[Any, Any], torch.Tensor]
    violated: Callable[[Any, Any], torch.Tensor]


@dataclass(frozen=True)
class Method:
    """A method = a loss plus what it needs. The loop knows methods only through this."""

    name: str
    summary: str
    settings: type[MethodSettings]
    build_loss: Callable[[Any], Loss]  # settings -> loss callable
    data_shape: DataShape = DataShape.PAIRED
    # Whether a reference is built; a function of the settings when it depends on them (GRPO: β > 0).
    needs_reference: bool | Callable[[Any], bool] = True
    # Checks the loaded examples before the model loads: (settings, train + validation examples) -> None or a DataError.
    check_examples: Callable[[Any, list[Any]], None] | None = None
    # Whether the loss reads the reference's log-probs; False (PPO: they enter the rollout's rewards) skips that forward per micro-batch.
    reference_in_loss: bool = True
    # Online methods: settings -> the rollout that turns prompt examples into scored GROUP examples.
    build_rollout: Callable[[Any], Rollout] | None = None
    # What the policy is: a causal LM, or a sequence-classification reward model (a scalar head).
    model_kind: Literal["causal_lm", "reward_model"] = "causal_lm"
    # A layout of the method's own instead of its data shape's (the reward model scores pairs with its head).
    example_layout: ExampleLayout | None = None
    # How final/ is written: (policy, tokenizer, final folder) -> None; None = the LoRA adapter and the merged model.
    export: Callable[[torch.nn.Module, Any, Path], None] | None = None
    # Trainable modules added to the policy before the optimiser is built: (policy, settings, seed) -> None (PPO's value head).
    attach_heads: Callable[[torch.nn.Module, Any, int], None] | None = None
    # Examples each micro-batch needs at least (KTO estimates its KL baseline from the other examples).
    min_batch_size: int = 1
    controllers: Callable[[Any], list[Controller]] = lambda settings: []
    # settings -> the projection step the loop runs after each optimiser step, or None (CPO's projection_steps).
    projection: Callable[[Any], ProjectionSpec | None] = lambda settings: None
    # The report section this method (and its controllers) add, read from the run folder alone:
    # (title, markdown lines), and the curves drawn under it.
    report_section: Callable[[RunRecords], tuple[str, list[str]] | None] | None = None
    report_curves: tuple[ReportCurve, ...] = ()
    aliases: tuple[str, ...] = ()

    @property
    def layout(self) -> ExampleLayout:
        if self.example_layout is not None:
            return self.example_layout
        if self.data_shape not in LAYOUTS:
            raise NotImplementedError(f"method {self.name}: no offline layout for {self.data_shape.value} data")
        return LAYOUTS[self.data_shape]

    def uses_reference(self, settings: Any) -> bool:
        return self.needs_reference(settings) if callable(self.needs_reference) else self.needs_reference

    def default_settings(self) -> MethodSettings:
        return self.settings(loss_type=self.name)


def sums(logps: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    return logps.chosen.sum, logps.rejected.sum


def means(logps: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
    return logps.chosen.mean, logps.rejected.mean


@dataclass(frozen=True)
class ReferenceRatioLoss:
    """Adapts a pure loss of (policy c, policy r, reference c, reference r) log-probs to the `Loss` protocol.

    `statistic` picks summed (`sums`) or per-token mean (`means`) answer log-probs; `options` are
    the formula's keyword arguments, taken from the method's settings.
    """

    function: Callable[..., LossOutput]
    statistic: Callable[[PairLogps], tuple[torch.Tensor, torch.Tensor]]
    options: dict[str, Any]

    def __call__(self, policy: PairLogps, reference: PairLogps | None) -> LossOutput:
        if reference is None:
            raise ValueError(f"{self.function.__name__} needs reference log-probs")
        return self.function(*self.statistic(policy), *self.statistic(reference), **self.options)


@dataclass(frozen=True)
class PolicyOnlyLoss:
    """Adapts a reference-free pure loss of (policy c, policy r) log-probs to the `Loss` protocol."""

    function: Callable[..., LossOutput]
    statistic: Callable[[PairLogps], tuple[torch.Tensor, torch.Tensor]]
    options: dict[str, Any]

    def __call__(self, policy: PairLogps, reference: PairLogps | None) -> LossOutput:
        return self.function(*self.statistic(policy), **self.options)
