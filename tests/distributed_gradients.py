"""Worker for test_distributed.py: the gradient of the first optimiser step, as every process sees it.

Run under torchrun: `python -m torch.distributed.run ... -m tests.distributed_gradients CONFIG OUT`.
Each process writes OUT-rank<N>.safetensors after the cross-process all-reduce.
"""

from __future__ import annotations

import sys

from safetensors.torch import save_file

from preftune.config import load_config
from preftune.run import build_trainer


def main(config_path: str, out_prefix: str) -> None:
    trainer = build_trainer(load_config(config_path))
    captured = {}
    # Stop right before the update: the gradients the optimiser would apply, identical on every process.
    trainer.optimizer.step = lambda: captured.update({f"grad{i}": p.grad.clone() for i, p in enumerate(trainer.trainable)})
    trainer.optimizer_step(trainer.step_micro_batches(epoch=0, step_in_epoch=0))
    save_file(captured, f"{out_prefix}-rank{trainer.accelerator.process_index}.safetensors")


if __name__ == "__main__":
    main(*sys.argv[1:])
