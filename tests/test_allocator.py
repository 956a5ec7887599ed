"""The malloc a process runs on (`allocator_in_use`) and the command line's restart on tcmalloc / jemalloc."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

from preftune.allocator import SETTING, allocator_in_use

INSTALLED = [stem for stem in ("tcmalloc_minimal", "tcmalloc", "jemalloc") if ctypes.util.find_library(stem)]
needs_library = pytest.mark.skipif(
    not INSTALLED or not sys.platform.startswith("linux"),
    reason="neither tcmalloc nor jemalloc is installed (Debian: apt-get install libtcmalloc-minimal4)",
)
RESTART_AND_REPORT = "from preftune.allocator import exec_with_fast_allocator, allocator_in_use; " \
    "exec_with_fast_allocator(); print(allocator_in_use())"


def _python(code_or_args: list[str], **environment: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("LD_PRELOAD", SETTING, "PREFTUNE_MALLOC_RESTARTED")}
    return subprocess.run([sys.executable, *code_or_args], capture_output=True, text=True, timeout=120, env={**env, **environment})


def test_the_allocator_is_read_from_the_libraries_mapped_into_the_process(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 0 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n", encoding="utf-8")
    assert allocator_in_use(maps) == "system"
    maps.write_text(maps.read_text() + "7f02-7f03 r-xp 0 08:01 2 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n")
    assert allocator_in_use(maps) == "tcmalloc"
    assert allocator_in_use(tmp_path / "absent") == "system"


@needs_library
def test_a_process_restarts_itself_once_on_the_installed_allocator_unless_told_not_to():
    restarted = _python(["-c", RESTART_AND_REPORT])
    assert restarted.returncode == 0, restarted.stderr
    assert restarted.stdout.strip() == ("jemalloc" if INSTALLED == ["jemalloc"] else "tcmalloc")
    assert _python(["-c", RESTART_AND_REPORT], **{SETTING: "system"}).stdout.strip() == "system"


@needs_library
def test_a_library_that_cannot_preload_leaves_the_process_on_the_system_malloc_without_a_restart_loop(tmp_path):
    not_a_library = tmp_path / "libnot-malloc.so"
    not_a_library.write_text("not an ELF file", encoding="utf-8")
    result = _python(["-c", RESTART_AND_REPORT], **{SETTING: str(not_a_library)})
    assert result.returncode == 0 and result.stdout.strip() == "system"
    assert "cannot be preloaded" in result.stderr  # the dynamic loader's own message, once
    missing = _python(["-c", RESTART_AND_REPORT], **{SETTING: str(tmp_path / "absent.so")})
    assert missing.stdout.strip() == "system" and "no such file" in missing.stderr


@needs_library
def test_python_dash_m_preftune_runs_its_command_after_the_restart():
    result = _python(["-m", "preftune", "losses"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("sigmoid")
