"""The reference model: a view of the policy with its adapter disabled (LoRA), or a frozen copy.

With LoRA there is no second copy of the weights: `disable_adapter()` runs the frozen base.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch

from preftune.data.collate import PackedBatch
from preftune.logprobs import SequenceLogps, sequence_logps
from preftune.model.lora import is_lora


class ReferenceModel:
    """Reference log-probs under `torch.no_grad()` in eval mode (no dropout)."""

    def __init__(self, policy: torch.nn.Module, *, chunk_size: int, before_adapter_switch: Callable[[], None] | None = None):
        """`before_adapter_switch` runs before the adapter is switched off and again before it is switched back
        on: peft sets `requires_grad` on the parameters the modules hold at that moment, and under FSDP
        (preftune/train/distributed.py) they must then be the shards the optimiser holds, not gathered copies."""
        self.chunk_size = chunk_size
        self._before_adapter_switch = before_adapter_switch or (lambda: None)
        if is_lora(policy):
            self.model = policy
            self._view = policy.disable_adapter
            self.kind = "adapter-disabled view of the policy"
        else:
            self.model = copy.deepcopy(policy).eval().requires_grad_(False)
            self._view = nullcontext
            self.kind = "frozen copy of the initial policy"

    @contextmanager
    def view(self) -> Iterator[None]:
        self._before_adapter_switch()
        with self._view():
            try:
                yield
            finally:
                self._before_adapter_switch()

    @torch.no_grad()
    def logps(self, batch: PackedBatch, *, per_token: bool = False) -> SequenceLogps:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.view():
                return sequence_logps(self.model, batch, chunk_size=self.chunk_size, per_token=per_token)
        finally:
            self.model.train(was_training)
