"""The training loop: micro-batches → log-probs → loss → exact accumulation → optimiser step → controllers.

The loop knows methods only through their `LossSpec`: whether they need a reference, and which
controllers they bring. Data order is a pure function of (seed, epoch), so a checkpoint's
(epoch, step_in_epoch) is enough to continue exactly where the run stopped.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import get_scheduler

from preftune.atomic import atomic_write_json, atomic_write_text
from preftune.config import RunConfig, dump_config
from preftune.data.collate import PackedBatch
from preftune.errors import CheckpointError, ConfigError, PreftuneError
from preftune.eval.evaluate import evaluate_examples, summarize_evaluation
from preftune.logprobs import SequenceLogps, sequence_logps
from preftune.logprobs.cache import open_reference_cache
from preftune.losses import LossOutput, get_loss_spec
from preftune.model.export import save_adapter, save_merged
from preftune.model.reference import ReferenceModel
from preftune.train.checkpoint import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from preftune.train.controllers import Controller
from preftune.train.metrics_log import MetricsLog
from preftune.train.monitors import monitoring_controllers

if TYPE_CHECKING:
    from preftune.data.pipeline import PreparedData


@dataclass
class TrainerState:
    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    pairs_seen: int = 0
    eval_history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class TrainResult:
    run_dir: Path
    state: TrainerState
    first_eval: dict[str, float] | None
    final_eval: dict[str, float] | None
    train_seconds: float


class Trainer:
    def __init__(
        self,
        config: RunConfig,
        *,
        policy: torch.nn.Module,
        tokenizer,
        data: PreparedData,
        controllers: list[Controller] = (),
        accelerator: Accelerator | None = None,
        console: Console | None = None,
    ):
        self.config = config
        self.training = config.training
        self.accelerator = accelerator or Accelerator(mixed_precision=config.training.mixed_precision, cpu=not torch.cuda.is_available())
        self.console = console or Console(stderr=True)
        self.tokenizer = tokenizer
        self.data = data
        self.run_dir = Path(config.output_dir)
        set_seed(config.training.seed)

        self.policy = policy.to(self.accelerator.device)
        self.policy.train()
        if self.training.gradient_checkpointing:
            # Non-reentrant: gradients reach the LoRA weights without making the inputs require grad. Only
            # training-mode forwards recompute; the reference (eval mode, no_grad) runs as before.
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.spec = get_loss_spec(config.method.loss_type)
        if self.training.per_device_train_batch_size < self.spec.min_batch_size:
            raise ConfigError(
                f"loss_type {self.spec.name} needs training.per_device_train_batch_size >= {self.spec.min_batch_size} "
                f"(got {self.training.per_device_train_batch_size})"
            )
        self.layout = self.spec.layout
        self.loss = self.spec.build(config.method)
        self.reference = (
            ReferenceModel(self.policy, chunk_size=self.training.logprob_chunk_size) if self.spec.needs_reference else None
        )
        self.reference_cache = (
            open_reference_cache(
                self.reference.model, root=self.training.reference_cache_dir, mixed_precision=self.training.mixed_precision
            )
            if self.reference is not None and self.training.reference_cache
            else None
        )
        self.controllers: list[Controller] = [
            *self.spec.controllers(self.loss, config.method),
            *monitoring_controllers(config.monitoring),
            *controllers,
        ]
        self.trainable = [p for p in self.policy.parameters() if p.requires_grad]
        if not self.trainable:
            raise PreftuneError("the policy has no trainable parameters")
        self.optimizer = torch.optim.AdamW(
            self.trainable,
            lr=self.training.learning_rate,
            betas=(self.training.adam_beta1, self.training.adam_beta2),
            weight_decay=self.training.weight_decay,
        )
        self.world_size = self.accelerator.num_processes
        self.pairs_per_micro_batch = self.training.per_device_train_batch_size * self.world_size
        micro_batches_per_epoch = math.ceil(len(data.train) / self.pairs_per_micro_batch)
        self.steps_per_epoch = math.ceil(micro_batches_per_epoch / self.training.gradient_accumulation_steps)
        self.total_steps = self.training.max_steps or math.ceil(self.training.num_train_epochs * self.steps_per_epoch)
        self.scheduler = get_scheduler(
            self.training.lr_scheduler_type,
            self.optimizer,
            num_warmup_steps=round(self.training.warmup_ratio * self.total_steps),
            num_training_steps=self.total_steps,
        )
        self.state = TrainerState()
        self.pad_id = tokenizer.pad_token_id
        self.log: MetricsLog | None = None
        # Per-pair validation results of the first and the latest evaluation (for the report's histograms).
        self.first_eval_per_pair: dict[str, torch.Tensor] | None = None
        self.last_eval_per_pair: dict[str, torch.Tensor] | None = None

    # ---- data order -------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.training.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data.train), generator=generator).tolist()

    def step_micro_batches(self, epoch: int, step_in_epoch: int) -> list[list[int]]:
        """Global pair indices of each micro-batch of one optimiser step (all processes together)."""
        order = self.epoch_order(epoch)
        accumulation = self.training.gradient_accumulation_steps
        first = step_in_epoch * accumulation * self.pairs_per_micro_batch
        batches = []
        for micro in range(accumulation):
            start = first + micro * self.pairs_per_micro_batch
            if start < len(order):
                batches.append(order[start : start + self.pairs_per_micro_batch])
        return batches

    def _local_shard(self, indices: list[int]) -> list[int]:
        per_device = self.training.per_device_train_batch_size
        rank = self.accelerator.process_index
        return indices[rank * per_device : (rank + 1) * per_device]

    # ---- log-probs and loss -----------------------------------------------------------------
    def policy_logps(self, batch: PackedBatch) -> SequenceLogps:
        with self.accelerator.autocast():
            return sequence_logps(self.policy, batch, chunk_size=self.training.logprob_chunk_size)

    def reference_logps(self, batch: PackedBatch) -> SequenceLogps:
        if self.reference_cache is not None:
            return self.reference_cache.logps(batch, self._compute_reference_logps)
        return self._compute_reference_logps(batch)

    def _compute_reference_logps(self, batch: PackedBatch) -> SequenceLogps:
        with self.accelerator.autocast():
            return self.reference.logps(batch)

    def micro_batch_loss(self, examples: list) -> LossOutput:
        batch = self.layout.collate(examples, pad_id=self.pad_id).to(self.accelerator.device)
        reference = self.layout.split(self.reference_logps(batch), examples) if self.reference is not None else None
        policy = self.layout.split(self.policy_logps(batch), examples)
        return self.loss(policy, reference)

    # ---- one optimiser step -----------------------------------------------------------------
    def optimizer_step(self, micro_batches: list[list[int]]) -> dict[str, float]:
        """Accumulate over micro-batches with per-pair loss scaling, so batch 1 × accumulation 4 equals batch 4 × 1."""
        pairs_in_step = sum(len(indices) for indices in micro_batches)
        sums: dict[str, torch.Tensor] = {}
        local_pairs = 0
        for indices in micro_batches:
            shard = [self.data.train[i] for i in self._local_shard(indices)]
            if not shard:
                continue
            output = self.micro_batch_loss(shard)
            # DDP-style mean over processes happens in _all_reduce_gradients; undo it so the step averages over pairs.
            self.accelerator.backward(output.losses.sum() * self.world_size / pairs_in_step)
            local_pairs += len(shard)
            for key, value in {"loss": output.losses, **output.metrics}.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float().sum()
        self._all_reduce_gradients()
        totals = self._sum_across_processes(sums)
        metrics = {key: (value / pairs_in_step).item() for key, value in totals.items()}
        if not math.isfinite(metrics["loss"]):
            raise PreftuneError(
                f"the loss became {metrics['loss']} at step {self.state.global_step + 1}; no update was applied and "
                "the last good checkpoint is in checkpoints/. Lower training.learning_rate or use mixed_precision: no."
            )
        if self.training.max_grad_norm is not None:
            metrics["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.trainable, self.training.max_grad_norm).item()
        metrics["learning_rate"] = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics["pairs"] = float(pairs_in_step)
        return metrics

    def _all_reduce_gradients(self) -> None:
        if self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable]
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
        offset = 0
        for p, g in zip(self.trainable, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
            offset += g.numel()

    def _sum_across_processes(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.world_size == 1:
            return sums
        keys = sorted(gather_object([sorted(sums)])[0])
        stacked = torch.stack([torch.as_tensor(sums.get(k, 0.0), device=self.accelerator.device).float() for k in keys])
        return dict(zip(keys, self.accelerator.reduce(stacked, reduction="sum")))

    # ---- evaluation -------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        per_pair = self.evaluate_per_pair(self.data.validation)
        if self.first_eval_per_pair is None:
            self.first_eval_per_pair = per_pair
        self.last_eval_per_pair = per_pair
        summary = summarize_evaluation(per_pair)
        for controller in self.controllers:
            summary.update(controller.on_evaluate(self, summary) or {})
        self.state.eval_history.append({"step": self.state.global_step, **summary})
        return summary

    def evaluate_per_pair(self, pairs: list) -> dict[str, torch.Tensor]:
        rank, world = self.accelerator.process_index, self.world_size
        was_training = self.policy.training
        self.policy.eval()
        try:
            local = evaluate_examples(
                pairs[rank::world],
                loss=self.loss,
                layout=self.layout,
                policy_logps=self.policy_logps,
                reference_logps=self.reference_logps if self.reference is not None else None,
                batch_size=self.training.per_device_eval_batch_size,
                pad_id=self.pad_id,
                device=self.accelerator.device,
            )
        finally:
            self.policy.train(was_training)
        if world == 1:
            return local
        shards = gather_object([local])
        return {key: torch.cat([shard[key] for shard in shards if key in shard]) for key in shards[0]}

    # ---- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        if self.reference_cache is not None:
            self.reference_cache.flush()
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return None
        target = self.run_dir / "checkpoints" / f"step-{self.state.global_step}"
        save_checkpoint(
            target,
            model=self.policy,
            optimizer=self.optimizer,
            trainer_state={
                "trainer": asdict(self.state),
                "scheduler": self.scheduler.state_dict(),
                "controllers": {c.name: c.state_dict() for c in self.controllers},
                "config": self.config.model_dump(mode="json"),
            },
        )
        prune_checkpoints(self.run_dir, self.training.save_total_limit)
        return target

    def resume(self, checkpoint: Path) -> None:
        state = load_checkpoint(checkpoint, model=self.policy, optimizer=self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        self.state = TrainerState(**state["trainer"])
        saved = state["controllers"]
        for controller in self.controllers:
            if controller.name not in saved:
                raise CheckpointError(f"checkpoint {checkpoint} has no state for controller '{controller.name}'")
            controller.load_state_dict(saved[controller.name])

    def _resolve_resume(self) -> Path | None:
        requested = self.config.resume_from
        if requested is None:
            return None
        if requested == "latest":
            found = latest_checkpoint(self.run_dir)
            if found is None:
                self.console.print(f"[yellow]resume_from: latest, but {self.run_dir}/checkpoints is empty: starting fresh")
            return found
        path = Path(requested)
        if not path.is_dir():
            raise CheckpointError(f"resume_from: {path} is not a checkpoint folder")
        return path

    # ---- the loop ---------------------------------------------------------------------------
    def _prepare_run_dir(self, resuming: bool) -> None:
        if (self.run_dir / "metrics.jsonl").exists() and not resuming:
            if not self.config.overwrite_output_dir:
                raise PreftuneError(
                    f"{self.run_dir} already holds a run. Resume it with `resume_from: latest`, pick another "
                    "output_dir, or set overwrite_output_dir: true."
                )
            for name in ("metrics.jsonl", "alerts.jsonl"):
                (self.run_dir / name).unlink(missing_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            atomic_write_text(self.run_dir / "config.yaml", dump_config(self.config))
            atomic_write_text(self.run_dir / "data_report.txt", self.data.summary() + "\n")

    def alert(self, kind: str, message: str, **details: Any) -> None:
        self.console.print(f"[bold yellow]alert[/] {kind}: {message}")
        if self.log is not None:
            self.log.alert(self.state.global_step, kind, message, **details)

    def train(self) -> TrainResult:
        checkpoint = self._resolve_resume()
        self._prepare_run_dir(resuming=checkpoint is not None)
        if checkpoint is not None:
            self.resume(checkpoint)
            self.console.print(f"resumed from {checkpoint} at step {self.state.global_step}")
        is_main = self.accelerator.is_main_process
        self.log = MetricsLog(self.run_dir, tensorboard="tensorboard" in self.training.report_to, jsonl="jsonl" in self.training.report_to) if is_main else None
        for controller in self.controllers:
            controller.on_train_start(self)

        try:
            if self.state.global_step == 0 and self.data.validation:
                self._evaluate_and_log()
            first_eval = self.state.eval_history[0] if self.state.eval_history else None
            started = time.perf_counter()
            progress = Progress(
                TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TimeRemainingColumn(), TextColumn("{task.description}"), console=self.console, disable=not is_main,
            )
            with progress:
                task = progress.add_task("", total=self.total_steps, completed=self.state.global_step)
                while self.state.global_step < self.total_steps:
                    metrics = self._train_one_step()
                    accuracy = metrics.get("rewards/accuracies", float("nan"))
                    progress.update(task, advance=1, description=f"loss {metrics['loss']:.4f}  acc {accuracy:.2f}")
                    self._after_step()
            train_seconds = time.perf_counter() - started

            final_eval = self.state.eval_history[-1] if self.state.eval_history else None
            if self.data.validation and (final_eval is None or final_eval["step"] != self.state.global_step):
                final_eval = self._evaluate_and_log()
            self.save_checkpoint()
            if is_main:
                self.export()
        except KeyboardInterrupt:
            self.console.print("[yellow]interrupted; continue from the last checkpoint with: --set resume_from=latest")
            raise
        finally:
            if self.log is not None:
                self.log.close()
            if self.reference_cache is not None:
                self.reference_cache.flush()
        return TrainResult(self.run_dir, self.state, first_eval, final_eval, train_seconds)

    def _train_one_step(self) -> dict[str, float]:
        if self.state.step_in_epoch == 0:
            for controller in self.controllers:
                self._log(controller.on_epoch_start(self, self.state.epoch) or {})
        tick = time.perf_counter()
        micro_batches = self.step_micro_batches(self.state.epoch, self.state.step_in_epoch)
        metrics = self.optimizer_step(micro_batches)
        metrics["pairs_per_second"] = metrics["pairs"] / (time.perf_counter() - tick)
        self.state.global_step += 1
        self.state.pairs_seen += int(metrics["pairs"])
        self.state.step_in_epoch += 1
        if self.state.step_in_epoch >= self.steps_per_epoch:
            self.state.epoch += 1
            self.state.step_in_epoch = 0
        metrics["epoch"] = self.state.epoch + self.state.step_in_epoch / self.steps_per_epoch
        for controller in self.controllers:
            metrics.update(controller.on_step_end(self, metrics) or {})
        if self.state.global_step % self.training.logging_steps == 0 or self.state.global_step == self.total_steps:
            self._log(metrics)
        return metrics

    def _after_step(self) -> None:
        step = self.state.global_step
        if self.data.validation and self.training.eval_steps and step % self.training.eval_steps == 0:
            self._evaluate_and_log()
        if self.training.save_steps and step % self.training.save_steps == 0 and step < self.total_steps:
            self.save_checkpoint()

    def _evaluate_and_log(self) -> dict[str, float]:
        summary = self.evaluate()
        self._log(summary)
        accuracy = summary.get("eval/rewards/accuracies")
        shown = f"accuracy {accuracy:.3f}  " if accuracy is not None else ""
        self.console.print(
            f"[cyan]eval @ step {self.state.global_step}[/]: loss {summary['eval/loss']:.4f}  {shown}"
            f"margin {summary.get('eval/rewards/margins', float('nan')):+.4f}  "
            f"negative margins {summary.get('eval/negative_margin_fraction', float('nan')):.1%}"
        )
        return summary

    def _log(self, metrics: dict[str, float]) -> None:
        if metrics and self.log is not None:
            self.log.log(self.state.global_step, metrics)

    def export(self) -> None:
        final = self.run_dir / "final"
        save_adapter(self.policy, self.tokenizer, final / "adapter")
        save_merged(self.policy, self.tokenizer, final / "merged")
        states = {c.name: c.state_dict() for c in self.controllers}
        if states:
            atomic_write_json(final / "controllers.json", states)
        for controller in self.controllers:
            controller.on_export(self, final)
