"""The reference model: a view of the policy with its adapter disabled (LoRA), or a frozen copy.

With LoRA there is no second copy of the weights: `disable_adapter()` runs the frozen base.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext

import torch

from preftune.data.collate import PackedBatch
from preftune.logprobs import SequenceLogps, sequence_logps
from preftune.model.lora import is_lora


class ReferenceModel:
    """Reference log-probs under `torch.no_grad()` in eval mode (no dropout)."""

    def __init__(self, policy: torch.nn.Module, *, chunk_size: int):
        self.chunk_size = chunk_size
        if is_lora(policy):
            self.model = policy
            self._view = policy.disable_adapter
            self.kind = "adapter-disabled view of the policy"
        else:
            self.model = copy.deepcopy(policy).eval().requires_grad_(False)
            self._view = nullcontext
            self.kind = "frozen copy of the initial policy"

    def view(self) -> AbstractContextManager:
        return self._view()

    @torch.no_grad()
    def logps(self, batch: PackedBatch, *, per_token: bool = False) -> SequenceLogps:
        was_training = self.model.training
        self.model.eval()
        try:
            with self.view():
                return sequence_logps(self.model, batch, chunk_size=self.chunk_size, per_token=per_token)
        finally:
            self.model.train(was_training)
