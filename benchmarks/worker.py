"""One benchmark run per process: the driver starts a worker process per trainer, the worker prints
one result line, the driver reads it back. A fresh process per run keeps one trainer's peak RSS,
allocator state and thread pools out of the next one's numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

RESULT_PREFIX = "BENCH-RESULT "


def emit_result(result: dict, started: float) -> None:
    """Worker side: add the process's peak RSS and wall time, print the result line."""
    from preftune.allocator import allocator_in_use
    from preftune.train.trainer import peak_rss_gb  # VmHWM: ru_maxrss would include the driver's memory at the fork

    result["peak_rss_gb"] = peak_rss_gb()
    result["allocator"] = allocator_in_use()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        result["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 1e9
    result["wall_seconds"] = time.perf_counter() - started
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(name: str, arguments: list[str]) -> dict:
    """Driver side: run `python arguments...` as a worker and return its result line; a failure prints
    the worker's stderr tail and stops the benchmark."""
    completed = subprocess.run(
        [sys.executable, *arguments], capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"}
    )
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if completed.returncode != 0 or not lines:
        sys.stderr.write(completed.stderr[-6000:])
        raise SystemExit(f"{name} failed (exit {completed.returncode})")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])
