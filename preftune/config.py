"""The validated run configuration: one YAML file, every key checked, names as in TRL/transformers.

Unknown keys and wrong types are `ConfigError`s that name the key. `--set a.b=value` overrides
are applied to the raw mapping before validation, so they are checked the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from preftune.config_template import TEMPLATE_KEY, is_template, translate_template
from preftune.errors import ConfigError

logger = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSettings(_Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class ModelSettings(_Section):
    name_or_path: str = Field("smollm2-135m", description="embedded model name or a local Hugging Face folder")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    lora: LoraSettings | None = Field(
        default_factory=LoraSettings,
        description="LoRA adapter settings; null = full fine-tune with a frozen reference copy",
    )


class DataSettings(_Section):
    train_file: str = Field("hh-rlhf-harmless:train", description="a JSONL/JSON/Parquet file, or an embedded dataset 'name:split'")
    validation_file: str | None = Field(
        "hh-rlhf-harmless:validation", description="null = hold out `validation_split` of the train file"
    )
    validation_split: float | int = Field(0.1, description="fraction (0-1) or count held out when validation_file is null")
    format: Literal["auto", "pairs", "chat", "hh_rlhf", "sharegpt", "kto", "sharegpt_kto"] = Field(
        "auto",
        description="kto/sharegpt_kto = unpaired records (loss_type kto only); see preftune/data/formats.py",
    )
    columns: dict[str, str] | None = Field(
        None,
        description="preftune's field names (prompt, chosen, rejected, completion, label, messages) -> the file's, "
        "e.g. {prompt: question, chosen: good, rejected: bad}",
    )
    skip_invalid: bool = Field(True, description="skip bad records with a counted reason instead of stopping")
    max_train_samples: int | None = Field(None, ge=1)
    max_validation_samples: int | None = Field(None, ge=1)
    max_length: int = Field(512, ge=8, description="prompt + answer tokens per sequence")
    max_prompt_length: int | None = Field(None, ge=1, description="default: max_length // 2")


class ConstraintSettings(_Section):
    """CPO (constrained DPO): the margin constraint and its Lagrange multiplier λ; see docs/CPO.md."""

    margin_threshold: float = Field(0.1, description="τ: required policy-minus-reference log-prob margin per pair")
    temperature: float = Field(1.0, gt=0.0, description="τ is divided by this when temperature_scaled_threshold")
    temperature_scaled_threshold: bool = True
    length_normalize: bool = Field(True, description="margin from per-token mean log-probs (false: sums)")
    mode: Literal["soft", "hard"] = Field(
        "soft", description="what λ tracks: soft = mean relu(τ − margin), hard = fraction of pairs with margin < τ"
    )
    lagrangian_lr: float = Field(0.01, ge=0.0, description="dual step size η: λ += η · (violation − constraint_slack)")
    initial_lambda: float = Field(0.0, ge=0.0)
    lambda_max: float = Field(10.0, gt=0.0)
    lambda_step_clip: float = Field(0.1, gt=0.0, description="largest change of λ in one step")
    constraint_slack: float = Field(
        0.01, ge=0.0, description="violation tolerated before λ rises; below it λ falls back toward 0"
    )
    reset_lambda_each_epoch: bool = Field(True, description="λ back to initial_lambda at the start of every epoch")
    violation_alert: float | None = Field(
        0.05, ge=0.0, le=1.0, description="validation fraction of pairs with margin < τ that counts as too high; null = off"
    )
    patience: int = Field(3, ge=1, description="evaluations in a row above violation_alert before the LR is lowered")
    lr_reduction: float = Field(0.2, gt=0.0, lt=1.0, description="fraction the learning rate is lowered by")

    @model_validator(mode="after")
    def _lambda_in_range(self) -> ConstraintSettings:
        if self.initial_lambda > self.lambda_max:
            raise ValueError(f"initial_lambda ({self.initial_lambda}) must not exceed lambda_max ({self.lambda_max})")
        return self


CONSTRAINED_LOSS = "cpo"


class MethodSettings(_Section):
    loss_type: str = Field(
        "sigmoid",
        description="sigmoid (DPO); cpo = CONSTRAINED DPO (alias constrained_dpo, see docs/CPO.md); "
        "contrastive_cpo = TRL's contrastive CPO; see `preftune losses`",
    )
    beta: float = Field(0.1, gt=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    cpo_alpha: float = Field(1.0, ge=0.0, description="contrastive_cpo only: weight of the NLL term (TRL's cpo_alpha)")
    simpo_gamma: float = Field(0.5, description="simpo only: target margin γ in −log σ(β·Δavg − γ) (TRL's simpo_gamma)")
    simpo_sft_weight: float = Field(0.0, ge=0.0, description="simpo only: weight of an SFT (NLL) term on the chosen answer")
    desirable_weight: float = Field(1.0, gt=0.0, description="kto only: weight λ_D of desirable (label true) examples")
    undesirable_weight: float = Field(1.0, gt=0.0, description="kto only: weight λ_U of undesirable (label false) examples")
    constraints: ConstraintSettings | None = Field(
        None, description="loss_type cpo only (filled with defaults for it): margin constraint and Lagrange multiplier"
    )

    @field_validator("loss_type")
    @classmethod
    def _known_loss(cls, value: str) -> str:
        from preftune.losses import get_loss_spec

        get_loss_spec(value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _constraints_default_for_cpo(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("constraints") is None and _is_constrained(data.get("loss_type")):
            return {**data, "constraints": {}}
        return data

    @model_validator(mode="after")
    def _constraints_only_for_cpo(self) -> MethodSettings:
        if self.constraints is not None and not _is_constrained(self.loss_type):
            raise ValueError(
                f"method.constraints applies only to loss_type cpo (constrained DPO), not '{self.loss_type}': "
                "remove the constraints section or set loss_type: cpo"
            )
        if _is_constrained(self.loss_type) and "cpo_alpha" in self.model_fields_set:
            raise ValueError(
                "cpo_alpha belongs to CONTRASTIVE CPO (TRL's CPO, Xu et al. 2024), which is loss_type contrastive_cpo; "
                "preftune's loss_type cpo is CONSTRAINED DPO (docs/CPO.md) and has no NLL term: "
                "set loss_type: contrastive_cpo, or remove cpo_alpha"
            )
        return self


def _is_constrained(loss_type: Any) -> bool:
    from preftune.losses import ALIASES

    return isinstance(loss_type, str) and ALIASES.get(loss_type, loss_type) == CONSTRAINED_LOSS


class TrainingSettings(_Section):
    learning_rate: float = Field(5e-5, gt=0.0)
    per_device_train_batch_size: int = Field(8, ge=1)
    per_device_eval_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    num_train_epochs: float = Field(1.0, gt=0.0)
    max_steps: int | None = Field(None, ge=1, description="overrides num_train_epochs when set")
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    seed: int = 42
    logging_steps: int = Field(1, ge=1)
    eval_steps: int | None = Field(50, ge=1, description="also evaluated before the first and after the last step")
    save_steps: int | None = Field(None, ge=1, description="checkpoint every N steps (and always at the end)")
    save_total_limit: int | None = Field(2, ge=1)
    logprob_chunk_size: int = Field(512, ge=1, description="answer positions per vocabulary projection chunk")
    gradient_checkpointing: bool = Field(
        True, description="recompute decoder-layer activations in backward instead of storing them: ~25% more time, a fraction of the memory"
    )
    reference_cache: bool = Field(
        True,
        description="keep reference log-probs on disk per example, keyed by the reference weights, tokens and precision; "
        "the reference then runs once per example across epochs, runs and sweeps",
    )
    reference_cache_dir: str | None = Field(None, description="default: $PREFTUNE_CACHE/reference-logps")
    report_to: list[Literal["jsonl", "tensorboard"]] = Field(default_factory=lambda: ["jsonl", "tensorboard"])


class MonitoringSettings(_Section):
    negative_margin_alert: float | None = Field(
        None, ge=0.0, le=1.0, description="alert when the validation fraction of pairs with reward margin < 0 exceeds this"
    )


class NotYetAppliedSettings(_Section):
    """Keys of the design template (`preference_training:`) that preftune validates and records, but does not act on yet."""

    synthetic_ratio: float | None = Field(None, ge=0.0, le=1.0)
    human_ratio: float | None = Field(None, ge=0.0, le=1.0)
    kl_divergence_threshold: float | None = Field(None, gt=0.0)


class RunConfig(_Section):
    output_dir: str = "runs/preftune"
    resume_from: str | None = Field(None, description="a checkpoint folder, or 'latest' in output_dir")
    overwrite_output_dir: bool = False
    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    method: MethodSettings = Field(default_factory=MethodSettings)
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    not_yet_applied: NotYetAppliedSettings | None = Field(
        None, description="recorded from the design template, NOT acted on by this version of preftune"
    )

    @model_validator(mode="after")
    def _prompt_fits(self) -> RunConfig:
        if self.data.max_prompt_length is not None and self.data.max_prompt_length >= self.data.max_length:
            raise ValueError("data.max_prompt_length must be smaller than data.max_length to leave room for answers")
        return self


DEFAULT_CONFIG_PATH = Path(__file__).parent / "defaults" / "demo.yaml"


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a YAML config (default: the embedded demo), apply `a.b=value` overrides, validate."""
    source = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        raw = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {source}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (model, data, method, training)")
    overrides = list(overrides)
    # `--set preference_training.x.y=v` edits the design template before it is translated; the rest edit the result.
    template_overrides = [o for o in overrides if o.strip().startswith(f"{TEMPLATE_KEY}.")]
    for override in template_overrides:
        apply_override(raw, override)
    if is_template(raw):
        raw = _translate_template(raw, source=str(source))
    for override in overrides:
        if override not in template_overrides:
            apply_override(raw, override)
    return validate_config(raw, source=str(source))


def _translate_template(raw: dict[str, Any], *, source: str) -> dict[str, Any]:
    translated, notes, warnings = translate_template(raw, source=source)
    logger.warning("%s uses the `%s:` template; translated as:\n  %s", source, TEMPLATE_KEY, "\n  ".join(notes))
    for warning in warnings:
        logger.warning("%s: %s", source, warning)
    return translated


def validate_config(raw: dict[str, Any], *, source: str = "<config>") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"{source}: invalid configuration:\n{format_validation_error(error)}") from None


def format_validation_error(error: ValidationError) -> str:
    lines = []
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "<top level>"
        if problem["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling; `preftune config` prints every key)")
        else:
            lines.append(f"  {key}: {problem['msg']} (got {problem.get('input')!r})")
    return "\n".join(lines)


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a raw config mapping; the value is parsed as YAML (`1e-5`, `true`, `[q_proj]`)."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got '{override}'")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: '{part}' is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
