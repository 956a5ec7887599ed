"""Worker for test_distributed.py's FSDP runs: train run configs one after another in one launch.

Run under a launcher: `accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes 2
-m tests.fsdp_training OUT CONFIG[:CRASH_STEP] ...`. Each config trains to the end, or raises a simulated
crash after step CRASH_STEP (on every process) and the worker goes on with the next config. Each
process writes OUT/<config stem>-rank<N>.json: the layout the trainer chose and how many parameter
elements this process holds of each kind (its shards under FSDP).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from torch.distributed.tensor import DTensor

from preftune.config import load_config
from preftune.control import Controller
from preftune.run import build_trainer


class SimulatedCrash(RuntimeError):
    pass


class CrashAfter(Controller):
    name = "crash"

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, context):
        if context.step == self.step:
            raise SimulatedCrash(f"simulated crash after step {self.step}")


def _elements(parameters) -> dict[str, int]:
    parameters = list(parameters)
    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in parameters)
    return {"local": local, "full": sum(p.numel() for p in parameters), "sharded": sum(isinstance(p, DTensor) for p in parameters)}


def main(out: str, *jobs: str) -> None:
    for job in jobs:
        config_path, _, crash = job.partition(":")
        trainer = build_trainer(load_config(config_path))
        record = {
            "distribution": trainer.parts.distribution.as_record(),
            "trainable": _elements(trainer.trainable),
            "all": _elements(trainer.policy.parameters()),
            "crashed": False,
        }
        if crash:
            trainer.controllers.append(CrashAfter(int(crash)))
        try:
            trainer.train()
        except SimulatedCrash:
            record["crashed"] = True
        rank = trainer.accelerator.process_index
        Path(out, f"{Path(config_path).stem}-rank{rank}.json").write_text(json.dumps(record), encoding="utf-8")
        trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:])
