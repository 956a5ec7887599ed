"""The Python API behind `preftune train`: config in, trained and reported run folder out."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from rich.console import Console
from rich.markup import escape

from preftune.allocator import allocator_in_use
from preftune.config import RunConfig
from preftune.data.pipeline import prepare_examples
from preftune.eval.html_report import build_report
from preftune.eval.probes import PROBES_FILE, SHIPPED_PROBES, run_probes
from preftune.methods import DataShape
from preftune.model.loading import load_model, load_tokenizer
from preftune.model.lora import apply_lora, is_lora
from preftune.model.precision import base_weight_dtypes, resolve_base_dtype, store_frozen_linears
from preftune.model.quantization import QUANT_TYPE
from preftune.online.reward_model import build_reward_model
from preftune.train.run_dir import check_output_dir
from preftune.train.setup import assemble
from preftune.train.trainer import Trainer, TrainResult


def build_trainer(config: RunConfig, *, console: Console | None = None) -> Trainer:
    """Load tokenizer, data and model as the config says, and wire them into a Trainer."""
    console = console or Console(stderr=True)
    # Before anything slow: an output_dir that cannot be used would otherwise fail after the model and data load.
    check_output_dir(config)
    settings = config.model
    tokenizer = load_tokenizer(settings.name_or_path, trust_remote_code=settings.trust_remote_code)
    shape = config.method_spec.data_shape
    data = prepare_examples(
        config.data, tokenizer, seed=config.training.seed, paired=shape is DataShape.PAIRED, prompts=shape is DataShape.PROMPTS
    )
    if config.method_spec.check_examples is not None:  # e.g. a reward's dataset column, before the slow model load
        config.method_spec.check_examples(config.method, [*data.train, *data.validation])
    state = PartialState(cpu=not torch.cuda.is_available())
    if state.is_main_process:
        console.print(escape(data.summary()))
    if config.method_spec.model_kind == "reward_model":
        # A scalar head on the LM; LoRA adapters (and the head in full) when model.lora is set. Kept in fp32.
        base_dtype = "float32"
        model = build_reward_model(settings.name_or_path, tokenizer, dtype=base_dtype, lora=settings.lora, seed=config.training.seed)
    else:
        base_dtype = resolve_base_dtype(settings.dtype, lora=settings.lora is not None, device=state.device)
        # Loaded in fp32, then only the frozen decoder linears go low (bf16, or NF4 computing in base_dtype):
        # adapters, norms and LM head stay fp32.
        model = load_model(
            settings.name_or_path, dtype="float32", trust_remote_code=settings.trust_remote_code,
            allow_pickle=settings.allow_pickle, four_bit_compute_dtype=base_dtype if settings.load_in_4bit else None,
            device=state.device,
        )
        if not settings.load_in_4bit:  # 4-bit layers are already stored low
            store_frozen_linears(model, base_dtype)
        if settings.lora is not None:
            lora = settings.lora
            # The adapter's random init must be the same in every process and every run of this config.
            set_seed(config.training.seed)
            model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)
    longest = max((len(e.prompt_ids) + sum(map(len, e.answer_ids)) for e in data.train), default=None)
    generation = getattr(config.method, "generation", None)
    if generation is not None and longest is not None:
        # Online methods pack a prompt with every completion they generate for it.
        longest += getattr(config.method, "num_generations", 1) * generation.max_new_tokens
    parts = assemble(config, policy=model, train_examples=len(data.train), longest_example=longest)
    trainer = Trainer(config, parts, tokenizer=tokenizer, data=data, console=console)
    # Recorded in run.json beside the identity (resume compares only the config hash and data fingerprint).
    trainer.identity["precision"] = {
        "model.dtype": settings.dtype, "base_dtype": base_dtype, "parameters_by_dtype": base_weight_dtypes(model),
        "load_in_4bit": settings.load_in_4bit,
    }
    allocator = allocator_in_use()
    trainer.identity["memory"] = {**parts.memory.as_record(), "allocator": allocator}
    trainer.identity["distribution"] = parts.distribution.as_record()
    if state.is_main_process:
        console.print(f"memory: {parts.memory.reason}; malloc: {allocator}")
        console.print(f"distribution: {parts.distribution.reason}")
        stored = f"{QUANT_TYPE} computing in {base_dtype}" if settings.load_in_4bit else base_dtype
        console.print(f"precision: frozen decoder linears {stored} (model.dtype {settings.dtype}); LoRA, optimiser, LM head float32")
    return trainer


def write_probes(trainer: Trainer) -> Path:
    """Score the configured probes under the reference and the trained policy, and generate their before/after
    answers for `probes.generations` held-out prompts, into the run folder's probes.json."""
    settings = trainer.config.probes
    reference = trainer.reference.model if trainer.reference is not None and not is_lora(trainer.policy) else None
    table = run_probes(
        trainer.policy, trainer.tokenizer, reference=reference, path=settings.file or SHIPPED_PROBES,
        max_length=settings.max_length, model_name=trainer.config.model.name_or_path,
        generations=settings.generations, max_new_tokens=settings.max_new_tokens,
    )
    trainer.console.print(escape(table.markdown()))
    return table.write(trainer.run_dir / PROBES_FILE)


def train(config: RunConfig, *, console: Console | None = None) -> TrainResult:
    """Train, export and report; the run folder is `config.output_dir`."""
    trainer = build_trainer(config, console=console)
    result = trainer.train()
    if trainer.accelerator.is_main_process:
        if config.probes is not None:
            write_probes(trainer)
        report = build_report(result.run_dir)
        trainer.console.print(escape(report.summary.read_text(encoding="utf-8")))
        trainer.console.print(f"\n[bold green]done[/]: {escape(str(report.html))}")
    return result
