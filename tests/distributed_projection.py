"""Worker for test_cpo_parts.py: the trainable weights after one optimiser step with CPO's projection.

Run under torchrun: `python -m torch.distributed.run ... -m tests.distributed_projection CONFIG OUT`.
Each process writes OUT-rank<N>.safetensors and OUT-rank<N>.json (the step's projection metrics).
"""

from __future__ import annotations

import json
import sys

from safetensors.torch import save_file

from preftune.config import load_config
from preftune.run import build_trainer


def main(config_path: str, out_prefix: str) -> None:
    trainer = build_trainer(load_config(config_path))
    metrics = trainer.optimizer_step(trainer.step_micro_batches(epoch=0, step_in_epoch=0))
    rank = trainer.accelerator.process_index
    save_file({f"weight{i}": p.detach().clone() for i, p in enumerate(trainer.trainable)}, f"{out_prefix}-rank{rank}.safetensors")
    with open(f"{out_prefix}-rank{rank}.json", "w") as handle:
        json.dump({k: v for k, v in metrics.items() if k.startswith("projection/")}, handle)


if __name__ == "__main__":
    main(*sys.argv[1:])
