"""Answer-token log-probs from the LM head, a chunk of positions at a time: log p(y) = z_y − logsumexp(z), z = W h + b.

With a frozen head (LoRA, or any run that does not train the output embeddings) the gradient of
one token's log-prob with respect to its hidden state is known in closed form,

    ∂ log p(y | h) / ∂h = W_y − softmax(z) · W,

so `FrozenHeadLogps` computes it in the forward, while the chunk's logits exist, and keeps only
that [chunk, hidden] tensor for backward, where it is scaled by the incoming per-token gradient.
That is two vocabulary matmuls per chunk instead of the three of recomputing the chunk in
backward (forward, recomputed forward, backward), and no [chunk, vocab] tensor outlives the
forward. The logits are fp32 whatever the head's dtype, and the softmax runs in place on them.
The same idea is behind fused linear cross-entropy kernels (Liger-Kernel's
`LigerFusedLinearCrossEntropy`, Apple's Cut Cross-Entropy); here it is plain PyTorch.

A trained head (a full fine-tune, tied embeddings included) also needs ∂/∂W, a [vocab, hidden]
sum over every chunk: those chunks are checkpointed instead (recomputed in backward).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class FrozenHeadLogps(torch.autograd.Function):
    """log p(target | hidden) [chunk] through a head that takes no gradient; the gradient to `hidden` is formed in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target_ids: torch.Tensor):
        logits = F.linear(hidden, weight, bias).float()
        target_logits = logits.gather(-1, target_ids[:, None]).squeeze(-1)
        peak = logits.amax(-1, keepdim=True)
        probabilities = logits.sub_(peak).exp_()  # in place: the chunk's one [chunk, vocab] buffer
        total = probabilities.sum(-1, keepdim=True)
        logps = target_logits - (peak + total.log()).squeeze(-1)
        if ctx.needs_input_grad[0]:
            probabilities.div_(total)
            expected_row = (probabilities.to(weight.dtype) @ weight).float()
            ctx.save_for_backward((weight[target_ids].float() - expected_row).to(hidden.dtype))
        return logps

    @staticmethod
    def backward(ctx, grad_logps: torch.Tensor):
        (grad_per_token,) = ctx.saved_tensors
        return grad_logps[:, None].to(grad_per_token.dtype) * grad_per_token, None, None, None


def chunked_token_logps(head: torch.nn.Module, hidden: torch.Tensor, target_ids: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """log p of each target token [targets] from `hidden` [targets, hidden size], `chunk_size` positions at a time."""
    head_trains = any(parameter.requires_grad for parameter in head.parameters())
    needs_grad = torch.is_grad_enabled() and hidden.requires_grad
    pieces = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, ids = hidden[start : start + chunk_size], target_ids[start : start + chunk_size]
        if isinstance(head, torch.nn.Linear) and not (needs_grad and head_trains):
            pieces.append(FrozenHeadLogps.apply(h, head.weight, head.bias, ids))
        elif needs_grad:
            pieces.append(checkpoint(_token_logps, head, h, ids, use_reentrant=False))
        else:
            pieces.append(_token_logps(head, h, ids))
    return torch.cat(pieces)


def _token_logps(head: torch.nn.Module, hidden: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, target_ids[:, None]).squeeze(-1) - logits.logsumexp(-1)
