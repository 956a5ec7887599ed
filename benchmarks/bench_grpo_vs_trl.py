"""preftune's GRPO vs TRL's GRPOTrainer on the same job, side by side, in one command.

    python benchmarks/bench_grpo_vs_trl.py               # 6 steps each
    python benchmarks/bench_grpo_vs_trl.py --steps 3
    python benchmarks/bench_grpo_vs_trl.py --steps 3 --repeats 3   # alternate the pair 3 times: medians
    python benchmarks/bench_grpo_vs_trl.py --steps 2 --threads 1   # on a busy machine: compare CPU s/step

The job (issue 13's setting): SmolLM2-135M (preftune's embedded default; TRL gets the converted
folder from `resolve_model_path`), preftune's `model.dtype` (default auto: the frozen decoder
linears in bf16 on CPUs with avx512_bf16/AMX, see preftune/model/precision.py; `--dtype float32`
for an fp32 base) against TRL in float32, LoRA r=16 alpha=32 on q_proj/v_proj, the shipped
hh-rlhf train prompts (the same prompts in the same order for both), 2 prompts per step × G = 4
completions, at most 48 new tokens, temperature 1, β = 0.04, one policy update per generation
batch, a length reward (1 − |words − 20| / 20, clipped at 0), lr 1e-5 constant, same seed, no
gradient checkpointing, GRPO's per-sequence loss mean on both sides. No vLLM on either side.

Each trainer runs in a fresh process (so peak RSS is its own); with `--repeats N` the pair runs N
times, alternating, and each figure is the median over the runs, the speed ratio the median of the
N per-pair ratios with their range. Reported: steady-state steps/s and
generated tokens/s (the first step excluded), peak RSS, and the process CPU seconds per step. On a
machine other jobs share, wall times mostly measure the contention (a 2-thread process whose
threads are descheduled in turn waits at every op's barrier); CPU seconds per step at
`--threads 1` still compare the work each trainer does. Results are appended to
benchmarks/results.md. TRL is a benchmark-only extra (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from worker import emit_result, run_worker  # noqa: E402  (benchmarks/worker.py: one run per process)

MODEL = "smollm2-135m"
PROMPTS_PER_STEP = 2
GROUP = 4
MAX_NEW_TOKENS = 48
BETA = 0.04
LEARNING_RATE = 1e-5
LENGTH_TARGET = 20
SEED = 42
MAX_PROMPT_TOKENS = 256


def length_reward(prompts=None, completions=None, **unused) -> list[float]:
    """The same reward as preftune's built-in `length` (words) with target LENGTH_TARGET."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [1.0 - min(1.0, abs(len(text.split()) - LENGTH_TARGET) / LENGTH_TARGET) for text in texts]


def preftune_config(output_dir: Path, steps: int, *, gradient_checkpointing: bool, dtype: str = "auto"):
    from preftune.config import validate_config

    return validate_config({
        "output_dir": str(output_dir),
        "model": {"name_or_path": MODEL, "dtype": dtype, "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}},
        "data": {"train_file": "hh-rlhf-harmless:train", "max_validation_samples": 1, "max_length": MAX_PROMPT_TOKENS + MAX_NEW_TOKENS,
                 "max_prompt_length": MAX_PROMPT_TOKENS},
        "method": {"loss_type": "grpo", "num_generations": GROUP, "beta": BETA,
                   "generation": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 1.0},
                   "rewards": [{"function": "length", "target": LENGTH_TARGET}]},
        "training": {"learning_rate": LEARNING_RATE, "lr_scheduler_type": "constant", "warmup_ratio": 0.0,
                     "per_device_train_batch_size": PROMPTS_PER_STEP, "max_steps": steps, "seed": SEED,
                     "gradient_checkpointing": gradient_checkpointing, "report_to": ["jsonl"]},
    })


def run_preftune(args) -> dict:
    from preftune.run import build_trainer

    config = preftune_config(Path(args.workdir) / "preftune", args.steps, gradient_checkpointing=False, dtype=args.dtype)
    trainer = build_trainer(config)
    step_seconds, cpu_seconds, tokens, rewards = [], [], [], []
    for step in range(args.steps):
        trainer.state.global_step = step
        started, cpu_started = time.perf_counter(), time.process_time()
        metrics = trainer.optimizer_step(trainer.step_micro_batches(epoch=0, step_in_epoch=step))
        step_seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
        tokens.append(metrics["completion_length"] * GROUP * PROMPTS_PER_STEP)
        rewards.append(metrics["reward"])
    return {"step_seconds": step_seconds, "step_cpu_seconds": cpu_seconds, "generated_tokens": tokens, "rewards": rewards,
            "precision": trainer.identity["precision"]["base_dtype"]}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from preftune.model.loading import load_tokenizer, resolve_model_path
    from preftune.run import build_trainer

    # The same prompts in the same order as preftune's run (decoded from its truncated prompt ids).
    order_trainer = build_trainer(preftune_config(Path(args.workdir) / "order", args.steps, gradient_checkpointing=False))
    tokenizer = load_tokenizer(MODEL)
    indices = [i for step in range(args.steps) for batch in order_trainer.step_micro_batches(0, step) for i in batch]
    prompts = [tokenizer.decode(order_trainer.data.train[i].prompt_ids, skip_special_tokens=True) for i in indices]
    del order_trainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.step_seconds, self.cpu_seconds, self.logs, self._started = [], [], [], None

        def on_step_begin(self, *unused, **unused_kwargs):
            self._started = (time.perf_counter(), time.process_time())

        def on_step_end(self, *unused, **unused_kwargs):
            self.step_seconds.append(time.perf_counter() - self._started[0])
            self.cpu_seconds.append(time.process_time() - self._started[1])

        def on_log(self, _args, _state, _control, logs=None, **unused):
            if logs:
                self.logs.append(logs)

    settings = dict(
        output_dir=str(Path(args.workdir) / "trl"),
        per_device_train_batch_size=PROMPTS_PER_STEP * GROUP,  # TRL counts completions
        num_generations=GROUP,
        max_completion_length=MAX_NEW_TOKENS,
        max_prompt_length=MAX_PROMPT_TOKENS,
        temperature=1.0,
        beta=BETA,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        max_steps=args.steps,
        seed=SEED,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=False,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        shuffle_dataset=False,  # the prompts in the order given (each repeated G times by TRL's sampler)
        # Equal settings: preftune runs without gradient checkpointing and with GRPO's per-sequence mean
        # (TRL 1.16 defaults: gradient checkpointing on, loss_type "dapo").
        gradient_checkpointing=False,
        loss_type="grpo",
    )
    known = set(GRPOConfig.__dataclass_fields__)
    timer = StepTimer()
    model = AutoModelForCausalLM.from_pretrained(resolve_model_path(MODEL), dtype=torch.float32)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=GRPOConfig(**{k: v for k, v in settings.items() if k in known}),
        train_dataset=Dataset.from_dict({"prompt": prompts}),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
        callbacks=[timer],
    )
    trainer.train()
    lengths = [log.get("completions/mean_length", log.get("completion_length")) for log in timer.logs if "loss" in log]
    return {
        "step_seconds": timer.step_seconds,
        "step_cpu_seconds": timer.cpu_seconds,
        "generated_tokens": [length * GROUP * PROMPTS_PER_STEP for length in lengths if length is not None],
        "rewards": [log.get("reward") for log in timer.logs if "loss" in log],
        "trl_args": {k: v for k, v in settings.items() if k in known and k != "output_dir"},
    }


def worker(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    result = run_preftune(args) if args.worker == "preftune" else run_trl(args)
    emit_result(result, started)


def launch(name: str, args) -> dict:
    steps = args.steps
    with tempfile.TemporaryDirectory(prefix=f"bench-grpo-{name}-") as workdir:
        command = [__file__, "--worker", name, "--steps", str(steps), "--workdir", workdir,
                   "--threads", str(args.threads), "--dtype", args.dtype]
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {steps} steps", flush=True)
        result = run_worker(name, command)
    measured = result["step_seconds"][1:] or result["step_seconds"]
    tokens = result["generated_tokens"][1:] or result["generated_tokens"]
    result.update(name=name, steps=steps)
    result["steps_per_second"] = len(measured) / sum(measured)
    result["seconds_per_step"] = sum(measured) / len(measured)
    cpu = result["step_cpu_seconds"][1:] or result["step_cpu_seconds"]
    result["cpu_seconds_per_step"] = sum(cpu) / len(cpu)
    result["generated_tokens_per_second"] = sum(tokens) / sum(measured[: len(tokens)]) if tokens else float("nan")
    print(f"    {result['seconds_per_step']:.2f} s/step ({result['cpu_seconds_per_step']:.2f} CPU s/step), {result['generated_tokens_per_second']:.1f} generated tokens/s, "
          f"peak RSS {result['peak_rss_gb']:.2f} GB", flush=True)
    return result


def median_result(runs: list[dict]) -> dict:
    """One row from several runs of a trainer: the median of each per-run figure."""
    figures = ("seconds_per_step", "steps_per_second", "cpu_seconds_per_step", "generated_tokens_per_second", "peak_rss_gb")
    return {**runs[0], **{key: statistics.median(run[key] for run in runs) for key in figures}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each trainer (0 = torch's default)")
    parser.add_argument("--dtype", default="auto", help="preftune's model.dtype (TRL runs float32)")
    parser.add_argument("--repeats", type=int, default=1, help="run the pair (preftune, then TRL) this many times; report medians")
    parser.add_argument("--worker", choices=["preftune", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    load_before = os.getloadavg()
    pairs = [(launch("preftune", args), launch("trl", args)) for _ in range(args.repeats)]
    load_after = os.getloadavg()
    ours, theirs = median_result([o for o, _ in pairs]), median_result([t for _, t in pairs])
    pair_ratios = [o["steps_per_second"] / t["steps_per_second"] for o, t in pairs]
    import platform

    import torch
    import trl

    ratio = statistics.median(pair_ratios)
    spread = f" [{min(pair_ratios):.2f}–{max(pair_ratios):.2f}]" if len(pairs) > 1 else ""
    lines = [
        f"\n## GRPO vs TRL GRPOTrainer — {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n",
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"trl {trl.__version__}; load average before/after {load_before[0]:.2f}/{load_after[0]:.2f}. "
        f"SmolLM2-135M (preftune model.dtype {args.dtype}: {ours.get('precision') or '?'}; TRL fp32), "
        f"{'torch threads ' + str(args.threads) + ', ' if args.threads else ''}LoRA r16 q/v, {PROMPTS_PER_STEP} prompts × G={GROUP}, ≤{MAX_NEW_TOKENS} new tokens, β {BETA}, length reward, "
        f"{args.steps} steps (first excluded); {len(pairs)} run(s) of each, alternating"
        f"{': medians over the runs, the ratio the median of the per-pair ratios [min–max]' if len(pairs) > 1 else ''}.\n",
        "| trainer | s/step | steps/s | CPU s/step | generated tokens/s | peak RSS GB | vs TRL steps/s | vs TRL CPU s/step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    cpu_ratio = theirs["cpu_seconds_per_step"] / ours["cpu_seconds_per_step"]
    for result, versus, cpu_versus in ((ours, f"{ratio:.2f}×{spread}", f"{cpu_ratio:.2f}× less"), (theirs, "1.00×", "1.00×")):
        lines.append(f"| {result['name']} | {result['seconds_per_step']:.2f} | {result['steps_per_second']:.3f} | "
                     f"{result['cpu_seconds_per_step']:.2f} | {result['generated_tokens_per_second']:.1f} | {result['peak_rss_gb']:.2f} | "
                     f"{versus} | {cpu_versus} |")
    text = "\n".join(lines) + "\n"
    print(text)
    with (HERE / "results.md").open("a", encoding="utf-8") as out:
        out.write(text)
    with (HERE / "results.jsonl").open("a", encoding="utf-8") as out:
        out.write(json.dumps({"benchmark": "grpo_vs_trl", "preftune": ours, "trl": theirs, "runs": pairs, "load": [load_before, load_after]}) + "\n")


if __name__ == "__main__":
    main()
