"""One benchmark run per process: the driver starts a worker process per trainer, the worker prints
one result line, the driver reads it back. A fresh process per run keeps one trainer's peak RSS,
allocator state and thread pools out of the next one's numbers."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULT_PREFIX = "BENCH-RESULT "


def peak_rss_gb() -> float:
    """This process's peak RSS since it exec'd: /proc's VmHWM, the high-water mark of its own address space.

    Not getrusage's ru_maxrss: Linux carries the forked child's high-water mark across exec into it,
    so every worker's ru_maxrss was at least the driver's RSS at the fork (7.11 GB for both preftune
    rows once the driver had built SmolLM2-1.7B's random-initialised shape).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024**2  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB; macOS bytes, not used here


def emit_result(result: dict, started: float) -> None:
    """Worker side: add the process's peak RSS and wall time, print the result line."""
    result["peak_rss_gb"] = peak_rss_gb()
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
