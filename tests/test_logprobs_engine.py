"""Every fast path of the log-prob engine against the plain computation: log-probs, loss and gradients.

The plain computation (`unshared_sequence_logps`) runs one right-padded sequence per (prompt,
answer) through the full model and takes log_softmax over the whole vocabulary. The engine shares
each prompt between its answers, packs several pairs into a row behind a block mask, and projects
only answer positions onto the vocabulary in chunks (a frozen head's gradient formed in forward,
a trained head's chunks checkpointed). Both must agree.
"""

from __future__ import annotations

import pytest
import torch

from preftune.data.collate import collate_pairs
from preftune.logprobs import engine, sequence_logps, unshared_sequence_logps
from preftune.logprobs.attention import PACKED_SDPA
from preftune.losses.dpo import dpo_loss
from preftune.model.lora import apply_lora
from preftune.model.reference import ReferenceModel
from tests.support import load_test_tokenizer, tiny_llama, tokenized_hh_pairs

LOGPS_TOLERANCE = dict(rtol=1e-5, atol=1e-4)  # sums over up to ~60 tokens of float32 log-probs


def assert_grads_close(actual: torch.Tensor, expected: torch.Tensor, name: str) -> None:
    """Float32 summation order differs between the paths: tolerance relative to the gradient's scale."""
    assert expected.abs().max() > 0, name
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item(), msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def tokenizer():
    return load_test_tokenizer()


@pytest.fixture(scope="module")
def pairs(tokenizer):
    """Six real hh-rlhf pairs tokenised as a run would: the longest of 40 and five short ones that pack beside it."""
    by_length = sorted(tokenized_hh_pairs(tokenizer, read=40), key=lambda p: len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids))
    return [by_length[0], by_length[1], by_length[-1], by_length[2], by_length[3], by_length[4]]


def _plain(model, pairs, pad_id):
    return unshared_sequence_logps(
        model, [p.prompt_ids for p in pairs], [(p.chosen_ids, p.rejected_ids) for p in pairs], pad_id=pad_id
    )


def _lora_policy(vocab_size: int):
    """A LoRA policy whose adapter is not zero, so policy and reference differ."""
    model = apply_lora(tiny_llama(vocab_size), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    return model


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def test_the_batch_is_really_packed_and_shares_prompts(pairs, tokenizer):
    batch = collate_pairs(pairs, pad_id=tokenizer.pad_token_id)
    unshared_tokens = 2 * len(pairs) * max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs)
    assert batch.input_ids.shape[0] < len(pairs)  # several pairs share a row
    assert batch.num_tokens < unshared_tokens


def test_one_row_drops_the_padding_and_keeps_every_token_target_and_mask_block(pairs, tokenizer):
    batch = collate_pairs(pairs, pad_id=tokenizer.pad_token_id)
    one = batch.in_one_row()
    real = sum(batch.row_fill)
    assert batch.num_tokens > real and one.input_ids.shape == (1, real) and one.row_fill == [real]
    rows = [slice(row * batch.input_ids.shape[1], row * batch.input_ids.shape[1] + fill) for row, fill in enumerate(batch.row_fill)]
    assert torch.equal(one.input_ids[0], torch.cat([batch.input_ids.flatten()[r] for r in rows]))
    assert torch.equal(one.position_ids[0], torch.cat([batch.position_ids.flatten()[r] for r in rows]))
    assert torch.equal(one.input_ids.flatten()[one.target_index], batch.input_ids.flatten()[batch.target_index])
    assert torch.equal(one.target_ids, batch.target_ids) and torch.equal(one.target_sequence, batch.target_sequence)
    start = 0
    for row, fill in enumerate(batch.row_fill):  # each row's mask is a diagonal block; nothing sees across rows
        assert torch.equal(one.attention_mask[0, 0, start : start + fill, start : start + fill], batch.attention_mask[row, 0, :fill, :fill])
        assert not one.attention_mask[0, 0, start : start + fill, :start].any()
        start += fill
    assert one.in_one_row() is one


def test_the_engine_runs_one_row_only_with_the_packed_attention_and_up_to_its_token_limit(pairs, tokenizer, monkeypatch):
    batch = collate_pairs(pairs, pad_id=tokenizer.pad_token_id)
    model = tiny_llama(len(tokenizer)).eval()
    assert engine.engine_layout(model, batch).input_ids.shape[0] == 1
    monkeypatch.setattr(engine, "ONE_ROW_TOKENS", sum(batch.row_fill) - 1)
    assert engine.engine_layout(model, batch) is batch
    with torch.no_grad():
        in_rows = sequence_logps(model, batch)
    monkeypatch.undo()
    with torch.no_grad():
        in_one_row = sequence_logps(model, batch)
    torch.testing.assert_close(in_one_row.sum, in_rows.sum, **LOGPS_TOLERANCE)
    model.config._attn_implementation = "sdpa"  # a dense kernel would pay for the long row's length squared
    assert engine.engine_layout(model, batch) is batch


@pytest.mark.parametrize("attention", [PACKED_SDPA, "sdpa", "eager"])
def test_shared_prompt_packed_logps_equal_the_plain_computation(pairs, tokenizer, attention):
    model = tiny_llama(len(tokenizer)).eval()
    model.config._attn_implementation = attention
    batch = collate_pairs(pairs, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        fast = sequence_logps(model, batch)
        plain = _plain(model, pairs, tokenizer.pad_token_id)
    torch.testing.assert_close(fast.sum, plain.sum, **LOGPS_TOLERANCE)
    assert fast.count.tolist() == plain.count.tolist()
    expected_counts = [len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs]
    assert fast.count.tolist() == expected_counts


def test_packed_batches_give_the_same_per_pair_logps_as_one_pair_per_batch(pairs, tokenizer):
    model = tiny_llama(len(tokenizer)).eval()
    with torch.no_grad():
        packed = sequence_logps(model, collate_pairs(pairs, pad_id=tokenizer.pad_token_id))
        alone = [sequence_logps(model, collate_pairs([pair], pad_id=tokenizer.pad_token_id)) for pair in pairs]
    chosen, rejected = packed.by_answer(2)
    torch.testing.assert_close(chosen.sum, torch.cat([a.sum[:1] for a in alone]), **LOGPS_TOLERANCE)
    torch.testing.assert_close(rejected.sum, torch.cat([a.sum[1:] for a in alone]), **LOGPS_TOLERANCE)


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_gradients_equal_the_plain_computation(pairs, tokenizer, adapter):
    """Every trainable weight, and with a full fine-tune the embedding rows of prompt tokens, gets the same gradient."""
    model = _lora_policy(len(tokenizer)) if adapter == "lora" else tiny_llama(len(tokenizer))
    model.train()
    weights = torch.linspace(-1.0, 1.0, 2 * len(pairs))  # a different weight per sequence exercises every path

    (weights * sequence_logps(model, collate_pairs(pairs, pad_id=tokenizer.pad_token_id), chunk_size=16).sum).sum().backward()
    fast = _grads(model)
    (weights * _plain(model, pairs, tokenizer.pad_token_id).sum).sum().backward()
    plain = _grads(model)

    assert fast.keys() == plain.keys() and fast
    for name in plain:
        assert_grads_close(fast[name], plain[name], name)
    if adapter == "full":
        embedding = next(name for name in plain if "embed_tokens" in name)
        prompt_only = sorted({t for p in pairs for t in p.prompt_ids} - {t for p in pairs for t in p.chosen_ids + p.rejected_ids})
        assert prompt_only and plain[embedding][prompt_only].abs().sum() > 0  # prompt tokens do receive gradient


def test_chunk_size_changes_neither_logps_nor_gradients(pairs, tokenizer):
    model = _lora_policy(len(tokenizer)).train()
    batch = collate_pairs(pairs, pad_id=tokenizer.pad_token_id)
    results = []
    for chunk_size in (1, 7, 100_000):
        logps = sequence_logps(model, batch, chunk_size=chunk_size)
        logps.sum.sum().backward()
        results.append((logps.sum.detach(), _grads(model)))
    reference_sums, reference_grads = results[-1]
    for sums, grads in results[:-1]:
        torch.testing.assert_close(sums, reference_sums, **LOGPS_TOLERANCE)
        for name in reference_grads:
            assert_grads_close(grads[name], reference_grads[name], name)


@pytest.mark.parametrize("adapter", ["lora", "full"])
def test_no_full_vocabulary_tensor_is_kept_for_backward(pairs, tokenizer, adapter):
    """Frozen head (LoRA) or checkpointed chunks (trained head): autograd saves no [positions, vocab] tensor."""
    model = _lora_policy(len(tokenizer)).train() if adapter == "lora" else tiny_llama(len(tokenizer)).train()
    batch = collate_pairs(pairs, pad_id=tokenizer.pad_token_id)
    vocab = len(tokenizer)
    saved_shapes = []

    def pack(tensor):
        saved_shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        sequence_logps(model, batch, chunk_size=8).sum.sum().backward()
    assert saved_shapes
    assert not [shape for shape in saved_shapes if shape and shape[-1] == vocab and shape != model.get_output_embeddings().weight.shape]


def _engine_and_plain_dpo(policy, pairs, tokenizer, batch):
    """(policy log-probs, DPO losses, LoRA gradients) through the engine on `batch`, then through the plain computation."""
    reference = ReferenceModel(policy, chunk_size=32).logps(batch)
    fast_policy = sequence_logps(policy, batch, chunk_size=32)
    (ref_chosen, ref_rejected), (chosen, rejected) = reference.by_answer(2), fast_policy.by_answer(2)
    fast = dpo_loss(chosen.sum, rejected.sum, ref_chosen.sum, ref_rejected.sum, beta=0.5).losses
    fast.sum().backward()
    fast_grads = _grads(policy)

    with torch.no_grad(), policy.disable_adapter():
        policy.eval()
        plain_reference = _plain(policy, pairs, tokenizer.pad_token_id)
    policy.train()
    plain_policy = _plain(policy, pairs, tokenizer.pad_token_id)
    n = len(pairs)
    plain = dpo_loss(
        plain_policy.sum[:n], plain_policy.sum[n:], plain_reference.sum[:n], plain_reference.sum[n:], beta=0.5
    ).losses
    plain.sum().backward()
    assert not torch.allclose(plain_policy.sum, plain_reference.sum)  # the adapter matters, so the loss is not log 2
    return (fast_policy.sum.detach(), fast.detach(), fast_grads), (plain_policy.sum.detach(), plain.detach(), _grads(policy))


def test_dpo_loss_and_gradients_equal_the_plain_two_sequence_computation(pairs, tokenizer):
    policy = _lora_policy(len(tokenizer)).train()
    batch = collate_pairs(pairs, pad_id=tokenizer.pad_token_id)
    (_, fast, fast_grads), (_, plain, plain_grads) = _engine_and_plain_dpo(policy, pairs, tokenizer, batch)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    for name in plain_grads:
        assert_grads_close(fast_grads[name], plain_grads[name], name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the FlexAttention path of the engine runs on CUDA only")
def test_on_cuda_the_flex_attention_engine_gives_the_plain_dpo_loss_and_gradients(pairs, tokenizer):
    """The engine on CUDA: the packed row's block mask through compiled FlexAttention (attention.py), a model's whole
    forward and backward, against one padded sequence per answer with transformers' own sdpa attention (what the
    packed attention falls back to without a plan)."""
    policy = _lora_policy(len(tokenizer)).cuda().train()
    batch = collate_pairs(pairs, pad_id=tokenizer.pad_token_id).to("cuda")
    (fast_logps, fast, fast_grads), (plain_logps, plain, plain_grads) = _engine_and_plain_dpo(policy, pairs, tokenizer, batch)
    # Looser than on CPU: CUDA's fp32 kernels (Triton's among them) may round through TF32.
    torch.testing.assert_close(fast_logps, plain_logps, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(fast, plain, rtol=1e-3, atol=1e-3)
    for name in plain_grads:
        assert plain_grads[name].abs().max() > 0, name
        torch.testing.assert_close(
            fast_grads[name], plain_grads[name], rtol=1e-2, atol=1e-3 * plain_grads[name].abs().max().item(), msg=lambda m: f"{name}: {m}"
        )


def test_per_token_log_probs_and_hidden_states_match_the_plain_forward(tokenizer, pairs):
    model = tiny_llama(len(tokenizer)).eval()
    batch = collate_pairs(pairs, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logps = sequence_logps(model, batch, per_token=True, hidden_states=True)
        # The token log-probs add up to the per-sequence sums, sequence by sequence.
        summed = torch.zeros_like(logps.sum).index_add(0, batch.target_sequence, logps.token_logps)
        torch.testing.assert_close(summed, logps.sum)
        # Each answer's token log-probs equal the plain unpacked forward's, token by token.
        first = pairs[0]
        sequence = torch.tensor([first.prompt_ids + first.chosen_ids])
        plain = torch.log_softmax(model(input_ids=sequence).logits[0, :-1].float(), -1)
        targets = sequence[0, 1:]
        expected = plain.gather(-1, targets[:, None]).squeeze(-1)[len(first.prompt_ids) - 1 :]
        torch.testing.assert_close(logps.token_logps[batch.target_sequence == 0], expected, **LOGPS_TOLERANCE)
        # The hidden states are the final decoder states at the predicting positions.
        hidden = model.model(input_ids=sequence).last_hidden_state[0, len(first.prompt_ids) - 1 : -1]
        torch.testing.assert_close(logps.hidden[batch.target_sequence == 0], hidden, rtol=1e-4, atol=1e-4)
