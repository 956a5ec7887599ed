"""The training loop: get batch → forward → loss → backward → step → controllers.

The loop knows methods only through their `Method` declaration (preftune/methods/base.py) and
the parts `preftune.train.setup.assemble` built. Data order is a pure function of (seed, epoch),
so a checkpoint's (epoch, step_in_epoch) is enough to continue exactly where the run stopped, and
the run folder (preftune/runfolder.py) is rolled back to the checkpoint's step on resume.

Epoch restarts (preftune/control/base.py): while a controller may request one, the loop writes a
checkpoint at every epoch start and evaluates at every epoch end; a request in that evaluation
restores the epoch-start checkpoint exactly as a resume would (records included) and trains the
epoch again.
"""

from __future__ import annotations

import math
import resource
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object, set_seed
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from preftune import runfolder
from preftune.atomic import atomic_write_json
from preftune.config import RunConfig
from preftune.config_checks import config_warnings
from preftune.control import StepContext
from preftune.control.monitors import TrainingDiverged
from preftune.data.collate import PackedBatch
from preftune.errors import CheckpointError, TrainingInterrupted
from preftune.logprobs import SequenceLogps, sequence_logps
from preftune.losses import LossOutput
from preftune.methods.base import RolloutContext
from preftune.methods.evaluation import evaluate_examples, summarize_evaluation
from preftune.model.export import save_adapter, save_merged
from preftune.train import run_dir as run_folder
from preftune.train.checkpoint import (
    checkpoint_path,
    checkpoint_tensors,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    remove_checkpoints_after,
    save_checkpoint,
)
from preftune.train.distributed import grad_norm_value
from preftune.train.metrics_log import MetricsLog
from preftune.train.projection import project
from preftune.train.setup import TrainingParts


@dataclass
class TrainerState:
    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    pairs_seen: int = 0
    lr_scale: float = 1.0
    epoch_restarts: int = 0  # epochs rolled back and trained again so far
    eval_history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class TrainResult:
    run_dir: Path
    state: TrainerState
    first_eval: dict[str, float] | None
    final_eval: dict[str, float] | None
    train_seconds: float


class Trainer:
    def __init__(self, config: RunConfig, parts: TrainingParts, *, tokenizer, data, console: Console | None = None):
        self.config = config
        self.training = config.training
        self.parts = parts
        self.method = parts.method
        self.loss = parts.loss
        self.layout = parts.layout
        self.rollout = parts.rollout
        self.accelerator = parts.accelerator
        self.policy = parts.policy
        self.reference = parts.reference
        self.reference_cache = parts.reference_cache
        self._evaluation_reference: dict[bytes, SequenceLogps] = {}
        self.controllers = parts.controllers
        self.projection = parts.projection
        self.trainable = parts.trainable
        self.optimizer = parts.optimizer
        self.scheduler = parts.scheduler
        self.total_steps = parts.total_steps
        self.steps_per_epoch = parts.steps_per_epoch
        self.tokenizer = tokenizer
        self.data = data
        self.console = console or Console(stderr=True)
        self.run_dir = Path(config.output_dir)
        self.world_size = self.accelerator.num_processes
        self.pad_id = tokenizer.pad_token_id
        self.state = TrainerState()
        self.identity = run_folder.run_identity(config, data.train, data.validation)
        self.log: MetricsLog | None = None
        self._stop_signal: int | None = None
        self._epoch_restart: dict[str, Any] | None = None  # a request made in the evaluation that closed an epoch
        self._checkpointed_step: int | None = None  # the step of the last checkpoint this process wrote
        set_seed(config.training.seed)

    # ---- data order -------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.training.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.data.train), generator=generator).tolist()

    def step_micro_batches(self, epoch: int, step_in_epoch: int) -> list[list[int]]:
        """Global example indices of each micro-batch of one optimiser step (all processes together)."""
        order = self.epoch_order(epoch)
        accumulation = self.training.gradient_accumulation_steps
        per_micro = self.parts.examples_per_micro_batch
        first = step_in_epoch * accumulation * per_micro
        starts = [first + micro * per_micro for micro in range(accumulation)]
        return [order[start : start + per_micro] for start in starts if start < len(order)]

    def _local_shard(self, indices: list[int]) -> list[int]:
        per_device = self.training.per_device_train_batch_size
        rank = self.accelerator.process_index
        return indices[rank * per_device : (rank + 1) * per_device]

    # ---- log-probs and loss -----------------------------------------------------------------
    def policy_logps(self, batch: PackedBatch) -> SequenceLogps:
        with self.accelerator.autocast():
            if self.layout.forward is not None:  # e.g. a reward model's scalar head instead of the engine
                return self.layout.forward(self.policy, batch)
            return sequence_logps(self.policy, batch, chunk_size=self.training.logprob_chunk_size, per_token=self.layout.per_token)

    @torch.no_grad()
    def _rollout_policy_logps(self, batch: PackedBatch) -> SequenceLogps:
        return self.policy_logps(batch.to(self.accelerator.device))

    def _rollout_reference_logps(self, batch: PackedBatch) -> SequenceLogps:
        return self.reference_logps(batch.to(self.accelerator.device))

    def reference_logps(self, batch: PackedBatch) -> SequenceLogps:
        if self.reference_cache is not None:
            return self.reference_cache.logps(batch, self._compute_reference_logps)
        return self._compute_reference_logps(batch)

    def evaluation_reference_logps(self, batch: PackedBatch) -> SequenceLogps:
        """Validation's reference log-probs: computed in this process on the first evaluation, then kept in memory.

        Not from the on-disk cache: with a bf16 base, the same pair's log-probs from another process differ
        from this process's forward by up to ~1e-2 nats per token, so at step 0 (policy = reference) pairs
        would show margins that are only that noise. Every evaluation runs the same batches in the same
        order, so the policy and its reference are always compared within one process's arithmetic.
        """
        if self.rollout is not None:  # online methods evaluate freshly generated answers: nothing repeats
            return self._compute_reference_logps(batch)
        key = batch.input_ids.cpu().numpy().tobytes() + batch.target_index.cpu().numpy().tobytes()
        if key not in self._evaluation_reference:
            self._evaluation_reference[key] = self._compute_reference_logps(batch)
        return self._evaluation_reference[key]

    def _compute_reference_logps(self, batch: PackedBatch) -> SequenceLogps:
        with self.accelerator.autocast():
            return self.reference.logps(batch, per_token=self.layout.per_token)

    def loss_inputs(self) -> dict[str, Any]:
        inputs: dict[str, Any] = {}
        for controller in self.controllers:
            inputs.update(controller.loss_inputs())
        return inputs

    def micro_batch_logps(self, examples: list) -> tuple[Any, Any]:
        """(policy, reference) log-probs of one micro-batch in the method's shape; reference None without one."""
        batch = self.layout.collate(examples, pad_id=self.pad_id).to(self.accelerator.device)
        uses_reference = self.reference is not None and self.method.reference_in_loss
        reference = self.layout.split(self.reference_logps(batch), examples, batch) if uses_reference else None
        policy = self.layout.split(self.policy_logps(batch), examples, batch)
        return policy, reference

    def micro_batch_loss(self, examples: list) -> LossOutput:
        policy, reference = self.micro_batch_logps(examples)
        return self.loss(policy, reference, **self.loss_inputs())

    # ---- one optimiser step -----------------------------------------------------------------
    def optimizer_step(self, micro_batches: list[list[int]]) -> dict[str, float]:
        """Accumulate over micro-batches with per-example loss scaling (batch 1 × accumulation 4 equals batch 4 × 1),
        let the controllers veto a non-finite update, then step."""
        examples_in_step = sum(len(indices) for indices in micro_batches)
        sums: dict[str, torch.Tensor] = {}
        shards = [[self.data.train[i] for i in self._local_shard(indices)] for indices in micro_batches]
        if self.rollout is not None:  # online methods: generate and score the answers of the whole step first
            shards = self.rollout(self._rollout_context(evaluation=False), shards)
        for shard, indices in zip(shards, micro_batches):
            weight = self.world_size / examples_in_step
            if not shard:
                if not self.parts.distribution.sharded:
                    continue
                # Under FSDP every process runs every micro-batch (each forward and backward is a collective):
                # a process with no examples left runs one of the micro-batch's, with weight 0.
                shard, weight = [self.data.train[indices[0]]], 0.0
            output = self.micro_batch_loss(shard)
            # The mean over processes (the all-reduce, or FSDP's reduce-scatter) is undone here, so the step averages over examples.
            self.accelerator.backward(output.losses.sum() * weight)
            if weight == 0.0:
                continue
            for key, value in {"loss": output.losses, **output.metrics}.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float().sum()
        self.all_reduce_gradients()
        totals = self.sum_across_processes(sums)
        metrics = {key: (value / examples_in_step).item() for key, value in totals.items()}
        metrics["grad_norm"] = grad_norm_value(self.clip_gradients())
        metrics["learning_rate"] = self.optimizer.param_groups[0]["lr"]
        metrics["pairs"] = float(examples_in_step)

        context = self._context(metrics)
        for controller in self.controllers:
            metrics.update(controller.before_step(context) or {})
        if not context.skip_step:  # a skipped step moves neither the weights nor the schedule (as with AMP's skips)
            self.optimizer.step()
            self.scheduler.step()
            self._apply_lr_scale()
        self.optimizer.zero_grad(set_to_none=True)
        if self.projection is not None and not context.skip_step:
            metrics.update(self._project(shards, examples_in_step))
        return metrics

    def _project(self, shards: list[list], examples_in_step: int) -> dict[str, float]:
        result = project(self, self.projection, shards, examples_in_step)
        if result.problem is not None:
            self.alert(
                "nonfinite_projection",
                f"{result.problem} in the projection after optimiser step {self.state.global_step + 1}: the projection "
                f"stopped after {result.steps_taken} applied step(s); nothing non-finite was applied",
                problem=result.problem, steps_taken=result.steps_taken,
            )
        return result.metrics

    def clip_gradients(self) -> torch.Tensor:
        """Clip the trainable gradients to `training.max_grad_norm` (null: not clipped); returns their total norm."""
        max_norm = self.training.max_grad_norm if self.training.max_grad_norm is not None else math.inf
        return torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)

    def all_reduce_gradients(self) -> None:
        """One flat all-reduce per optimiser step (see docs/ARCHITECTURE.md for why not DDP's hooks); FSDP reduces its own."""
        if self.world_size == 1 or self.parts.distribution.sharded:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.trainable]
        flat = self.accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
        offset = 0
        for p, g in zip(self.trainable, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(p).clone()
            offset += g.numel()

    def sum_across_processes(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.world_size == 1:
            return sums
        keys = sorted(gather_object([sorted(sums)])[0])
        stacked = torch.stack([torch.as_tensor(sums.get(k, 0.0), device=self.accelerator.device).float() for k in keys])
        return dict(zip(keys, self.accelerator.reduce(stacked, reduction="sum")))

    def _apply_lr_scale(self) -> None:
        """Optimiser LR = the schedule's LR × the controllers' scale (an LR cut composes with any schedule)."""
        for group, scheduled in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = scheduled * self.state.lr_scale

    def _rollout_context(self, *, evaluation: bool) -> RolloutContext:
        return RolloutContext(
            policy=self.policy, tokenizer=self.tokenizer, step=self.state.global_step, seed=self.training.seed,
            evaluation=evaluation, policy_logps=self._rollout_policy_logps, pad_id=self.pad_id,
            reference_logps=self._rollout_reference_logps if self.reference is not None else None, inputs=self.loss_inputs(),
        )

    # ---- controllers ------------------------------------------------------------------------
    def _context(self, metrics: dict[str, float] | None = None, *, epoch_end: bool = False) -> StepContext:
        return StepContext(
            step=self.state.global_step,
            total_steps=self.total_steps,
            epoch=self.state.epoch,
            metrics=metrics or {},
            lr_scale=self.state.lr_scale,
            alert=self.alert,
            epoch_end=epoch_end,
        )

    def _epoch_restarts_possible(self) -> bool:
        return bool(self.data.validation) and any(c.may_request_epoch_restart for c in self.controllers)

    def _take_lr_scale(self, context: StepContext) -> None:
        if context.lr_scale != self.state.lr_scale:
            self.state.lr_scale = context.lr_scale
            self._apply_lr_scale()

    def alert(self, kind: str, message: str, **details: Any) -> None:
        self.console.print(f"[bold yellow]alert[/] {escape(kind)}: {escape(message)}")
        if self.log is not None:
            self.log.alert(self.state.global_step, kind, message, **details)

    # ---- evaluation -------------------------------------------------------------------------
    def evaluate(self, *, epoch_end: bool = False) -> dict[str, float]:
        """Score the validation set; `epoch_end`: this evaluation closes an epoch (a restart may be requested)."""
        rows = self.evaluate_rows(self.data.validation)
        summary = summarize_evaluation(rows)
        context = self._context(epoch_end=epoch_end)
        for controller in self.controllers:
            summary.update(controller.on_evaluate(context, summary) or {})
        self._take_lr_scale(context)
        self._epoch_restart = context.epoch_restart
        self.state.eval_history.append({"step": self.state.global_step, **summary})
        if self.accelerator.is_main_process:
            runfolder.write_evaluation(self.run_dir, self.state.global_step, rows)
        return summary

    def evaluate_rows(self, examples: list) -> list[dict[str, Any]]:
        rank, world = self.accelerator.process_index, self.world_size
        was_training = self.policy.training
        self.policy.eval()
        try:
            shard = examples[rank::world]
            # Under FSDP every process runs as many evaluation batches (each forward is a collective): pad with
            # copies of the first example, whose rows are dropped below.
            padding = -(-len(examples) // world) - len(shard) if self.parts.distribution.sharded and examples else 0
            shard = shard + [examples[0]] * padding
            if self.rollout is not None and shard:  # online methods are evaluated on answers generated for the prompts
                (shard,) = self.rollout(self._rollout_context(evaluation=True), [shard])
            local = evaluate_examples(
                shard,
                loss=self.loss,
                loss_inputs=self.loss_inputs(),
                layout=self.layout,
                policy_logps=self.policy_logps,
                reference_logps=self.evaluation_reference_logps if self.reference is not None else None,
                batch_size=self.training.per_device_eval_batch_size,
                pad_id=self.pad_id,
                device=self.accelerator.device,
                first_index=rank,
                index_stride=world,
            )
            local = local[: len(local) - padding]
        finally:
            self.policy.train(was_training)
        if world == 1:
            return local
        return sorted((row for shard in gather_object([local]) for row in shard), key=lambda row: row["example"])

    # ---- checkpoints ------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        if self.reference_cache is not None:
            self.reference_cache.flush()
        if not self.parts.distribution.all_finite(self.trainable):
            raise TrainingDiverged(
                f"the weights became non-finite at step {self.state.global_step}; they were NOT checkpointed. "
                f"{self._last_good_checkpoint()} Lower training.learning_rate."
            )
        self.accelerator.wait_for_everyone()
        self._checkpointed_step = self.state.global_step
        tensors = checkpoint_tensors(self.policy, self.optimizer, keep=self.accelerator.is_main_process)  # FSDP: gathers
        if not self.accelerator.is_main_process:
            return None
        target = checkpoint_path(self.run_dir, self.state.global_step)
        save_checkpoint(
            target,
            tensors=tensors,
            trainer_state={
                "trainer": asdict(self.state),
                "scheduler": self.scheduler.state_dict(),
                "controllers": {c.name: c.state_dict() for c in self.controllers},
                "identity": self.identity,
                "config": self.config.model_dump(mode="json"),
                "records": dict(self.log.rows) if self.log is not None else None,
            },
        )
        prune_checkpoints(self.run_dir, self.training.save_total_limit, protect=self._epoch_start_checkpoint())
        return target

    def _epoch_start_checkpoint(self) -> Path | None:
        """The checkpoint an epoch restart would return to: the current epoch's first step, while restarts are possible."""
        if not self._epoch_restarts_possible():
            return None
        return checkpoint_path(self.run_dir, self.state.global_step - self.state.step_in_epoch)

    def _last_good_checkpoint(self) -> str:
        found = latest_checkpoint(self.run_dir)
        if found is None:
            return "No checkpoint was written before this point."
        return f"The last checkpoint, {found}, holds finite weights: resume it with --set resume_from=latest."

    def resume(self, checkpoint: Path) -> dict[str, int] | None:
        """Restore everything a checkpoint holds; return its record counts (for `run_dir.roll_back`)."""
        state = load_checkpoint(checkpoint, model=self.policy, optimizer=self.optimizer)
        run_folder.check_resumable(self.identity, state.get("identity"), checkpoint)
        self.scheduler.load_state_dict(state["scheduler"])
        self.state = TrainerState(**state["trainer"])
        self._apply_lr_scale()
        saved = state["controllers"]
        for controller in self.controllers:
            if controller.name not in saved:
                raise CheckpointError(f"checkpoint {checkpoint} has no state for controller '{controller.name}'")
            controller.load_state_dict(saved[controller.name])
        return state.get("records")

    def _resolve_resume(self) -> Path | None:
        requested = self.config.resume_from
        if requested is None:
            return None
        if requested == "latest":
            found = latest_checkpoint(self.run_dir)
            if found is None:
                if (self.run_dir / runfolder.METRICS).is_file():
                    raise CheckpointError(
                        f"resume_from: latest, but {self.run_dir} holds a run with no checkpoint to resume "
                        "(it stopped before its first save); set overwrite_output_dir: true to start it again"
                    )
                self.console.print(f"[yellow]resume_from: latest, but {escape(str(self.run_dir))} has no checkpoint: starting fresh")
            return found
        path = Path(requested)
        if not path.is_dir():
            raise CheckpointError(f"resume_from: {path} is not a checkpoint folder")
        return path

    # ---- the loop ---------------------------------------------------------------------------
    def train(self) -> TrainResult:
        checkpoint = self._resolve_resume()
        is_main = self.accelerator.is_main_process
        if is_main:
            run_folder.claim(self.run_dir, self.config, resuming=checkpoint is not None)
        self.accelerator.wait_for_everyone()
        if checkpoint is not None:
            rows = self.resume(checkpoint)
            if is_main:
                run_folder.roll_back(self.run_dir, self.state.global_step, rows)
            self.console.print(f"resumed from {escape(str(checkpoint))} at step {self.state.global_step}")
        if is_main:
            run_folder.write_start(self.run_dir, self.config, self.identity, self.data.summary(), self.data.evidence())
            self._warn_about_settings()
            self.log = MetricsLog(
                self.run_dir,
                tensorboard="tensorboard" in self.training.report_to,
                jsonl="jsonl" in self.training.report_to,
                purge_step=self.state.global_step + 1 if checkpoint is not None else None,
            )
        context = self._context()
        for controller in self.controllers:
            controller.on_train_start(context)
        self._take_lr_scale(context)
        self._apply_lr_scale()

        started = time.perf_counter()
        try:
            with self._stop_on_signals():
                # (not again when resuming the step-0 checkpoint an epoch restart wrote: it holds that evaluation)
                if self.state.global_step == 0 and self.data.validation and not self._evaluated_at(0):
                    self._evaluate_and_log()
                with self._progress() as (progress, task):
                    while self.state.global_step < self.total_steps:
                        metrics = self._train_one_step()
                        shown = f"reward {metrics['reward']:.3f}" if "reward" in metrics else (
                            f"acc {metrics.get('rewards/accuracies', float('nan')):.2f}"
                        )
                        progress.update(task, advance=1, description=f"loss {metrics['loss']:.4f}  {shown}")
                        self._after_step()
                        progress.update(task, completed=self.state.global_step)  # back after an epoch restart
                train_seconds = time.perf_counter() - started
                if self.data.validation and not self._evaluated_at(self.state.global_step):
                    self._evaluate_and_log()
                self.save_checkpoint()
                # Under FSDP the main process gets the gathered, unsharded policy (a collective): what is
                # exported, and what the probes after training score.
                gathered = self.parts.distribution.gathered_policy(self.policy, is_main=is_main)
                if is_main:
                    self.policy = gathered
                    self.export()
                    run_folder.update_identity(
                        self.run_dir, status="finished", steps=self.state.global_step,
                        train_seconds=round(train_seconds, 3), peak_rss_gb=round(peak_rss_gb(), 3),
                    )
        except TrainingDiverged as error:
            raise TrainingDiverged(f"{error} {self._last_good_checkpoint()}") from None
        finally:
            if self.log is not None:
                self.log.close()
            if self.reference_cache is not None:
                self.reference_cache.flush()
        history = self.state.eval_history
        return TrainResult(self.run_dir, self.state, history[0] if history else None, history[-1] if history else None, train_seconds)

    def _warn_about_settings(self) -> None:
        """Print each `config_warnings` sentence once, before the first step, and record them in run.json."""
        found = config_warnings(self.config)
        for warning in found:
            self.console.print(f"[bold yellow]warning[/]: {escape(warning)}")
        if found:
            run_folder.update_identity(self.run_dir, warnings=found)

    def _train_one_step(self) -> dict[str, float]:
        if self.state.step_in_epoch == 0:
            if self._epoch_restarts_possible() and self._checkpointed_step != self.state.global_step:
                self.save_checkpoint()  # what a restart of this epoch returns to
            context = self._context()
            for controller in self.controllers:
                self._log(controller.on_epoch_start(context) or {})
        tick = time.perf_counter()
        metrics = self.optimizer_step(self.step_micro_batches(self.state.epoch, self.state.step_in_epoch))
        metrics["pairs_per_second"] = metrics["pairs"] / (time.perf_counter() - tick)
        self.state.global_step += 1
        self.state.pairs_seen += int(metrics["pairs"])
        self.state.step_in_epoch += 1
        if self.state.step_in_epoch >= self.steps_per_epoch:
            self.state.epoch += 1
            self.state.step_in_epoch = 0
        metrics["epoch"] = self.state.epoch + self.state.step_in_epoch / self.steps_per_epoch
        context = self._context(metrics)
        for controller in self.controllers:
            metrics.update(controller.on_step_end(context) or {})
        self._take_lr_scale(context)
        if self.state.global_step % self.training.logging_steps == 0 or self.state.global_step == self.total_steps:
            self._log(metrics)
        return metrics

    def _after_step(self) -> None:
        step = self.state.global_step
        epoch_end = self.state.step_in_epoch == 0
        scheduled = bool(self.training.eval_steps) and step % self.training.eval_steps == 0
        if self.data.validation and (scheduled or (epoch_end and self._epoch_restarts_possible())):
            self._evaluate_and_log(epoch_end=epoch_end)
            if self._epoch_restart is not None:
                self._restart_epoch()
                return
        if step < self.total_steps and (
            (self.training.save_steps and step % self.training.save_steps == 0) or self._stop_signal is not None
        ):
            self.save_checkpoint()
        if self._stop_signal is not None and step < self.total_steps:
            name = signal.Signals(self._stop_signal).name
            raise TrainingInterrupted(
                f"{name}: stopped after step {step} of {self.total_steps} and wrote a checkpoint; resume with "
                f"`preftune train ... --set resume_from=latest` (output_dir {self.run_dir})"
            )

    def _restart_epoch(self) -> None:
        """Roll back to the start of the epoch that just ended, as a resume from its first checkpoint would, and train it again."""
        request, self._epoch_restart = self._epoch_restart, None
        abandoned_step, restarts = self.state.global_step, self.state.epoch_restarts + 1
        start = abandoned_step - self.steps_per_epoch
        checkpoint = checkpoint_path(self.run_dir, start)
        if not checkpoint.is_dir():
            raise CheckpointError(
                f"an epoch restart needs the epoch-start checkpoint {checkpoint}, which is missing "
                "(removed, or this run was resumed from a copied checkpoint without it)"
            )
        self.accelerator.wait_for_everyone()
        if self.log is not None:
            self.log.close()
        rows = self.resume(checkpoint)
        self.state.epoch_restarts = restarts
        if self.accelerator.is_main_process:
            run_folder.roll_back(self.run_dir, start, rows)
            remove_checkpoints_after(self.run_dir, start)
            self.log = MetricsLog(
                self.run_dir,
                tensorboard="tensorboard" in self.training.report_to,
                jsonl="jsonl" in self.training.report_to,
                purge_step=start + 1,
            )
        epoch = self.state.epoch
        details = {
            "what_it_means": f"steps {start + 1}–{abandoned_step} were trained, judged at the epoch's end and dropped; "
            "the epoch is trained again from its start with the same data order",
            **{key: value for key, value in request.items() if key != "reason"},
            "epoch": epoch, "restart": restarts, "abandoned_step": abandoned_step,
        }
        self.alert("epoch_restart", f"epoch {epoch} restarted from step {start} (restart {restarts}): {request['reason']}", **details)
        context = self._context()
        context.epoch_restart = request
        for controller in self.controllers:
            self._log(controller.on_epoch_restart(context) or {})
        self._take_lr_scale(context)
        self._checkpointed_step = None
        self.save_checkpoint()  # the epoch start again, with what on_epoch_restart changed: what a resume continues

    def _evaluated_at(self, step: int) -> bool:
        return bool(self.state.eval_history) and self.state.eval_history[-1]["step"] == step

    def _evaluate_and_log(self, *, epoch_end: bool = False) -> dict[str, float]:
        summary = self.evaluate(epoch_end=epoch_end)
        self._log(summary)
        accuracy = summary.get("eval/rewards/accuracies")
        shown = f"accuracy {accuracy:.3f}  " if accuracy is not None else ""
        if "eval/reward" in summary:  # online methods: the reward of answers generated for the validation prompts
            shown += f"reward {summary['eval/reward']:.4f}  "
        if "eval/rewards/margins" in summary:
            shown += (
                f"margin {summary['eval/rewards/margins']:+.4f}  "
                f"negative margins {summary.get('eval/negative_margin_fraction', float('nan')):.1%}"
            )
        self.console.print(f"[cyan]eval @ step {self.state.global_step}[/]: loss {summary['eval/loss']:.4f}  {shown}")
        return summary

    def _log(self, metrics: dict[str, float]) -> None:
        if metrics and self.log is not None:
            self.log.log(self.state.global_step, metrics)

    @contextmanager
    def _progress(self):
        progress = Progress(
            TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), TextColumn("{task.description}"), console=self.console,
            disable=not self.accelerator.is_main_process,
        )
        with progress:
            yield progress, progress.add_task("", total=self.total_steps, completed=self.state.global_step)

    @contextmanager
    def _stop_on_signals(self):
        """Ctrl-C / SIGTERM ask for a checkpoint and a stop at the next step boundary; a second Ctrl-C stops at once."""

        def request_stop(signum, frame):
            if self._stop_signal is not None:
                raise KeyboardInterrupt
            self._stop_signal = signum
            self.console.print("[yellow]stopping after this step (a checkpoint will be written); Ctrl-C again to abort")

        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def export(self) -> None:
        final = self.run_dir / runfolder.FINAL
        if self.method.export is not None:
            self.method.export(self.policy, self.tokenizer, final)
        else:
            save_adapter(self.policy, self.tokenizer, final / "adapter")
            save_merged(self.policy, self.tokenizer, final / "merged")
        states = {c.name: c.state_dict() for c in self.controllers}
        atomic_write_json(self.run_dir / runfolder.CONTROLLERS, states)
        for controller in self.controllers:
            controller.export(final)


def peak_rss_gb() -> float:
    """This process's peak resident memory: Linux's VmHWM where /proc has it, else getrusage (macOS reports bytes).

    Not `ru_maxrss` on Linux: it carries a forked parent's high-water mark across exec into the child,
    so a run started from a large Python process would report that process's memory.
    """
    try:
        for line in Path("/proc/self/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / (1 << 20)  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 30) if sys.platform == "darwin" else peak / (1 << 20)
