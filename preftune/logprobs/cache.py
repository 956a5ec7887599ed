"""Reference log-probs cached on disk, so the frozen reference runs once per example, not once per step.

The reference never changes during a run, so its answer log-probs are a pure function of
(reference weights, model config, numeric settings, the example's tokens). The cache is keyed
exactly by that:

- a folder per *reference key*: a hash of the reference's frozen weights (their bytes, so a
  different checkpoint at the same path is a different key; with LoRA the adapter is trainable
  and not part of it, so sweeps over adapters share one folder), the model config, and the
  settings that change the numbers (mixed precision, attention implementation);
- inside, an entry per *example key*: a hash of the prompt ids and each answer's ids, read back
  from the packed batch itself, so anything that changes the tokens (tokenizer, truncation,
  max_length, data) misses, and anything that does not (batch size, order, packing) hits.

Entries are appended as safetensors shards written atomically under unique names, so runs and
sweeps that share a folder never see half a file or overwrite each other.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from preftune.atomic import atomic_file, atomic_write_text
from preftune.data.collate import PackedBatch
from preftune.errors import PreftuneError
from preftune.logprobs.engine import SequenceLogps
from preftune.settings import cache_root

# Bump when the engine's definition of an answer log-prob changes: older entries then miss.
CACHE_FORMAT = "preftune-reference-logps-1"
KEY_FILE = "key.json"
_DIGEST_BYTES = 16
# Config fields that name or describe a model without changing what it computes.
_CONFIG_FIELDS_IGNORED = {"_name_or_path", "transformers_version", "use_cache", "architectures"}
# Parameter-name segments peft adds around the base weights; dropped so every adapter layout keys the same base.
_WRAPPER_SEGMENTS = ("base_model.model.", "base_layer.", "original_module.")


class ReferenceCacheError(PreftuneError):
    """A reference log-prob cache file cannot be read."""


def reference_key(model: torch.nn.Module, settings: Mapping[str, Any]) -> str:
    """Hex hash of what the reference computes: frozen weights (bytes), model config and `settings`."""
    digest = hashlib.blake2b(digest_size=_DIGEST_BYTES)
    identity = {"format": CACHE_FORMAT, "config": _config_identity(model), "settings": dict(settings)}
    digest.update(json.dumps(identity, sort_keys=True, default=str).encode())
    for name, tensor in _frozen_weights(model):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _config_identity(model: torch.nn.Module) -> dict[str, Any]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(inner, "config", None)
    if config is None:
        return {}
    return {k: v for k, v in sorted(config.to_dict().items()) if k not in _CONFIG_FIELDS_IGNORED}


def _frozen_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The parameters the reference runs with: all of a plain model; under a peft adapter, the frozen base."""
    is_adapted = hasattr(model, "get_base_model")
    weights = []
    for name, parameter in model.named_parameters():
        if is_adapted and parameter.requires_grad:
            continue
        for segment in _WRAPPER_SEGMENTS:
            name = name.replace(segment, "")
        weights.append((name, parameter))
    return iter(sorted(weights, key=lambda item: item[0]))


def example_keys(batch: PackedBatch) -> list[bytes]:
    """One digest per example of the batch: its prompt ids and each of its answers' ids, in slot order."""
    flat_ids = batch.input_ids.reshape(-1).tolist()
    flat_positions = batch.position_ids.reshape(-1).tolist()
    target_index = batch.target_index.tolist()
    target_ids = batch.target_ids.tolist()
    sequence_of = batch.target_sequence.tolist()
    # Targets of one sequence are contiguous; its first target is predicted from the prompt's last token.
    answers: dict[int, list[int]] = {}
    last_prompt_token: dict[int, int] = {}
    for index, token, sequence in zip(target_index, target_ids, sequence_of):
        if sequence not in answers:
            answers[sequence] = []
            last_prompt_token[sequence] = index
        answers[sequence].append(token)
    keys = []
    for example in range(batch.num_examples):
        end = last_prompt_token[example] + 1
        prompt = flat_ids[end - flat_positions[end - 1] - 1 : end]
        digest = hashlib.blake2b(digest_size=_DIGEST_BYTES)
        for part in [prompt, *(answers[slot * batch.num_examples + example] for slot in range(batch.answers_per_example))]:
            digest.update(len(part).to_bytes(8, "little"))
            digest.update(torch.tensor(part, dtype=torch.int64).numpy().tobytes())
        keys.append(digest.digest())
    return keys


class ReferenceLogpsCache:
    """Per-example reference log-prob sums and token counts in `folder`, filled as batches are computed."""

    def __init__(
        self, root: str | Path, key: str, *, description: Mapping[str, Any] | None = None,
        all_processes_hit: Callable[[bool], bool] | None = None,
    ):
        """`all_processes_hit(hit)` -> whether every process's batch was a hit; sharded training passes a
        collective one, because there the reference must run on all processes or on none (each of its
        forwards gathers weights from all of them)."""
        self.folder = Path(root) / key
        self._all_processes_hit = all_processes_hit or (lambda hit: hit)
        self.key = key
        self.description = dict(description or {})
        self._entries: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}  # example key -> (sums [K], counts [K])
        self._pending: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hits = 0  # batches answered from the cache
        self.misses = 0  # batches the reference had to compute
        self._load()

    def __len__(self) -> int:
        return len(self._entries)

    def logps(self, batch: PackedBatch, compute: Callable[[PackedBatch], SequenceLogps]) -> SequenceLogps:
        """The batch's reference log-probs from the cache, or from `compute(batch)` (then remembered)."""
        keys = example_keys(batch)
        found = [self._entries.get(key) for key in keys]
        hit = all(entry is not None and entry[0].numel() == batch.answers_per_example for entry in found)
        if self._all_processes_hit(hit):
            self.hits += 1
            device = batch.input_ids.device
            # Entries hold [K] per example; the engine's order is slot-major (all answers 0, then all answers 1, ...).
            sums = torch.stack([entry[0] for entry in found], dim=1).reshape(-1).to(device)
            counts = torch.stack([entry[1] for entry in found], dim=1).reshape(-1).to(device)
            return SequenceLogps(sums, counts)
        self.misses += 1
        computed = compute(batch)
        sums = computed.sum.detach().float().cpu().reshape(batch.answers_per_example, batch.num_examples)
        counts = computed.count.detach().float().cpu().reshape(batch.answers_per_example, batch.num_examples)
        for example, key in enumerate(keys):
            if key not in self._entries:
                entry = (sums[:, example].clone(), counts[:, example].clone())
                self._entries[key] = entry
                self._pending[key] = entry
        return computed

    def flush(self) -> Path | None:
        """Write the entries computed since the last flush as one new shard; returns its path (None if nothing new)."""
        if not self._pending:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        key_file = self.folder / KEY_FILE
        if not key_file.exists():
            atomic_write_text(key_file, json.dumps({"key": self.key, **self.description}, indent=2, sort_keys=True, default=str) + "\n")
        written = None
        by_width: dict[int, list[tuple[bytes, tuple[torch.Tensor, torch.Tensor]]]] = {}
        for key, entry in self._pending.items():
            by_width.setdefault(entry[0].numel(), []).append((key, entry))
        for entries in by_width.values():
            tensors = {
                "example_keys": torch.tensor([list(key) for key, _ in entries], dtype=torch.uint8),
                "sums": torch.stack([entry[0] for _, entry in entries]),
                "counts": torch.stack([entry[1] for _, entry in entries]),
            }
            written = self.folder / f"{uuid.uuid4().hex}.safetensors"
            _atomic_save_safetensors(tensors, written, {"format": CACHE_FORMAT, "key": self.key})
        self._pending.clear()
        return written

    def _load(self) -> None:
        if not self.folder.is_dir():
            return
        for shard in sorted(self.folder.glob("*.safetensors")):
            try:
                tensors = load_file(shard)
                keys, sums, counts = tensors["example_keys"], tensors["sums"], tensors["counts"]
            except (SafetensorError, OSError, KeyError) as error:
                raise ReferenceCacheError(
                    f"reference log-prob cache shard {shard} cannot be read ({error}); delete it (or the folder "
                    f"{self.folder}) and the reference log-probs will be computed again"
                ) from None
            for key, entry_sums, entry_counts in zip(keys, sums, counts):
                self._entries.setdefault(bytes(key.tolist()), (entry_sums, entry_counts))


def _atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_file(path) as staging:
        save_file(tensors, staging, metadata=metadata)


def open_reference_cache(
    model: torch.nn.Module, *, root: str | Path | None = None, mixed_precision: str = "no",
    all_processes_hit: Callable[[bool], bool] | None = None,
) -> ReferenceLogpsCache:
    """The cache for the reference `model` computes under `mixed_precision`; `root` default: $PREFTUNE_CACHE/reference-logps."""

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    settings = {
        "mixed_precision": mixed_precision,
        "attn_implementation": getattr(getattr(inner, "config", None), "_attn_implementation", None),
        # A bf16-stored base computes other numbers than its fp32 original; the weight hash sees it too, this names it.
        "frozen_weight_dtypes": sorted({str(tensor.dtype) for _, tensor in _frozen_weights(model)}),
    }
    # Layers that store one dtype and compute in another (bitsandbytes' 4-bit linears) name the one they compute in.
    compute_dtypes = sorted({str(m.compute_dtype) for m in inner.modules() if getattr(m, "compute_dtype", None) is not None})
    if compute_dtypes:
        settings["compute_dtypes"] = compute_dtypes
    description = {
        "format": CACHE_FORMAT,
        "model": getattr(getattr(inner, "config", None), "_name_or_path", type(inner).__name__),
        **settings,
    }
    return ReferenceLogpsCache(
        Path(root) if root is not None else cache_root() / "reference-logps", reference_key(model, settings),
        description=description, all_processes_hit=all_processes_hit,
    )
