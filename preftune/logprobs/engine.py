"""The one log-prob engine: a model and a packed batch in, per-sequence answer log-probs out.

Every method, the evaluator, the probes and the reward path go through `sequence_logps`.
Its fast paths (shared prompt, packing, answer-only chunked logits) must agree with
`unshared_sequence_logps`, the plain computation, to float tolerance; tests hold them to it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from preftune.data.collate import PackedBatch
from preftune.logprobs.attention import PACKED_SDPA, PLAN_ARGUMENT, BlockMask, KeyRanges, packed_attention_plan
from preftune.logprobs.head import chunked_token_logps

# Config attributes of architectures whose logits are not simply `lm_head(final hidden state)`.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
DEFAULT_CHUNK_SIZE = 512
# With the packed attention a batch of up to this many tokens runs as one row without padding: its
# attention costs what the blocks see, not the row's length squared; the boolean mask (16 MB here) does.
ONE_ROW_TOKENS = 4096
# The attribute under which a sharded model carries `answer_forward` wrapped in its root's FSDP hooks.
SHARDED_ANSWER_FORWARD = "preftune_answer_forward"


@dataclass
class SequenceLogps:
    """Answer log-probs per sequence (`sum`, `count`: [sequences]); see PackedBatch for the order.

    With `per_token=True` the engine also returns `token_logps` ([targets]: log p of every answer
    token, in `batch.target_sequence` order) and with `hidden_states=True` the final hidden state
    at each predicting position (`hidden`: [targets, hidden size]): what token-level KL, PPO
    values and reward heads need.
    """

    sum: torch.Tensor
    count: torch.Tensor
    token_logps: torch.Tensor | None = None
    hidden: torch.Tensor | None = None

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    def by_answer(self, answers_per_example: int) -> list[SequenceLogps]:
        """Split into one SequenceLogps per answer slot (for pairs: chosen, rejected)."""
        sums = self.sum.chunk(answers_per_example)
        counts = self.count.chunk(answers_per_example)
        return [SequenceLogps(s, c) for s, c in zip(sums, counts)]


def sequence_logps(
    model: torch.nn.Module,
    batch: PackedBatch,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    per_token: bool = False,
    hidden_states: bool = False,
) -> SequenceLogps:
    """Sum of log p(answer token | context) per sequence, computing logits only at answer positions.

    The vocabulary projection runs over `chunk_size` answer positions at a time and no [tokens,
    vocab] tensor lives longer than one chunk: a frozen head forms each chunk's gradient in
    forward, a trained one is recomputed in backward (preftune/logprobs/head.py). With the packed
    attention a batch of at most `ONE_ROW_TOKENS` tokens runs as one row, its padding dropped.
    """
    decoder, head = _decoder_and_head(model)
    batch = engine_layout(model, batch)
    mask = _attention_mask_for(model, batch.attention_mask)
    answer_hidden = None
    if decoder is not None:
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        # A sharded model registers this computation as a forward of its root (preftune/train/distributed.py).
        forward = getattr(inner, SHARDED_ANSWER_FORWARD, None) or partial(answer_forward, inner)
        attention_plan = packed_attention_plan(mask) if _attention_implementation(inner) == PACKED_SDPA else None
        token_logps, answer_hidden = forward(
            batch.input_ids, batch.position_ids, mask, batch.target_index, batch.target_ids, chunk_size=chunk_size,
            attention_plan=attention_plan,
        )
    else:
        outputs = model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=mask,
            output_hidden_states=hidden_states,
        )
        answer_logits = outputs.logits.reshape(-1, outputs.logits.shape[-1])[batch.target_index].float()
        token_logps = answer_logits.gather(-1, batch.target_ids[:, None]).squeeze(-1) - answer_logits.logsumexp(-1)
        if hidden_states:
            last = outputs.hidden_states[-1]
            answer_hidden = last.reshape(-1, last.shape[-1])[batch.target_index]
    logps = _per_sequence(token_logps, batch.target_sequence, batch.num_sequences)
    if per_token:
        logps.token_logps = token_logps
    if hidden_states:
        logps.hidden = answer_hidden
    return logps


def engine_layout(model: torch.nn.Module, batch: PackedBatch) -> PackedBatch:
    """`batch` laid out as `sequence_logps` runs it on `model`: one row without padding when the
    model's attention is the packed one and the batch has at most `ONE_ROW_TOKENS` tokens, else as is."""
    decoder, _head = _decoder_and_head(model)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if decoder is not None and _attention_implementation(inner) == PACKED_SDPA and sum(batch.row_fill) <= ONE_ROW_TOKENS:
        return batch.in_one_row()
    return batch


def answer_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    target_index: torch.Tensor,
    target_ids: torch.Tensor,
    *,
    chunk_size: int,
    attention_plan: KeyRanges | BlockMask | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p of each target token [targets], the final hidden state predicting it [targets, hidden]).

    `model` is the plain causal LM (not a peft wrapper). The decoder runs once; the LM head runs
    over `chunk_size` answer positions at a time. It is a function of the model and tensors only, so
    a sharded model can register it as a forward of its root module: the root's parameters (the
    embeddings, the final norm, the LM head) are then gathered once around the whole computation
    and the chunk loop issues no collective, whatever each process's number of answer tokens.
    `attention_plan` reaches the attention of a model loaded with `PACKED_SDPA` (preftune/logprobs/attention.py).
    """
    decoder, head = _decoder_and_head(model)
    attention = {} if attention_plan is None else {PLAN_ARGUMENT: attention_plan}
    outputs = decoder(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, **attention)
    hidden = outputs.last_hidden_state
    answer_hidden = hidden.reshape(-1, hidden.shape[-1])[target_index]  # [targets, hidden]
    return chunked_token_logps(head, answer_hidden, target_ids, chunk_size), answer_hidden


def _per_sequence(token_logps: torch.Tensor, sequence: torch.Tensor, num_sequences: int) -> SequenceLogps:
    sums = torch.zeros(num_sequences, dtype=token_logps.dtype, device=token_logps.device).index_add(0, sequence, token_logps)
    counts = torch.bincount(sequence, minlength=num_sequences).to(token_logps.dtype)
    return SequenceLogps(sums, counts)


def _decoder_and_head(model: torch.nn.Module) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    """(decoder returning final hidden states, LM head), or (None, None) when logits need the full forward."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wraps the HF model
    config = getattr(inner, "config", None)
    if config is None or any(getattr(config, name, None) for name in _LOGIT_TRANSFORMS):
        return None, None
    try:
        decoder, head = inner.get_decoder(), inner.get_output_embeddings()
    except (AttributeError, NotImplementedError, ValueError):
        return None, None
    if decoder is None or head is None or decoder is inner:
        return None, None
    return decoder, head


def _attention_implementation(inner: torch.nn.Module) -> str:
    """The attention implementation of the plain causal LM (not a peft wrapper: callers have unwrapped it)."""
    return getattr(inner.config, "_attn_implementation", "sdpa")


def _attention_mask_for(model: torch.nn.Module, mask: torch.Tensor) -> torch.Tensor:
    """SDPA takes the boolean block mask as is; eager attention adds a float mask to the scores."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    implementation = _attention_implementation(inner)
    if implementation in ("sdpa", PACKED_SDPA):
        return mask
    if implementation == "eager":
        dtype = next(inner.parameters()).dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    raise ValueError(
        f"attention implementation '{implementation}' cannot take preftune's block mask: load the model with "
        f"attn_implementation='{PACKED_SDPA}' (preftune's default), 'sdpa' or 'eager'"
    )


def unshared_sequence_logps(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[Sequence[int]]],
    *,
    pad_id: int,
) -> SequenceLogps:
    """The plain computation: one right-padded sequence per (prompt, answer), full logits, log-softmax.

    Same sequence order as `sequence_logps`. This is the baseline every fast path is tested
    against and what a trainer without prompt sharing or packing does.
    """
    answers_per_example = len(answers[0])
    sequences, prompt_lengths = [], []
    for slot in range(answers_per_example):
        for prompt, example_answers in zip(prompts, answers):
            sequences.append(list(prompt) + list(example_answers[slot]))
            prompt_lengths.append(len(prompt))
    length = max(map(len, sequences))
    device = next(model.parameters()).device
    input_ids = torch.full((len(sequences), length), pad_id, dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long, device=device)
    labels_mask = torch.zeros((len(sequences), length), dtype=torch.bool, device=device)
    for i, (sequence, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
        input_ids[i, : len(sequence)] = torch.tensor(sequence)
        attention_mask[i, : len(sequence)] = 1
        labels_mask[i, prompt_length : len(sequence)] = True
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    token_logps = F.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    scored = labels_mask[:, 1:]
    return SequenceLogps((token_logps * scored).sum(-1), scored.sum(-1).to(token_logps.dtype))
