"""The LM head's answer log-probs: the frozen-head function (gradient formed in forward) against autograd of log_softmax."""

from __future__ import annotations

import pytest
import torch

from preftune.logprobs.head import FrozenHeadLogps, chunked_token_logps


def _head(vocab: int, hidden: int, *, bias: bool, dtype: torch.dtype = torch.float32) -> torch.nn.Linear:
    head = torch.nn.Linear(hidden, vocab, bias=bias).to(dtype)
    with torch.no_grad():
        head.weight.mul_(8.0)  # peaked logits, as a trained LM's are, so the softmax is far from uniform
    return head.requires_grad_(False)


def _autograd_logps(head: torch.nn.Linear, hidden: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(head(hidden).float(), -1).gather(-1, target_ids[:, None]).squeeze(-1)


@pytest.mark.parametrize("bias", [False, True])
def test_frozen_head_logps_and_hidden_gradient_equal_autograd_of_log_softmax(bias):
    torch.manual_seed(0)
    head = _head(vocab=300, hidden=24, bias=bias)
    hidden = torch.randn(37, 24, dtype=torch.float64).float()
    target_ids = torch.randint(0, 300, (37,))
    upstream = torch.randn(37)  # a different weight per token, as a loss over sequence sums gives

    fused_hidden = hidden.clone().requires_grad_(True)
    fused = FrozenHeadLogps.apply(fused_hidden, head.weight, head.bias, target_ids)
    (fused * upstream).sum().backward()
    plain_hidden = hidden.clone().requires_grad_(True)
    plain = _autograd_logps(head, plain_hidden, target_ids)
    (plain * upstream).sum().backward()

    assert plain.min() < -5  # the check is not made on near-uniform log-probs
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused_hidden.grad, plain_hidden.grad, rtol=1e-4, atol=1e-5)


def test_frozen_head_saves_only_a_hidden_sized_tensor_per_chunk():
    torch.manual_seed(1)
    head = _head(vocab=500, hidden=16, bias=False)
    hidden = torch.randn(40, 16, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        logps = chunked_token_logps(head, hidden, torch.randint(0, 500, (40,)), chunk_size=16)
    assert saved == [(16, 16), (16, 16), (8, 16)]
    logps.sum().backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_a_trained_head_still_gets_its_gradient():
    """Tied embeddings or a full fine-tune: the head's weight needs ∂/∂W, so its chunks take the recomputed path."""
    torch.manual_seed(2)
    head = _head(vocab=200, hidden=12, bias=False).requires_grad_(True)
    hidden = torch.randn(30, 12, requires_grad=True)
    target_ids = torch.randint(0, 200, (30,))
    chunked_token_logps(head, hidden, target_ids, chunk_size=7).sum().backward()
    chunked = head.weight.grad.clone(), hidden.grad.clone()
    head.weight.grad, hidden.grad = None, None
    _autograd_logps(head, hidden, target_ids).sum().backward()
    torch.testing.assert_close(chunked[0], head.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(chunked[1], hidden.grad, rtol=1e-4, atol=1e-6)


def test_a_bf16_head_gives_fp32_log_probs_from_its_bf16_logits():
    torch.manual_seed(3)
    head = _head(vocab=256, hidden=32, bias=False, dtype=torch.bfloat16)
    hidden = torch.randn(9, 32, dtype=torch.bfloat16, requires_grad=True)
    target_ids = torch.randint(0, 256, (9,))
    logps = chunked_token_logps(head, hidden, target_ids, chunk_size=4)
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, _autograd_logps(head, hidden.detach(), target_ids), rtol=0, atol=1e-5)
    logps.sum().backward()
    assert hidden.grad.dtype == torch.bfloat16 and hidden.grad.abs().sum() > 0
