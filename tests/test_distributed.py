"""Multi-process training: two processes with half the batch each compute the single-process gradient."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from preftune.config import dump_config
from tests.support import save_tiny_model, tiny_run_config


def _first_step_gradients(tmp_path, model_dir, name: str, processes: int, per_device: int) -> list[dict[str, torch.Tensor]]:
    config = tiny_run_config(tmp_path / name, model_dir, training={"per_device_train_batch_size": per_device})
    config_path = tmp_path / f"{name}.yaml"
    config_path.write_text(dump_config(config))
    # torchrun sets RANK/WORLD_SIZE; accelerate picks them up and uses gloo on CPU.
    finished = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
         "-m", "tests.distributed_gradients", str(config_path), str(tmp_path / name)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=180,
    )
    assert finished.returncode == 0, finished.stderr[-4000:]
    return [load_file(tmp_path / f"{name}-rank{rank}.safetensors") for rank in range(processes)]


def test_two_processes_with_half_the_batch_each_compute_the_single_process_gradient(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    (single,) = _first_step_gradients(tmp_path, model_dir, "single", processes=1, per_device=4)
    rank0, rank1 = _first_step_gradients(tmp_path, model_dir, "distributed", processes=2, per_device=2)

    assert any(gradient.abs().max() > 0 for gradient in single.values())
    for key in single:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)  # every process applies the same update
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-5, atol=1e-7)


def _fsdp_gradients(tmp_path, processes: int) -> dict[str, torch.Tensor]:
    out = tmp_path / f"fsdp-{processes}"
    finished = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
         "-m", "tests.fsdp_gradients", str(out)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=180,
    )
    assert finished.returncode == 0, finished.stderr[-4000:]
    return load_file(f"{out}.safetensors")


def test_fsdp2_sharding_of_the_modules_the_engine_calls_gives_the_single_process_gradient(tmp_path):
    """Feasibility for an FSDP path (docs/DISTRIBUTED.md): the engine calls the decoder and the LM head
    directly, so each must be its own `fully_shard` unit; then 2 sharded CPU processes (gloo) with 2
    examples each compute the gradient of one process with all 4. The LM head must run the same number
    of times on every process (here one chunk each): each call all-gathers its weight."""
    if not hasattr(pytest.importorskip("torch.distributed.fsdp"), "fully_shard"):
        pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) needs torch >= 2.6")

    single = _fsdp_gradients(tmp_path, 1)
    sharded = _fsdp_gradients(tmp_path, 2)
    assert sorted(sharded) == sorted(single) and any(g.abs().max() > 0 for g in single.values())
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=1e-5, atol=1e-6)
