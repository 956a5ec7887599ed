"""Multi-process training: two processes with half the batch each compute the single-process gradient."""

from __future__ import annotations

import os
import subprocess
import sys

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
