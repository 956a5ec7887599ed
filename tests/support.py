"""Shared test helpers: tiny random-initialised models and run configs that train in seconds on 2 cores.

Import as `from tests.support import ...` (pytest puts the repo root on sys.path, see pyproject).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from preftune.config import RunConfig, validate_config
from preftune.data import load_pairs, tokenize_pairs
from preftune.data.pipeline import resolve_data_path
from preftune.logprobs.attention import PACKED_SDPA

ASSETS = Path(__file__).resolve().parent / "assets"
BYTEBPE_TOKENIZER = ASSETS / "tokenizers" / "bytebpe"


def load_test_tokenizer(path: Path = BYTEBPE_TOKENIZER):
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tiny_llama(
    vocab_size: int, *, seed: int = 0, hidden_size: int = 32, layers: int = 2, tie_word_embeddings: bool = False
) -> LlamaForCausalLM:
    """A 2-layer Llama with random weights; preftune's packed sdpa attention like the real models. SmolLM2 ties its
    LM head to the embeddings (`tie_word_embeddings`)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tie_word_embeddings,
        attn_implementation=PACKED_SDPA,
    )
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model


def save_tiny_model(folder: Path, *, seed: int = 0, tie_word_embeddings: bool = False) -> Path:
    """Write a tiny model + the test tokenizer as a local HF folder, loadable by `model.name_or_path`."""
    tokenizer = load_test_tokenizer()
    model = tiny_llama(len(tokenizer), seed=seed, tie_word_embeddings=tie_word_embeddings)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_run_config(output_dir: Path, model_dir: Path, **sections: dict[str, Any]) -> RunConfig:
    """A run config for the tiny model on a slice of the real hh-rlhf data; `sections` update the defaults."""
    raw: dict[str, Any] = {
        "output_dir": str(output_dir),
        # float32 pinned: `auto` would pick bf16 on some CPUs and the tests' tolerances would depend on the machine.
        "model": {"name_or_path": str(model_dir), "dtype": "float32", "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "data": {
            "train_file": "hh-rlhf-harmless:train",
            "validation_file": "hh-rlhf-harmless:validation",
            "max_train_samples": 16,
            "max_validation_samples": 8,
            "max_length": 96,
            "max_prompt_length": 64,
        },
        "method": {"loss_type": "sigmoid", "beta": 0.1},
        "training": {
            "learning_rate": 5e-3,
            "per_device_train_batch_size": 4,
            "max_steps": 4,
            "warmup_ratio": 0.0,
            "eval_steps": 2,
            "report_to": ["jsonl"],
        },
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(raw.get(section), dict):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return validate_config(raw)


def tokenized_hh_pairs(tokenizer, *, read: int, max_length: int = 96, max_prompt_length: int = 64) -> list:
    """The first `read` records of the shipped hh-rlhf train split, tokenised as a tiny run would."""
    loaded, _ = load_pairs(resolve_data_path("hh-rlhf-harmless:train"), tokenizer=tokenizer, max_samples=read)
    tokenized, _ = tokenize_pairs(loaded, tokenizer, max_length=max_length, max_prompt_length=max_prompt_length)
    return tokenized


def resident_bytes_of(path: Path) -> int:
    """Resident bytes of this process's mappings of `path` (Linux /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
            inside = len(fields) == 6 and fields[5] == str(path)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total
