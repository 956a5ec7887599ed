"""The one generation path for the online methods (GRPO, PPO) and Constitutional AI.

`generate` samples completions with transformers' `model.generate` (KV cache, left padding,
temperature / top-p / top-k, EOS and stop strings, G completions per prompt), seeded so the same
seed gives the same completions, and with the LoRA adapter on (the policy) or off (the reference,
through peft's `disable_adapter()`; no second copy of the weights).

Each completion also gets the mean entropy of the model's next-token distribution over its tokens,
H_t = −Σ_v π(v | context_t) log π(v | context_t) in nats, read from the logits `generate` computes
anyway (before temperature and top-p/top-k, so it is the model's own distribution at T = 1): the
online methods log it as the policy's entropy without another forward pass.
"""

from __future__ import annotations

import importlib.util
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

from preftune.errors import ConfigError, PreftuneError
from preftune.model.lora import is_lora


class GenerationSettings(BaseModel):
    """How completions are sampled."""

    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int = Field(128, ge=1, description="the most tokens generated per completion (the EOS included)")
    temperature: float = Field(
        1.0, ge=0.0, description="softmax temperature; 0 = greedy decoding (top_p and top_k are then unused)"
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="nucleus sampling: keep the smallest token set with this much probability; 1 = off")
    top_k: int = Field(0, ge=0, description="sample only among the k most likely tokens; 0 = off")
    num_return_sequences: int = Field(
        1, ge=1, description="completions per prompt (GRPO's group size G); the G completions of a prompt are adjacent"
    )
    stop_strings: list[str] = Field(
        default_factory=list, description="stop a completion once its text contains one of these (kept in the completion, like the EOS)"
    )
    batch_size: int | None = Field(
        None, ge=1, description="prompts per `model.generate` call (each yields num_return_sequences rows); None = all at once"
    )
    use_cache: bool = Field(True, description="reuse attention keys/values between steps (same tokens, much faster)")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="'transformers' (model.generate); 'vllm' is not available yet"
    )

    @model_validator(mode="after")
    def _greedy_gives_one_completion(self) -> GenerationSettings:
        if self.temperature == 0 and self.num_return_sequences > 1:
            raise ValueError(
                "temperature 0 (greedy) would give num_return_sequences identical completions: sample (temperature > 0) instead"
            )
        return self


@dataclass
class Generations:
    """Completions, one row per generated sequence, prompt-major (prompt k's G completions are rows k·G … k·G+G−1).

    `completion_ids` stop after the first EOS (kept) or the token that completes a stop string (kept);
    `stopped` says whether that happened (False = cut by max_new_tokens); `texts` are the completions
    decoded without special tokens; `entropy` is each completion's mean next-token entropy over its kept
    tokens (nats; see the module docstring).
    """

    completion_ids: list[list[int]]
    prompt_index: list[int]
    texts: list[str]
    stopped: list[bool]
    entropy: list[float]


def generate(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    settings: GenerationSettings,
    *,
    seed: int,
    use_adapter: bool = True,
) -> Generations:
    """Complete every prompt (token ids, no padding) `settings.num_return_sequences` times.

    The global torch RNG is forked for the call, so `seed` alone decides the samples (for the same
    prompts, settings, `batch_size` and device) and the caller's RNG state is untouched. The model runs in eval mode (no dropout) under `no_grad` and
    is put back in its previous mode. `use_adapter=False` generates from the base model of a peft
    model (the reference); for a model without adapters it changes nothing.
    """
    if settings.backend == "vllm":
        _refuse_vllm()
    if not prompt_ids or any(not ids for ids in prompt_ids):
        raise ConfigError("generate needs at least one prompt, and every prompt needs at least one token")
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    if eos_id is None:
        raise ConfigError("generation needs a tokenizer with an EOS token to know where completions end")
    config = _generation_config(settings, eos_id=eos_id, pad_id=pad_id)
    device = next(model.parameters()).device
    batch_size = settings.batch_size or len(prompt_ids)

    completion_ids: list[list[int]] = []
    stopped: list[bool] = []
    entropy: list[float] = []
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), _adapter_view(model, use_adapter):
            torch.manual_seed(seed)
            for start in range(0, len(prompt_ids), batch_size):
                input_ids, attention_mask = _left_pad(prompt_ids[start : start + batch_size], pad_id, device)
                recorder = EntropyRecorder()
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=config,
                    logits_processor=LogitsProcessorList([recorder]),
                    tokenizer=tokenizer if settings.stop_strings else None,
                )
                per_step = recorder.entropies()  # [rows, generated steps]
                for index, row in enumerate(output[:, input_ids.shape[1] :].tolist()):
                    ids, ended = _trim(row, eos_id, tokenizer, settings.stop_strings)
                    completion_ids.append(ids)
                    stopped.append(ended)
                    entropy.append(per_step[index, : len(ids)].mean().item() if ids else 0.0)
    finally:
        model.train(was_training)

    group = settings.num_return_sequences
    prompt_index = [index for index in range(len(prompt_ids)) for _ in range(group)]
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    return Generations(completion_ids, prompt_index, texts, stopped, entropy)


class EntropyRecorder(LogitsProcessor):
    """Records H = Σ_v entr(softmax(scores)_v) per row at every generation step and passes the scores on unchanged.

    `generate` applies custom processors before its sampling warpers, so these are the model's logits
    (the repetition and n-gram modifiers are off, see `_generation_config`). `entr(0) = 0` keeps masked
    (−inf) entries out of the sum.
    """

    def __init__(self) -> None:
        self._steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._steps.append(torch.special.entr(torch.softmax(scores.float(), dim=-1)).sum(dim=-1))
        return scores

    def entropies(self) -> torch.Tensor:
        """[rows, steps] in nats."""
        return torch.stack(self._steps, dim=1).cpu()


def _refuse_vllm() -> None:
    if importlib.util.find_spec("vllm") is None or not torch.cuda.is_available():
        raise PreftuneError(
            "generation.backend 'vllm' needs the vllm package installed on a machine with a CUDA GPU; "
            "use backend: transformers"
        )
    raise PreftuneError("generation.backend 'vllm' is not implemented yet; use backend: transformers")


def _generation_config(settings: GenerationSettings, *, eos_id: int, pad_id: int) -> GenerationConfig:
    """The full decoding setup. Fields left unset would be filled from the model's generation_config.json,
    so the logit modifiers a model folder may ship (repetition penalty, n-gram blocking) are set to off here."""
    sampling = settings.temperature > 0
    options = {"temperature": settings.temperature, "top_p": settings.top_p, "top_k": settings.top_k} if sampling else {}
    return GenerationConfig(
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        max_new_tokens=settings.max_new_tokens,
        do_sample=sampling,
        num_return_sequences=settings.num_return_sequences,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        use_cache=settings.use_cache,
        stop_strings=settings.stop_strings or None,
        **options,
    )


def _adapter_view(model, use_adapter: bool):
    return model.disable_adapter() if is_lora(model) and not use_adapter else nullcontext()


def _left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _trim(row: list[int], eos_id: int, tokenizer, stop_strings: list[str]) -> tuple[list[int], bool]:
    """The completion up to and including its first EOS or the token that completes a stop string.

    What generate writes after a finished sequence is padding, so everything past that point is dropped.
    """
    ended = eos_id in row
    end = row.index(eos_id) + 1 if ended else len(row)
    if stop_strings:
        text = tokenizer.decode(row[:end])
        if any(stop in text for stop in stop_strings):
            # The shortest prefix whose text holds a stop string: the token that completed it ends the completion.
            for length in range(1, end + 1):
                prefix = tokenizer.decode(row[:length])
                if any(stop in prefix for stop in stop_strings):
                    return row[:length], True
    return row[:end], ended
