"""A scalar reward model: a causal LM with a one-output linear head (`score`) on its last token.

Built with transformers' `AutoModelForSequenceClassification` (num_labels=1), so a Llama-family
folder becomes `LlamaForSequenceClassification` and the export is a folder any transformers user
can load the same way. Trained with the Bradley–Terry loss (`preftune.losses.bradley_terry`).

The reward of a text is the head's output at its last token. Texts are left-padded, so the last
position is always real; transformers reads "the rightmost token that is not the pad token", so a
text whose own last token is the pad token is refused (`ModelError`) rather than scored at the
wrong position.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Protocol

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForSequenceClassification

from preftune.atomic import atomic_directory
from preftune.errors import ConfigError, ModelError
from preftune.model.loading import DTYPES, resolve_model_path
from preftune.model.lora import is_lora

SCORE_HEAD = "score"  # the head's module name in transformers' *ForSequenceClassification models


class LoraOptions(Protocol):
    """What `build_reward_model` reads from a LoRA setting (preftune's `model.lora` section fits)."""

    r: int
    alpha: int
    dropout: float
    target_modules: list[str]


def build_reward_model(
    name_or_path: str, tokenizer, *, dtype: str = "float32", lora: LoraOptions | None = None, seed: int = 0
):
    """A sequence-classification model with one output from a local causal-LM folder (or an exported reward model).

    A fresh `score` head is initialised under `seed` (the global RNG is forked, not consumed).
    `config.pad_token_id` is set from the tokenizer, which transformers needs to find the last token.
    With `lora`, the adapters go on `lora.target_modules` and the `score` head trains in full
    (peft `modules_to_save`).
    """
    if dtype not in DTYPES:
        raise ConfigError(f"dtype '{dtype}' is not one of {sorted(DTYPES)}")
    if tokenizer.pad_token_id is None:
        raise ModelError("the reward model needs a tokenizer with a pad token (set tokenizer.pad_token)")
    path = resolve_model_path(name_or_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, dtype=DTYPES[dtype], local_files_only=True, attn_implementation="sdpa"
            )
        except (OSError, ValueError) as error:
            raise ModelError(f"cannot load a sequence-classification reward model from {path}: {error}") from error
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    if lora is None:
        return model
    config = LoraConfig(
        task_type="SEQ_CLS",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        modules_to_save=[SCORE_HEAD],
    )
    return get_peft_model(model, config)


def tokenize_texts(tokenizer, prompts: list[str], completions: list[str], *, max_length: int | None = None) -> list[list[int]]:
    """Token ids of prompt + completion (the tokenizer's special tokens added as it does by default).

    With `max_length`, the first tokens are dropped: the reward is read at the end.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    encoded = tokenizer([prompt + completion for prompt, completion in zip(prompts, completions)]).input_ids
    return [ids[-max_length:] if max_length else ids for ids in encoded]


def reward_logits(model, token_ids: list[list[int]], pad_id: int) -> torch.Tensor:
    """Rewards `[texts]` with gradient: the score head at each text's last token (left padding)."""
    device = next(model.parameters()).device
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        if not ids:
            raise ModelError("cannot score an empty text")
        if ids[-1] == pad_id:
            raise ModelError(
                "a text ends with the pad token, where the reward would be read; give the tokenizer a pad token "
                "the texts do not end with"
            )
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        attention_mask[row, width - len(ids) :] = 1
    output = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device))
    return output.logits[:, 0]


def score_texts(model, tokenizer, prompts: list[str], completions: list[str], *, batch_size: int = 8, max_length: int | None = None) -> list[float]:
    """The reward of each prompt + completion, in eval mode without gradient, `batch_size` texts at a time."""
    token_ids = tokenize_texts(tokenizer, prompts, completions, max_length=max_length)
    scores: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(token_ids), batch_size):
                scores.extend(reward_logits(model, token_ids[start : start + batch_size], tokenizer.pad_token_id).float().tolist())
    finally:
        model.train(was_training)
    return scores


def export_reward_model(model, tokenizer, target: str | Path) -> Path:
    """A plain sequence-classification folder (model.safetensors + config.json + tokenizer), LoRA merged into a copy.

    Reload with `build_reward_model(target, tokenizer)` or `AutoModelForSequenceClassification.from_pretrained`.
    """
    # merge_and_unload also puts the trained `score` copy (modules_to_save) in place of the original head.
    merged = copy.deepcopy(model).merge_and_unload() if is_lora(model) else model
    with atomic_directory(target) as staging:
        merged.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return Path(target)

