"""The Python API behind `preftune train`: config in, trained and reported run folder out."""

from __future__ import annotations

import torch
from accelerate import PartialState
from accelerate.utils import set_seed
from rich.console import Console
from rich.markup import escape

from preftune.config import RunConfig
from preftune.data.pipeline import prepare_examples
from preftune.eval.html_report import build_report
from preftune.methods import DataShape
from preftune.model.loading import load_model, load_tokenizer
from preftune.model.lora import apply_lora
from preftune.online.reward_model import build_reward_model
from preftune.train.setup import assemble
from preftune.train.trainer import Trainer, TrainResult


def build_trainer(config: RunConfig, *, console: Console | None = None) -> Trainer:
    """Load tokenizer, data and model as the config says, and wire them into a Trainer."""
    console = console or Console(stderr=True)
    settings = config.model
    tokenizer = load_tokenizer(settings.name_or_path, trust_remote_code=settings.trust_remote_code)
    shape = config.method_spec.data_shape
    data = prepare_examples(
        config.data, tokenizer, seed=config.training.seed, paired=shape is DataShape.PAIRED, prompts=shape is DataShape.PROMPTS
    )
    if PartialState(cpu=not torch.cuda.is_available()).is_main_process:
        console.print(escape(data.summary()))
    if config.method_spec.model_kind == "reward_model":
        # A scalar head on the LM; LoRA adapters (and the head in full) when model.lora is set.
        model = build_reward_model(settings.name_or_path, tokenizer, dtype=settings.dtype, lora=settings.lora, seed=config.training.seed)
    else:
        model = load_model(settings.name_or_path, dtype=settings.dtype, trust_remote_code=settings.trust_remote_code)
        if settings.lora is not None:
            lora = settings.lora
            # The adapter's random init must be the same in every process and every run of this config.
            set_seed(config.training.seed)
            model = apply_lora(model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, target_modules=lora.target_modules)
    parts = assemble(config, policy=model, train_examples=len(data.train))
    return Trainer(config, parts, tokenizer=tokenizer, data=data, console=console)


def train(config: RunConfig, *, console: Console | None = None) -> TrainResult:
    """Train, export and report; the run folder is `config.output_dir`."""
    trainer = build_trainer(config, console=console)
    result = trainer.train()
    if trainer.accelerator.is_main_process:
        report = build_report(result.run_dir)
        trainer.console.print(escape(report.summary.read_text(encoding="utf-8")))
        trainer.console.print(f"\n[bold green]done[/]: {escape(str(report.html))}")
    return result
