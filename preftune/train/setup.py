"""Wiring: a config, a policy and prepared data in; the parts the training loop runs on out.

Everything the loop needs is built here once (method and loss, reference view and its cache,
controllers, optimiser, schedule), so `preftune/train/trainer.py` holds only the loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from accelerate import Accelerator
from transformers import get_scheduler

from preftune.config import RunConfig
from preftune.control import AlertSettings, Controller, LossScaleAlert, NonFiniteGuard, TrainingAlerts
from preftune.errors import ConfigError, PreftuneError
from preftune.logprobs.attention import runs_packed_cpu_attention
from preftune.logprobs.cache import ReferenceLogpsCache, open_reference_cache
from preftune.methods import DataShape, Method
from preftune.methods.base import ExampleLayout, Loss, ProjectionSpec, Rollout
from preftune.model.memory import MemoryPlan, default_memory_budget_bytes, estimate_activation_bytes, plan_gradient_checkpointing
from preftune.model.precision import runs_low_precision_mlps
from preftune.model.reference import ReferenceModel
from preftune.train.distributed import Distribution, plan_distribution, reshard_all


@dataclass
class TrainingParts:
    method: Method
    loss: Loss
    layout: ExampleLayout
    rollout: Rollout | None  # online methods: prompts -> generated, scored GROUP examples, before collate
    accelerator: Accelerator
    policy: torch.nn.Module
    reference: ReferenceModel | None
    reference_cache: ReferenceLogpsCache | None
    controllers: list[Controller]
    projection: ProjectionSpec | None  # run after each optimiser step when the method asks for it
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    examples_per_micro_batch: int  # all processes together
    steps_per_epoch: int
    total_steps: int
    memory: MemoryPlan
    distribution: Distribution


def monitoring_controllers(config: RunConfig) -> list[Controller]:
    """The controllers every run has (the non-finite guard) and the ones `monitoring:` asks for."""
    controllers: list[Controller] = [NonFiniteGuard(max_consecutive=config.training.max_consecutive_nonfinite_steps)]
    if config.monitoring.alerts:
        controllers.append(TrainingAlerts(AlertSettings.model_validate(config.monitoring.model_dump(exclude={"alerts"}))))
    if config.monitoring.loss_alert_threshold is not None:
        controllers.append(LossScaleAlert(threshold=config.monitoring.loss_alert_threshold))
    return controllers


def memory_plan(config: RunConfig, policy: torch.nn.Module, *, longest_example: int | None, device) -> MemoryPlan:
    """The gradient-checkpointing decision for this run (preftune/model/memory.py has the estimate's formula).

    `longest_example`: tokens of the longest training example (prompt + all answers); None bounds
    it by the config alone: answers per example × data.max_length (pairs 2, KTO 1).
    """
    training, lora = config.training, config.model.lora
    inner = policy.get_base_model() if hasattr(policy, "get_base_model") else policy
    if longest_example is None:
        answers = {DataShape.PAIRED: 2, DataShape.UNPAIRED: 1}.get(config.method_spec.data_shape)
        if answers is None:
            raise ValueError(f"memory_plan: pass longest_example for {config.method_spec.data_shape.value} data")
        longest_example = answers * config.data.max_length
    estimate = estimate_activation_bytes(
        inner.config, rows=training.per_device_train_batch_size, row_length=longest_example,
        lora_rank=lora.r if lora is not None else None, lora_targets=len(lora.target_modules) if lora is not None else 0,
        low_precision_mlp=runs_low_precision_mlps(inner), packed_attention=runs_packed_cpu_attention(inner, device),
    )
    budget = None
    if training.gradient_checkpointing == "auto":
        budget = int(training.memory_budget_gb * 1e9) if training.memory_budget_gb is not None else default_memory_budget_bytes(device)
    return plan_gradient_checkpointing(training.gradient_checkpointing, estimate, budget_bytes=budget)


def assemble(
    config: RunConfig,
    *,
    policy: torch.nn.Module,
    train_examples: int,
    controllers: list[Controller] = (),
    accelerator: Accelerator | None = None,
    longest_example: int | None = None,
) -> TrainingParts:
    training = config.training
    accelerator = accelerator or Accelerator(mixed_precision=training.mixed_precision, cpu=not torch.cuda.is_available())
    method = config.method_spec
    distribution = plan_distribution(config, processes=accelerator.num_processes, device=accelerator.device)
    if training.per_device_train_batch_size < method.min_batch_size:
        raise ConfigError(
            f"loss_type {method.name} needs training.per_device_train_batch_size >= {method.min_batch_size} "
            f"(got {training.per_device_train_batch_size})"
        )
    if not distribution.sharded:
        # Under FSDP the model stays on the CPU until fully_shard moves each process's shards to the device:
        # a device never holds the whole model (nor, for a full fine-tune, its reference copy).
        policy = policy.to(accelerator.device)
    if method.attach_heads is not None:
        method.attach_heads(policy, config.method, training.seed)
    policy.train()
    memory = memory_plan(config, policy, longest_example=longest_example, device=accelerator.device)
    if memory.gradient_checkpointing:
        # Non-reentrant: gradients reach the LoRA weights without making the inputs require grad. Only
        # training-mode forwards recompute; the reference (eval mode, no_grad) runs as before.
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    reference = None
    if method.uses_reference(config.method):
        settle = partial(reshard_all, policy) if distribution.sharded else None
        reference = ReferenceModel(policy, chunk_size=training.logprob_chunk_size, before_adapter_switch=settle)
    reference_cache = None
    # Generated completions are new every step: nothing to gain from caching their reference log-probs.
    if reference is not None and training.reference_cache and method.build_rollout is None:
        reference_cache = open_reference_cache(
            reference.model, root=training.reference_cache_dir, mixed_precision=training.mixed_precision,
            all_processes_hit=distribution.all_processes_hit if distribution.sharded else None,
        )
    if distribution.sharded:
        # After the reference copy and its cache key (both need the full weights), before the optimiser (it
        # must hold the shards). A full fine-tune's frozen reference is sharded the same way.
        distribution.shard(policy, keep_blueprint=accelerator.is_main_process)
        if reference is not None and reference.model is not policy:
            distribution.shard(reference.model, keep_blueprint=False)
    trainable = [p for p in policy.parameters() if p.requires_grad]
    if not trainable:
        raise PreftuneError("the policy has no trainable parameters")
    optimizer = torch.optim.AdamW(
        trainable,
        lr=training.learning_rate,
        betas=(training.adam_beta1, training.adam_beta2),
        weight_decay=training.weight_decay,
    )
    per_micro_batch = training.per_device_train_batch_size * accelerator.num_processes
    micro_batches_per_epoch = math.ceil(train_examples / per_micro_batch)
    steps_per_epoch = math.ceil(micro_batches_per_epoch / training.gradient_accumulation_steps)
    total_steps = training.max_steps or math.ceil(training.num_train_epochs * steps_per_epoch)
    scheduler = get_scheduler(
        training.lr_scheduler_type,
        optimizer,
        num_warmup_steps=round(training.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    return TrainingParts(
        method=method,
        loss=method.build_loss(config.method),
        layout=method.layout,
        rollout=method.build_rollout(config.method) if method.build_rollout is not None else None,
        accelerator=accelerator,
        policy=policy,
        reference=reference,
        reference_cache=reference_cache,
        controllers=[*method.controllers(config.method), *monitoring_controllers(config), *controllers],
        projection=method.projection(config.method),
        trainable=trainable,
        optimizer=optimizer,
        scheduler=scheduler,
        examples_per_micro_batch=per_micro_batch,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        memory=memory,
        distribution=distribution,
    )
