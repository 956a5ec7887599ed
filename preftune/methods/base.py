"""A method is one declaration: its loss formula, the data shape it consumes, whether it needs a
reference, its own validated settings, its controllers and the section it adds to the report.

The training loop takes a `Method` and knows no method names. The loss it builds is called once
per micro-batch as `loss(policy, reference, **inputs)`, where `policy`/`reference` are the
shape's log-probs (`PairLogps`, `UnpairedLogps`) and `inputs` are the controllers' `loss_inputs()`
(e.g. CPO's λ).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import torch
from pydantic import Field

from preftune.control import Controller
from preftune.data.collate import PackedBatch, collate_pairs, collate_unpaired
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


@dataclass(frozen=True)
class ExampleLayout:
    """How examples of one shape are packed for the log-prob engine, and how its log-probs come back.

    `answers` lists which engine answer slots are the example's own answers (the ones evaluation
    rows record): both for pairs, the completion only for unpaired examples.
    """

    collate: Callable[..., PackedBatch]  # (examples, *, pad_id) -> PackedBatch
    split: Callable[[SequenceLogps, Sequence], Any]  # (engine output, examples) -> the loss's log-probs
    answers: int


def _pair_logps(logps: SequenceLogps, examples: Sequence) -> PairLogps:
    return PairLogps(*logps.by_answer(2))


def _unpaired_logps(logps: SequenceLogps, examples: Sequence) -> UnpairedLogps:
    completion, mismatched = logps.by_answer(2)
    desirable = torch.tensor([example.label for example in examples], dtype=torch.bool, device=completion.sum.device)
    return UnpairedLogps(completion, mismatched, desirable)


LAYOUTS: dict[DataShape, ExampleLayout] = {
    DataShape.PAIRED: ExampleLayout(collate_pairs, _pair_logps, answers=2),
    DataShape.UNPAIRED: ExampleLayout(collate_unpaired, _unpaired_logps, answers=1),
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
class Method:
    """A method = a loss plus what it needs. The loop knows methods only through this."""

    name: str
    summary: str
    settings: type[MethodSettings]
    build_loss: Callable[[Any], Loss]  # settings -> loss callable
    data_shape: DataShape = DataShape.PAIRED
    needs_reference: bool = True
    # Examples each micro-batch needs at least (KTO estimates its KL baseline from the other examples).
    min_batch_size: int = 1
    controllers: Callable[[Any], list[Controller]] = lambda settings: []
    # The report section this method (and its controllers) add, read from the run folder alone:
    # (title, markdown lines), and the curves drawn under it.
    report_section: Callable[[RunRecords], tuple[str, list[str]] | None] | None = None
    report_curves: tuple[ReportCurve, ...] = ()
    aliases: tuple[str, ...] = ()

    @property
    def layout(self) -> ExampleLayout:
        if self.data_shape not in LAYOUTS:
            raise NotImplementedError(f"method {self.name}: no offline layout for {self.data_shape.value} data")
        return LAYOUTS[self.data_shape]

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
