"""The `preftune` command line. Every command reads one validated YAML config (or the embedded demo)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from rich.console import Console

from preftune.errors import PreftuneError

DESCRIPTION = """\
preftune aligns a causal language model with preference data (prompt + chosen + rejected answers).

Quick start:
  preftune train                         # the embedded demo: DPO on SmolLM2-135M with real hh-rlhf pairs
  preftune train --config run.yaml       # your own run (see `preftune config` for every key)
  preftune train --config run.yaml --set method.beta=0.3 --set training.max_steps=100

A run folder holds config.yaml, metrics.jsonl, alerts.jsonl, tensorboard/, checkpoints/,
final/adapter, final/merged and summary.md.
"""


def _config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="YAML run config (default: the embedded demo)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config key, e.g. --set training.learning_rate=1e-5 (repeatable)",
    )
    parser.add_argument("--output-dir", help="shorthand for --set output_dir=DIR")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="preftune", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verbose", "-v", action="store_true", help="show library logs and full tracebacks")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser("train", help="train a policy on preference pairs and write a run folder")
    _config_arguments(train)

    config = commands.add_parser("config", help="print the fully resolved config (defaults filled in)")
    _config_arguments(config)

    commands.add_parser("losses", help="list the available loss_type values")
    return parser


def _load(args):
    from preftune.config import load_config

    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    return load_config(args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        logging.basicConfig(level=logging.WARNING)
    else:
        logging.basicConfig(level=logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.command == "train":
            from preftune.run import train

            train(_load(args), console=console)
        elif args.command == "config":
            from preftune.config import dump_config

            print(dump_config(_load(args)), end="")
        elif args.command == "losses":
            from preftune.losses import ALIASES, LOSSES

            for name, spec in LOSSES.items():
                aliases = [alias for alias, target in ALIASES.items() if target == name]
                also = f" (alias: {', '.join(aliases)})" if aliases else ""
                print(f"{name:<18} {spec.summary}{also}")
        return 0
    except PreftuneError as error:
        if args.verbose:
            raise
        console.print(f"[bold red]error:[/] {error}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
