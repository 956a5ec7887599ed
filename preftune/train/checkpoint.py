"""Checkpoints that resume exactly, written atomically, with no pickles.

`checkpoints/step-N/` holds:
- `trainable.safetensors`: the trainable parameters (the adapter with LoRA, all weights otherwise)
- `optimizer.safetensors` + `optimizer.json`: optimiser tensors, and its param groups and scalars
- `rng.safetensors`: torch CPU (and CUDA) generator states
- `trainer_state.json`: step, epoch, data position, scheduler, Python RNG, controllers, config, and `records`
  (the rows metrics.jsonl and alerts.jsonl held, where a roll-back to this checkpoint cuts them)

Under FSDP the tensors are gathered to full tensors before they are written (`checkpoint_tensors`, a
collective) and scattered back into the shards on load, so the files are the same whatever the number
of processes or the sharding: a checkpoint resumes on any of them.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from preftune.atomic import atomic_directory
from preftune.errors import CheckpointError
from preftune.train.distributed import full_tensor, local_tensor, reshard_all

STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class CheckpointTensors:
    """Full (unsharded) trainable weights and optimiser state, on the CPU."""

    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


def checkpoint_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, keep: bool) -> CheckpointTensors | None:
    """What `save_checkpoint` writes, where `keep` (the main process); None elsewhere.

    Sharded (FSDP) tensors are gathered one at a time, which is a collective: then every process
    must call this, in the same order.
    """
    # The optimiser holds the sharded parameters whatever state the modules are in.
    sharded = any(isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"])
    if not keep and not sharded:
        return None
    if sharded:
        reshard_all(model)
    # One path for every process, so the gathers come in the same order everywhere; only `keep` stores them.
    weights = {}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            full = full_tensor(parameter.detach())
            if keep:
                weights[name] = full.contiguous().cpu()
    state = optimizer.state_dict()
    gathered_state: dict[int, dict[str, Any]] = {}
    for param_id, values in sorted(state["state"].items()):
        for key, value in sorted(values.items()):
            full = full_tensor(value) if isinstance(value, torch.Tensor) else value
            if keep:
                gathered_state.setdefault(param_id, {})[key] = full.cpu() if isinstance(full, torch.Tensor) else full
    if not keep:
        return None
    return CheckpointTensors(weights, {**state, "state": gathered_state})


def save_checkpoint(target: Path, *, tensors: CheckpointTensors, trainer_state: dict[str, Any]) -> Path:
    optimizer_tensors, optimizer_meta = _flatten_optimizer(tensors.optimizer)
    with atomic_directory(target) as staging:
        save_file(tensors.weights, staging / "trainable.safetensors")
        save_file(optimizer_tensors, staging / "optimizer.safetensors")
        (staging / "optimizer.json").write_text(json.dumps(optimizer_meta), encoding="utf-8")
        save_file(_rng_tensors(), staging / "rng.safetensors")
        state = {**trainer_state, "python_rng": _python_rng_state(), "numpy_rng": _numpy_rng_state()}
        (staging / "trainer_state.json").write_text(json.dumps(state, indent=2), encoding="utf-8")
    return target


def load_checkpoint(source: Path, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore weights, optimiser and RNG in place; return the trainer state.

    Every process reads the files; a sharded (FSDP) model and its optimiser take their own shard of each tensor.
    """
    required = ["trainable.safetensors", "optimizer.safetensors", "optimizer.json", "rng.safetensors", "trainer_state.json"]
    missing = [name for name in required if not (source / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {source} is incomplete (missing {', '.join(missing)})")
    weights = load_file(source / "trainable.safetensors")
    reshard_all(model)  # under FSDP: write into the shards, not into gathered copies
    expected = {name for name, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise CheckpointError(
            f"checkpoint {source} does not match this model's trainable parameters "
            f"({len(set(weights) ^ expected)} names differ): was it written with another model or LoRA setting?"
        )
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            local_tensor(parameters[name]).copy_(local_tensor(_shard_like(parameters[name], tensor)))
    meta = json.loads((source / "optimizer.json").read_text(encoding="utf-8"))
    optimizer_state = _unflatten_optimizer(load_file(source / "optimizer.safetensors"), meta)
    # The optimiser numbers its parameters in param-group order; a state tensor shaped like its parameter is sharded like it.
    ordered = [p for group in optimizer.param_groups for p in group["params"]]
    for param_id, values in optimizer_state["state"].items():
        parameter = ordered[param_id]
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and value.shape == parameter.shape:
                values[key] = _shard_like(parameter, value)
    optimizer.load_state_dict(optimizer_state)
    _restore_rng(load_file(source / "rng.safetensors"))
    state = json.loads((source / "trainer_state.json").read_text(encoding="utf-8"))
    random.setstate(_tuplify(state.pop("python_rng")))
    np.random.set_state(_numpy_from_json(state.pop("numpy_rng")))
    return state


def _shard_like(parameter: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `parameter` is: this process's shard of it under FSDP (sliced locally, no communication)."""
    if not isinstance(parameter, DTensor):
        return full
    return distribute_tensor(full.to(parameter.device), parameter.device_mesh, parameter.placements, src_data_rank=None)


def list_checkpoints(run_dir: Path) -> list[Path]:
    folder = run_dir / "checkpoints"
    found = [p for p in folder.glob("step-*") if p.is_dir() and STEP_DIR.match(p.name)] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def prune_checkpoints(run_dir: Path, keep: int | None, *, protect: Path | None = None) -> None:
    """Keep the newest `keep` checkpoints, and `protect` (an epoch start a restart may return to)."""
    if keep is None:
        return
    for old in list_checkpoints(run_dir)[:-keep]:
        if protect is None or old != protect:
            shutil.rmtree(old, ignore_errors=True)


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step}"


def remove_checkpoints_after(run_dir: Path, step: int) -> None:
    """Drop the checkpoints of an abandoned (restarted) attempt, so none of them is ever resumed."""
    for later in list_checkpoints(run_dir):
        if int(STEP_DIR.match(later.name).group(1)) > step:
            shutil.rmtree(later, ignore_errors=True)


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in state_dict["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(param_id), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = tensor
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = cuda_state
    return tensors


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)


def _python_rng_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _tuplify(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


def _numpy_rng_state() -> list:
    name, keys, position, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), int(position), int(has_gauss), float(cached)]


def _numpy_from_json(state: list) -> tuple:
    name, keys, position, has_gauss, cached = state
    return (name, np.array(keys, dtype=np.uint32), position, has_gauss, cached)
