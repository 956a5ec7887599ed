"""Which malloc the process runs on, and a restart of the command line on tcmalloc or jemalloc where one is installed.

PyTorch on CPU allocates every tensor with malloc. Under glibc's malloc a training step leaves
holes: at the end of a batch-8 DPO forward on SmolLM2-135M, glibc's heap held 2.7 GB of which
1.5 GB was in use, and that free 1.2 GB counted in the peak RSS. tcmalloc and jemalloc keep
freed blocks by size and reuse them: the same step peaked 30% lower (benchmarks/results.md,
2026-12-02). glibc can be made to return its holes (`MALLOC_MMAP_THRESHOLD_`), but every later
allocation then page-faults: the step took 46% longer.

A library replaces malloc only if it is loaded before anything allocates, so the `preftune`
command (and `python -m preftune`, and the training scripts in examples/) re-executes itself once
with the library in `LD_PRELOAD` before it does anything else (`exec_with_fast_allocator`), the way PyTorch's own CPU launcher
(`torch.backends.xeon.run_cpu --enable-tcmalloc`) does. `PREFTUNE_MALLOC` chooses:
  auto (default)  tcmalloc, else jemalloc, whichever the dynamic loader finds; else the system's
  system          never re-execute
  a library path  that library (e.g. /usr/lib/x86_64-linux-gnu/libjemalloc.so.2)
Python code that builds a trainer itself runs on whatever malloc its interpreter started with;
run.json records which (`allocator_in_use`). Linux only: elsewhere nothing happens.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

SETTING = "PREFTUNE_MALLOC"
# Set in the re-executed process: it must never re-execute again, even if the library failed to preload.
_RESTARTED = "PREFTUNE_MALLOC_RESTARTED"
# Library name stems as the dynamic loader's cache knows them, in the order tried.
_LIBRARIES = ("tcmalloc_minimal", "tcmalloc", "jemalloc")


def allocator_in_use(maps: Path = Path("/proc/self/maps")) -> str:
    """"tcmalloc", "jemalloc" or "mimalloc" when such a library is mapped into this process, else "system"."""
    try:
        text = maps.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "system"
    for name in ("tcmalloc", "jemalloc", "mimalloc"):
        if f"lib{name}" in text:
            return name
    return "system"


def fast_allocator_library() -> str | None:
    """The library `PREFTUNE_MALLOC` asks for: a path as given, or for auto the first of tcmalloc/jemalloc installed."""
    setting = os.environ.get(SETTING, "auto")
    if setting == "system":
        return None
    if setting != "auto":
        if "/" in setting and not Path(setting).is_file():
            print(f"preftune: {SETTING}={setting}: no such file; running on the system's malloc", file=sys.stderr)
            return None
        return setting
    for stem in _LIBRARIES:
        found = ctypes.util.find_library(stem)
        if found:
            return found
    return None


def exec_with_fast_allocator() -> None:
    """Re-execute this process's command line with a faster malloc preloaded, if one is wanted, found and not loaded.

    Returns (doing nothing) off Linux, when `PREFTUNE_MALLOC=system`, when no library is found,
    when one is already in use, and in the re-executed process itself.
    """
    if not sys.platform.startswith("linux") or os.environ.get(_RESTARTED) or allocator_in_use() != "system":
        return
    library = fast_allocator_library()
    if library is None:
        return
    preload = " ".join(filter(None, [library, os.environ.get("LD_PRELOAD")]))
    environment = {**os.environ, "LD_PRELOAD": preload, _RESTARTED: "1"}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, environment)
