"""The `preftune` command line. Every command reads one validated YAML config (or the embedded demo)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from preftune.allocator import exec_with_fast_allocator
from preftune.errors import ConfigError, PreftuneError, TrainingInterrupted

DESCRIPTION = """\
preftune aligns a causal language model with preference data (prompt + chosen + rejected answers).

Quick start:
  preftune train                         # the embedded demo: CPO (constrained DPO) on SmolLM2-135M, real hh-rlhf pairs
  preftune train --config run.yaml       # your own run (see `preftune config` for every key)
  preftune train --config run.yaml --set method.beta=0.3 --set training.max_steps=100
  preftune sweep --config run.yaml --param beta --values 0.05,0.1,0.3,0.5
  preftune convert --to kto pairs.jsonl kto.jsonl   # paired data → unpaired {prompt, completion, label}
  preftune constitute --prompts prompts.jsonl --model DIR --output pairs.jsonl   # Constitutional-AI pairs
  preftune audit pairs.jsonl             # duplicates, lengths, length bias ("longer is better?")
  preftune recommend --data pairs.jsonl --output recommended.yaml   # which method, from the data and the reference

A run folder holds config.yaml, metrics.jsonl, alerts.jsonl, tensorboard/, checkpoints/,
final/adapter, final/merged and summary.md.

Name clash: `loss_type: cpo` (alias constrained_dpo) is CONSTRAINED DPO, a margin constraint
enforced by a Lagrange multiplier (docs/CPO.md). TRL's CPO (Contrastive Preference Optimization,
Xu et al. 2024) is `loss_type: contrastive_cpo`.
"""
# The formats `audit` and `recommend` read: every paired and unpaired one (preftune/data/formats.py).
AUDITED_FORMATS = ("pairs", "chat", "hh_rlhf", "sharegpt", "kto", "sharegpt_kto")


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
    train_reward = commands.add_parser(
        "train-reward", help="train a reward model (Bradley–Terry on pairs): `train` with method.loss_type reward_model"
    )
    _config_arguments(train_reward)
    score = commands.add_parser("score", help="add a reward model's `score` to every record of a JSONL file")
    score.add_argument("--model", required=True, help="a reward-model folder (a run's final/reward-model)")
    score.add_argument("--data", required=True, help="JSONL/JSON/Parquet of {prompt, completion} (or chosen/rejected pairs)")
    score.add_argument("--output", help="where to write the scored JSONL (default: DATA with .scored.jsonl)")
    score.add_argument("--completion-field", default="completion", help="the field holding the text to score")
    score.add_argument("--batch-size", type=int, default=8)

    config = commands.add_parser(
        "config",
        help="print the library defaults of a method with each key's description (--method), or a resolved config (--config)",
    )
    _config_arguments(config)
    config.add_argument("--method", help="print the library defaults for this loss_type, with descriptions")


    commands.add_parser("losses", help="list the available loss_type values")

    sweep = commands.add_parser(
        "sweep", help="train the same short run once per value of one key; write a comparison table and plot"
    )
    _config_arguments(sweep)
    sweep.add_argument("--param", required=True, help="a method key (beta) or a dotted key (training.learning_rate)")
    sweep.add_argument("--values", required=True, help="comma-separated values, e.g. 0.05,0.1,0.3,0.5")

    convert = commands.add_parser("convert", help="convert a paired preference file (prompt/chosen/rejected) to unpaired KTO records")
    convert.add_argument("input", help="a JSONL/JSON/Parquet file of pairs, or an embedded dataset 'name:split'")
    convert.add_argument("output", help="the JSONL file to write")
    convert.add_argument("--to", required=True, choices=["kto"], help="target format")
    convert.add_argument("--format", default="auto", choices=["auto", "pairs", "chat", "hh_rlhf", "sharegpt"], help="input format")
    convert.add_argument("--tokenizer", help="model name or folder whose chat template renders chat-format prompts")

    probe = commands.add_parser(
        "probe", help="score probe prompts (safe vs unsafe answer) under the reference and the trained model"
    )
    probe.add_argument("--model", default="smollm2-135m", help="a model folder, a LoRA adapter folder (final/adapter) or an embedded model")
    probe.add_argument("--reference", help="a separate reference model folder (default: the adapter-disabled model)")
    probe.add_argument("--pairs", help="a JSONL of probes {id, split, prompt, chosen, rejected} (default: the shipped harmlessness set)")
    probe.add_argument("--output", help="also write the table as JSON here (put it in a run folder as probes.json for the report)")
    probe.add_argument("--max-length", type=int, default=512, help="prompt + answer tokens per sequence")

    evaluate = commands.add_parser(
        "eval", help="preference accuracy and margins of any local model (and reference) on a preference file, as a run folder"
    )
    evaluate.add_argument("--model", required=True, help="a model folder (final/merged, a TRL output), a LoRA adapter folder, or an embedded model")
    evaluate.add_argument("--reference", help="the reference model folder (default: the adapter-disabled view of an adapter; else none)")
    evaluate.add_argument("--data", required=True, help="a preference file (any format `preftune train` reads) or 'name:split'")
    evaluate.add_argument("--output-dir", required=True, help="the run folder to write (metrics, evaluations/, report.html)")
    evaluate.add_argument("--beta", type=float, default=0.1, help="β of the implicit-reward margins (with a reference)")
    evaluate.add_argument("--format", default="auto", help="data format (default: detected)")
    evaluate.add_argument("--max-length", type=int, default=512, help="prompt + answer tokens per sequence")
    evaluate.add_argument("--max-samples", type=int, help="evaluate only the first N pairs")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing run folder's preftune files")

    report = commands.add_parser("report", help="rebuild summary.md, plots/ and report.html of a run folder from its files")
    report.add_argument("run_dir", help="a run folder (holds config.yaml, metrics.jsonl, evaluations/)")

    constitute = commands.add_parser(
        "constitute",
        help="write preference pairs by Constitutional AI: answer, critique against a principle, revise (revision = chosen)",
    )
    constitute.add_argument("--prompts", required=True, help="JSONL/JSON/Parquet of {prompt} or chat {messages} records")
    constitute.add_argument("--constitution", help="principles YAML (default: preftune/defaults/constitution.yaml)")
    constitute.add_argument("--model", required=True, help="embedded model name or a local Hugging Face folder")
    constitute.add_argument("--output", required=True, help="the pairs JSONL to write; an existing one is resumed")
    constitute.add_argument("--seed", type=int, default=0, help="seeds the principle drawn and the sampling, per prompt")
    constitute.add_argument("--max-new-tokens", type=int, default=256, help="per answer, critique and revision")
    constitute.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 = greedy")

    audit = commands.add_parser("audit", help="audit preference files: duplicates, lengths, format, length bias")
    audit.add_argument("files", nargs="+", metavar="FILE", help="JSONL/JSON/Parquet files or embedded datasets 'name:split'")
    audit.add_argument("--tokenizer", help="model name or folder: lengths in its tokens (default: characters)")
    audit.add_argument("--format", default="auto", choices=["auto", *AUDITED_FORMATS], help="input format")
    audit.add_argument("--json", metavar="OUT", help="also write the audits as JSON ({file: audit})")

    recommend = commands.add_parser(
        "recommend", help="measure the data and the reference model's preference accuracy; recommend a method and config"
    )
    recommend.add_argument("--data", action="append", required=True, metavar="FILE", help="human (or unlabelled) data (repeatable)")
    recommend.add_argument("--synthetic", action="append", default=[], metavar="FILE", help="synthetic data (repeatable)")
    recommend.add_argument("--model", default="smollm2-135m", help="reference model: embedded name or local folder")
    recommend.add_argument("--sample", type=int, default=200, help="pairs the reference accuracy is measured on")
    recommend.add_argument("--max-length", type=int, default=512, help="prompt + answer tokens per measured sequence")
    recommend.add_argument("--format", default="auto", choices=["auto", *AUDITED_FORMATS], help="input format")
    recommend.add_argument("--output", metavar="YAML", help="write a ready-to-run config for the recommendation")
    return parser


def _probe(args, console: Console) -> None:
    from preftune.eval.probes import SHIPPED_PROBES, load_trained_model, run_probes
    from preftune.model.loading import load_model, load_tokenizer

    model, tokenizer_source = load_trained_model(args.model)
    tokenizer = load_tokenizer(tokenizer_source)
    reference = load_model(args.reference) if args.reference else None
    table = run_probes(
        model, tokenizer, reference=reference, path=args.pairs or SHIPPED_PROBES, max_length=args.max_length,
        model_name=args.model, reference_name=args.reference or "",
    )
    print(table.markdown())
    if args.output:
        console.print(f"wrote {table.write(args.output)}")


def _constitute(args, console: Console) -> None:
    import torch

    from preftune.model.loading import load_model, load_tokenizer
    from preftune.online.constitute import constitute, load_constitution, read_prompts
    from preftune.online.generation import GenerationSettings

    from pydantic import ValidationError

    from preftune.errors import ConfigError

    constitution = load_constitution(args.constitution)
    try:
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    except ValidationError as error:
        raise ConfigError(f"constitute: {error.errors()[0]['loc'][0]}: {error.errors()[0]['msg']}") from None
    tokenizer = load_tokenizer(args.model)
    prompts = read_prompts(args.prompts, tokenizer)
    model = load_model(args.model)
    if torch.cuda.is_available():
        model = model.to("cuda")
    report = constitute(
        prompts, args.output, model=model, tokenizer=tokenizer, constitution=constitution, settings=settings, seed=args.seed,
        on_pair=lambda index: console.print(f"pair {index + 1}/{len(prompts)} written"),
    )
    console.print(
        f"wrote {report.written} pairs to {report.output} ({report.already_done} of {report.prompts} prompts were already done)"
    )


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
        # Weight-loading bars and library deprecation notices would bury preftune's own progress bar.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        warnings.filterwarnings("ignore", category=FutureWarning)
        logging.basicConfig(level=logging.WARNING)
    else:
        logging.basicConfig(level=logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        if args.command == "train":
            from preftune.run import train

            train(_load(args), console=console)
        elif args.command == "train-reward":
            from preftune.run import train

            args.overrides = ["method.loss_type=reward_model", *args.overrides]
            train(_load(args), console=console)
        elif args.command == "score":
            from preftune.online.score import score_file

            output = args.output or str(Path(args.data).with_suffix("")) + ".scored.jsonl"
            count = score_file(args.model, args.data, output, completion_field=args.completion_field, batch_size=args.batch_size)
            console.print(f"scored {count} records: {escape(output)}")
        elif args.command == "config":
            from preftune.config import DEFAULT_METHOD, describe_defaults, dump_config

            if args.config or args.overrides or args.output_dir:
                print(dump_config(_load(args)), end="")
            else:
                print(describe_defaults(args.method or DEFAULT_METHOD), end="")

        elif args.command == "sweep":
            from preftune.sweep import parse_values, run_sweep

            result = run_sweep(_load(args), args.param, parse_values(args.values), console=console)
            console.print(result.table.read_text(encoding="utf-8"))
            console.print(f"[bold green]sweep done[/]: {result.table}, {result.csv}, {result.plot}")
        elif args.command == "convert":
            from preftune.data.kto import convert_to_kto
            from preftune.data.pipeline import resolve_data_path

            tokenizer = None
            if args.tokenizer:
                from preftune.model.loading import load_tokenizer

                tokenizer = load_tokenizer(args.tokenizer)
            written, report = convert_to_kto(resolve_data_path(args.input), args.output, format=args.format, tokenizer=tokenizer)
            console.print(report.summary())
            console.print(f"wrote {written} KTO records to {args.output}")
        elif args.command == "audit":
            _audit(args)
        elif args.command == "recommend":
            _recommend(args, console)
        elif args.command == "probe":
            _probe(args, console)
        elif args.command == "constitute":
            _constitute(args, console)
        elif args.command == "eval":
            from preftune.evaluate import evaluate_model

            paths = evaluate_model(
                args.model, data=args.data, output_dir=args.output_dir, reference=args.reference, beta=args.beta,
                data_format=args.format, max_length=args.max_length, max_samples=args.max_samples, overwrite=args.overwrite,
                console=console,
            )
            console.print(f"[bold green]evaluated[/]: {escape(str(paths.html))}")
        elif args.command == "report":
            from preftune.eval.html_report import build_report

            paths = build_report(args.run_dir)
            console.print(escape(paths.summary.read_text(encoding="utf-8")))
            console.print(f"[bold green]report[/]: {escape(str(paths.html))}, {escape(str(paths.summary))}, {len(paths.plots)} plots")
        elif args.command == "losses":
            from preftune.methods import METHODS

            for name, method in METHODS.items():
                also = f" (alias: {', '.join(method.aliases)})" if method.aliases else ""
                print(f"{name:<18} {method.summary}{also}")
        return 0
    except PreftuneError as error:
        if args.verbose:
            raise
        # Messages hold paths and reason tags in brackets: print them as text, never as Rich markup.
        console.print(f"[bold red]error:[/] {escape(str(error))}")
        return 130 if isinstance(error, TrainingInterrupted) else 2


def _audit(args) -> None:
    from preftune.atomic import atomic_write_json
    from preftune.data.audit import audit_records
    from preftune.data.formats import PAIRED, UNPAIRED, load_examples
    from preftune.data.pipeline import resolve_data_path

    tokenizer = None
    if args.tokenizer:
        from preftune.model.loading import load_tokenizer

        tokenizer = load_tokenizer(args.tokenizer)
    audits = {}
    for spec in args.files:
        records, report = load_examples(resolve_data_path(spec), format=args.format, tokenizer=tokenizer, accept=(PAIRED, UNPAIRED))
        audits[spec] = audit_records(records, tokenizer)
        print(f"== {spec}\n{report.summary()}\n{audits[spec].summary()}")
    if args.json:
        atomic_write_json(args.json, {spec: audit.to_dict() for spec, audit in audits.items()})


def _recommend(args, console) -> None:
    from preftune.data.pipeline import resolve_data_path
    from preftune.eval.recommend import data_kind, decide, measure_traits, write_recommended_config
    from preftune.model.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)  # lengths in its tokens; its chat template renders chat data
    # The reference model is only needed (and only loaded) to measure its accuracy on pairs.
    model = load_model(args.model) if data_kind(resolve_data_path(args.data[0]), args.format) == "paired" else None
    measurement = measure_traits(
        args.data, synthetic_files=args.synthetic, model=model, tokenizer=tokenizer,
        sample=args.sample, format=args.format, max_length=args.max_length,
    )
    if measurement.audit is not None:
        print(measurement.audit.summary())
    recommendation = decide(measurement.traits)
    print(recommendation.summary())
    if args.output:
        if len(args.data) > 1:
            raise ConfigError("--output writes one training file (plus --synthetic sources): give one --data file")
        write_recommended_config(
            recommendation, args.output, data_file=args.data[0], synthetic_files=args.synthetic, model_name_or_path=args.model
        )
        console.print(f"wrote {args.output}: preftune train --config {args.output}")


def command_line() -> int:
    """The `preftune` command and `python -m preftune`: `main`, on tcmalloc or jemalloc where one is installed.

    The re-execution happens here, not in `main`, which tests and other programs call in their own process.
    """
    exec_with_fast_allocator()
    return main()


if __name__ == "__main__":
    sys.exit(command_line())
