"""How the policy is spread over the processes: whole on every process (data parallel) or sharded with FSDP2.

Data parallel (any launcher, the default): every process holds the whole model and the trainer
averages the trainable gradients with one flat all-reduce per optimiser step (docs/ARCHITECTURE.md).

FSDP (`training.fsdp`; under `auto`, when an accelerate FSDP launcher config asks for it): PyTorch
FSDP2 `fully_shard` on every decoder layer, then on the causal LM itself as the root unit (the
embeddings, the final norm and the LM head, tied or not). Each process keeps 1/N of every
parameter, gradient and optimiser state; a unit's weights are all-gathered for its forward and its
backward, and its gradients are reduce-scattered (averaged over processes) in backward, so the
trainer runs no all-reduce of its own and its loss scaling (`× world_size / examples_in_step`) stays
exact.

The engine never calls the model's forward: it calls the decoder, then the LM head over chunks of
answer positions (`preftune.logprobs.engine.answer_forward`). That function is registered as a
forward of the root (`register_fsdp_forward_method`), so the root's weights are gathered once
around the decoder and all head chunks, and the chunk loop issues no collective: processes with
different numbers of answer tokens run different numbers of chunks and cannot deadlock.

What every process must still do the same number of times, because each is a collective: forwards
and backwards (the trainer gives a process with no examples in a micro-batch a zero-weighted
stand-in and pads evaluation shards to one length), and reference forwards (the reference cache
agrees across processes whether a batch was a hit: `all_processes_hit`).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MethodType
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from preftune.config import RunConfig
from preftune.errors import ConfigError
from preftune.logprobs.engine import SHARDED_ANSWER_FORWARD, answer_forward
from preftune.model.lora import is_lora

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class LauncherFSDP:
    """The FSDP settings an accelerate launcher config passes on (`accelerate launch` sets FSDP_* variables)."""

    reshard_after_forward: bool = True
    layer_classes: tuple[str, ...] = ()  # fsdp_transformer_layer_cls_to_wrap; empty: the model's own decoder-layer classes


def launcher_fsdp(environ: Mapping[str, str] | None = None) -> LauncherFSDP | None:
    """The launcher's FSDP request, or None when it made none. Settings preftune cannot honour are errors.

    Honoured: fsdp_version (must be 2), fsdp_reshard_after_forward, fsdp_transformer_layer_cls_to_wrap.
    Refused: fsdp_offload_params, fsdp_activation_checkpointing (use training.gradient_checkpointing),
    fsdp_state_dict_type SHARDED_STATE_DICT (preftune writes full state dicts), fsdp_cpu_ram_efficient_loading,
    an auto-wrap policy other than TRANSFORMER_BASED_WRAP. The prefetch, use_orig_params,
    sync_module_states and min_num_params settings do not apply to FSDP2 here and are ignored.
    """
    environ = os.environ if environ is None else environ
    if not _flag(environ, "ACCELERATE_USE_FSDP", "distributed_type: FSDP"):
        return None
    where = "the accelerate launcher config (fsdp_config)"
    version = environ.get("FSDP_VERSION", "1")
    if version != "2":
        raise ConfigError(
            f"{where} asks for fsdp_version: {version}; preftune shards with FSDP2 (torch.distributed.fsdp.fully_shard): "
            "set fsdp_version: 2 (examples/accelerate/fsdp.yaml)"
        )
    refused = {
        "FSDP_OFFLOAD_PARAMS": ("fsdp_offload_params", "preftune keeps the shards on the training device; set it to false"),
        "FSDP_ACTIVATION_CHECKPOINTING": (
            "fsdp_activation_checkpointing", "set it to false and use preftune's training.gradient_checkpointing"
        ),
        "FSDP_CPU_RAM_EFFICIENT_LOADING": (
            "fsdp_cpu_ram_efficient_loading", "every process loads the whole model before it is sharded; set it to false"
        ),
    }
    for variable, (key, fix) in refused.items():
        if _flag(environ, variable, key):
            raise ConfigError(f"{where}: {key}: true is not supported: {fix}")
    if environ.get("FSDP_STATE_DICT_TYPE", "FULL_STATE_DICT") not in ("FULL_STATE_DICT", ""):
        raise ConfigError(
            f"{where}: fsdp_state_dict_type: {environ['FSDP_STATE_DICT_TYPE']} is not supported: preftune gathers full "
            "state dicts for checkpoints and the export (they resume on any number of processes); set FULL_STATE_DICT"
        )
    wrap = environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP")
    if wrap not in ("TRANSFORMER_BASED_WRAP", ""):
        raise ConfigError(
            f"{where}: fsdp_auto_wrap_policy: {wrap} is not supported: preftune shards each decoder layer "
            "(TRANSFORMER_BASED_WRAP) and the rest of the model as the root"
        )
    classes = tuple(name.strip() for name in environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if name.strip())
    return LauncherFSDP(reshard_after_forward=_flag(environ, "FSDP_RESHARD_AFTER_FORWARD", "fsdp_reshard_after_forward", True),
                        layer_classes=classes)


def _flag(environ: Mapping[str, str], variable: str, key: str, default: bool = False) -> bool:
    value = environ.get(variable)
    if value is None:
        return default
    if value.strip().lower() in _TRUE:
        return True
    if value.strip().lower() in _FALSE:
        return False
    raise ConfigError(f"the accelerate launcher config: {key} must be true or false (the launcher set {variable}={value})")


@dataclass
class Distribution:
    """The chosen layout: `single` (one process), `data_parallel` (whole model per process) or `fsdp`."""

    strategy: str
    processes: int
    reason: str
    reshard_after_forward: bool = True
    layer_classes: tuple[str, ...] = ()
    sharded_layers: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # Main process, FSDP only: the policy's modules with meta-device parameters (taken by `shard`), which
    # `gathered_policy` fills with the gathered weights.
    _blueprint: torch.nn.Module | None = None

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    def as_record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"strategy": self.strategy, "processes": self.processes, "reason": self.reason}
        if self.sharded:
            record.update(reshard_after_forward=self.reshard_after_forward, layer_classes=list(self.layer_classes),
                          sharded_layers=self.sharded_layers)
        return record

    # ---- sharding ---------------------------------------------------------------------------
    def shard(self, model: torch.nn.Module, *, keep_blueprint: bool) -> None:
        """`fully_shard` every decoder layer, then the causal LM as root; route the engine through the root.

        `keep_blueprint` (the main process, the policy): keep the module structure with meta parameters,
        so that `gathered_policy` can rebuild an unsharded policy for the export without a second copy
        of the weights during training.
        """
        inner = model.get_base_model() if is_lora(model) else model
        classes = self.layer_classes or tuple(getattr(inner, "_no_split_modules", None) or ())
        layers = [module for module in inner.modules() if type(module).__name__ in classes]
        if not layers:
            present = sorted({type(m).__name__ for m in inner.modules() if "Layer" in type(m).__name__ or "Block" in type(m).__name__})
            raise ConfigError(
                f"FSDP: no module of {type(inner).__name__} is of the layer classes {list(classes) or '(none declared)'} to shard; "
                f"set fsdp_transformer_layer_cls_to_wrap in the accelerate config to one of {present}"
            )
        # Names before fully_shard: it swaps each module's class for an FSDP subclass (FSDPLlamaDecoderLayer).
        self.layer_classes = tuple(sorted({type(layer).__name__ for layer in layers}))
        if keep_blueprint:
            self._blueprint = _meta_copy(model)
        mesh = init_device_mesh(self.device.type, (self.processes,))
        for layer in layers:
            fully_shard(layer, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        fully_shard(inner, mesh=mesh)  # the root: everything outside the layers, the LM head included
        setattr(inner, SHARDED_ANSWER_FORWARD, MethodType(answer_forward, inner))
        register_fsdp_forward_method(inner, SHARDED_ANSWER_FORWARD)
        self.sharded_layers = len(layers)

    # ---- agreements across processes --------------------------------------------------------
    def all_processes_hit(self, hit: bool) -> bool:
        """True only when every process's reference batch came from the cache (a collective under FSDP)."""
        if not self.sharded:
            return hit
        flag = torch.tensor([int(hit)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def all_finite(self, parameters: Iterable[torch.nn.Parameter]) -> bool:
        """Every weight finite, on every shard (a collective under FSDP)."""
        local = all(bool(torch.isfinite(local_tensor(p)).all()) for p in parameters)
        if not self.sharded:
            return local
        flag = torch.tensor([int(local)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def gathered_policy(self, policy: torch.nn.Module, *, is_main: bool) -> torch.nn.Module | None:
        """The policy with full weights (CPU) on the main process, None elsewhere; without FSDP the policy itself.

        A collective under FSDP: every process calls it, and the weights are gathered one tensor at a time.
        """
        if not self.sharded:
            return policy if is_main else None
        reshard_all(policy)
        gathered = []
        for name, parameter in policy.named_parameters():
            full = full_tensor(parameter.detach())  # every process takes part; only the main one keeps a (CPU) copy
            if is_main:
                gathered.append((name, full.cpu()))
        if not is_main:
            return None
        blueprint = self._blueprint
        replacements: dict[int, torch.nn.Parameter] = {}
        for (name, tensor), (blueprint_name, meta) in zip(gathered, blueprint.named_parameters(), strict=True):
            if name != blueprint_name:
                raise RuntimeError(f"FSDP export: parameter {name} of the sharded policy is {blueprint_name} in its blueprint")
            replacements[id(meta)] = torch.nn.Parameter(tensor.clone(), requires_grad=meta.requires_grad)
        # Module by module, so a parameter shared by two modules (tied embeddings) stays one parameter.
        for module in blueprint.modules():
            for key, parameter in module._parameters.items():
                if parameter is not None and id(parameter) in replacements:
                    module._parameters[key] = replacements[id(parameter)]
        return blueprint


def grad_norm_value(total_norm: torch.Tensor) -> float:
    """`clip_grad_norm_`'s result as a float; over sharded gradients it is a DTensor to be reduced first."""
    return float(full_tensor(total_norm).item())


def reshard_all(model: torch.nn.Module) -> None:
    """Put every FSDP unit of `model` back to its shards (local, no communication).

    After a forward without backward (evaluation) a unit can stay gathered (the root always does), and
    its modules then hold plain full tensors instead of the sharded parameters; anything that walks
    the parameters and gathers them must see the same sharded parameters on every process.
    """
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (an all-gather: a collective), any other tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of a DTensor, any other tensor as it is."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _meta_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy whose parameters are meta tensors (no memory); buffers (e.g. rotary frequencies) are copied."""
    memo: dict[int, Any] = {
        id(parameter): torch.nn.Parameter(torch.empty_like(parameter, device="meta"), requires_grad=parameter.requires_grad)
        for parameter in model.parameters()
    }
    return copy.deepcopy(model, memo)


def plan_distribution(config: RunConfig, *, processes: int, device: torch.device, environ: Mapping[str, str] | None = None) -> Distribution:
    """Pick the layout from `training.fsdp`, the launcher and the process count; refuse what FSDP cannot run yet."""
    setting = config.training.fsdp
    if processes == 1:
        return Distribution("single", processes, "one process: nothing to distribute or shard", device=device)
    if setting is False:
        return Distribution("data_parallel", processes, "training.fsdp: false: every process holds the whole model", device=device)
    # Read (and checked) only when it decides something: an FSDP launcher config under training.fsdp: false is not an error.
    launcher = launcher_fsdp(environ)
    if setting == "auto" and launcher is None:
        return Distribution(
            "data_parallel", processes, "no FSDP launcher config (training.fsdp: auto): every process holds the whole model", device=device
        )
    method = config.method_spec
    if method.build_rollout is not None or method.model_kind != "causal_lm":
        raise ConfigError(
            f"training.fsdp: loss_type {method.name} is not supported under FSDP yet (generation and reward-model heads "
            "would need every process to run the same forwards); set training.fsdp: false to train it data-parallel"
        )
    if config.model.load_in_4bit:
        raise ConfigError(
            "training.fsdp with model.load_in_4bit: FSDP2 cannot shard bitsandbytes' 4-bit weights with their "
            "quantisation state; set training.fsdp: false to train the 4-bit base data-parallel"
        )
    if config.probes is not None and config.model.lora is None:
        raise ConfigError(
            "training.fsdp with probes and a full fine-tune: the probes would need the sharded frozen reference on one "
            "process; use model.lora, or probes: null (score them afterwards with `preftune probe`)"
        )
    launcher = launcher or LauncherFSDP()
    why = "training.fsdp: true" if setting is True else "the launcher's FSDP config (training.fsdp: auto)"
    return Distribution(
        "fsdp", processes, f"{why}: FSDP2, each decoder layer and the root sharded over {processes} processes",
        reshard_after_forward=launcher.reshard_after_forward, layer_classes=launcher.layer_classes, device=device,
    )
