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
from pydantic import BaseModel, Field, SerializeAsAny, ValidationError, field_validator, model_validator
from pydantic_core import to_jsonable_python

from preftune.control.alerts import AlertSettings
from preftune.config_template import TEMPLATE_KEY, is_template, translate_template
from preftune.errors import ConfigError
from preftune.logprobs.engine import DEFAULT_CHUNK_SIZE
from preftune.methods import METHODS, Method, MethodSettings, get_method
from preftune.methods.cpo import ConstraintSettings
from preftune.settings import Section

logger = logging.getLogger(__name__)


DEFAULT_METHOD = "sigmoid"


class LoraSettings(Section):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])


class ModelSettings(Section):
    name_or_path: str = Field("smollm2-135m", description="embedded model name or a local Hugging Face folder")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="storage dtype of the frozen decoder linears (LoRA only; adapters, optimiser, norms, LM head stay fp32); "
        "auto = bfloat16 with LoRA where the CPU has avx512_bf16/AMX or the GPU supports bf16, else float32; "
        "with load_in_4bit, the dtype the 4-bit layers compute in",
    )
    load_in_4bit: bool = Field(
        False,
        description="QLoRA: the frozen decoder linears in 4-bit NF4 through bitsandbytes (pip install bitsandbytes), "
        "computing in model.dtype (auto: bf16 where supported, else fp32); needs model.lora",
    )
    trust_remote_code: bool = False
    allow_pickle: bool = Field(
        False, description="load pickle weights (pytorch_model.bin) when a folder has no safetensors; unpickling can run code"
    )
    lora: LoraSettings | None = Field(
        default_factory=LoraSettings,
        description="LoRA adapter settings; null = full fine-tune with a frozen reference copy",
    )

    @model_validator(mode="after")
    def _low_precision_needs_lora(self) -> ModelSettings:
        if self.dtype in ("bfloat16", "float16") and self.lora is None:
            raise ValueError(
                f"dtype {self.dtype} with lora: null would train {self.dtype} weights with no fp32 master copy; "
                "use dtype float32 (or auto) for a full fine-tune, with training.mixed_precision: bf16 for bf16 compute"
            )
        if self.load_in_4bit and self.lora is None:
            raise ValueError(
                "load_in_4bit with lora: null: 4-bit weights cannot be trained; set model.lora to train adapters on the 4-bit base"
            )
        return self


class SourceSpec(Section):
    """One training file of a human/synthetic mix (`data.sources`); see preftune/data/mixing.py."""

    path: str = Field(description="a JSONL/JSON/Parquet file of pairs, or an embedded dataset 'name:split'")
    source: Literal["human", "synthetic"] = Field(description="provenance: written/labelled by people, or generated")
    weight: float = Field(1.0, gt=0.0, le=1.0, description="fraction of this file to use (seeded subsample); 1 = all of it")


class DataSettings(Section):
    train_file: str | None = Field(
        "hh-rlhf-harmless:train", description="a JSONL/JSON/Parquet file, or an embedded dataset 'name:split'; null with data.sources"
    )
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
    # Evidence about the data (preftune/data/audit.py, preftune/data/mixing.py, docs/EVIDENCE.md).
    length_balance: bool = Field(
        False, description="subsample training pairs so the chosen answer is longer exactly as often as it is shorter"
    )
    sources: list[SourceSpec] | None = Field(
        None, description="training files tagged human/synthetic, mixed in place of train_file (validation_file or split as usual)"
    )
    human_ratio: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="floor on the human share of the training pairs (data.sources, or the records' own provenance); "
        "synthetic pairs are subsampled to meet it. On records without provenance: not applied, with a warning",
    )
    kl_divergence_threshold: float = Field(
        0.15, gt=0.0, description="warn when KL(synthetic ‖ human) of the per-pair length difference exceeds this"
    )
    filter_synthetic_outliers: bool = Field(
        False, description="drop synthetic pairs whose length difference is outside the human 5th–95th percentile range"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_default_train_file_with_sources(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("sources") is not None and "train_file" not in data:
            return {**data, "train_file": None}
        return data

    @model_validator(mode="after")
    def _sources_replace_train_file(self) -> DataSettings:
        if self.sources is not None:
            if not self.sources:
                raise ValueError("data.sources needs at least one {path, source: human|synthetic, weight} entry")
            if self.train_file is not None:
                raise ValueError("give either data.train_file or data.sources (the sources are the training files), not both")
        elif self.train_file is None:
            raise ValueError("data.train_file is required unless data.sources lists the training files")
        # human_ratio / filter_synthetic_outliers with a train_file act on the provenance its records carry;
        # on records without one they are a no-op the run's data summary warns about (preftune/data/pipeline.py).
        return self


class TrainingSettings(Section):
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
    save_steps: int | None = Field(
        500, ge=1, description="checkpoint every N steps (and always at the end, and on Ctrl-C / SIGTERM); null = only then"
    )
    max_consecutive_nonfinite_steps: int = Field(
        3, ge=0, description="steps in a row whose loss or gradient is NaN/inf that are skipped (counted, alerted) before the run stops"
    )
    save_total_limit: int | None = Field(2, ge=1)
    logprob_chunk_size: int = Field(DEFAULT_CHUNK_SIZE, ge=1, description="answer positions per vocabulary projection chunk")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto",
        description="recompute decoder-layer activations in backward instead of storing them (~25% more time, a fraction "
        "of the memory); auto = only when the estimated activations of the largest micro-batch exceed memory_budget_gb",
    )
    memory_budget_gb: float | None = Field(
        None, gt=0.0, description="activation memory gradient_checkpointing: auto may use; default half the available RAM (GPU: free memory)"
    )
    fsdp: bool | Literal["auto"] = Field(
        "auto",
        description="shard the policy (and a full fine-tune's frozen reference) over the processes with PyTorch FSDP2: "
        "parameters, gradients and optimiser state split per decoder layer + the rest; auto = when the launcher asks for it "
        "(accelerate launch with an FSDP config); true = whenever there is more than one process (torchrun too); "
        "false = never (every process holds the whole model). docs/DISTRIBUTED.md",
    )
    reference_cache: bool = Field(
        True,
        description="keep reference log-probs on disk per example, keyed by the reference weights, tokens and precision; "
        "the reference then runs once per example across epochs, runs and sweeps",
    )
    reference_cache_dir: str | None = Field(None, description="default: $PREFTUNE_CACHE/reference-logps")
    report_to: list[Literal["jsonl", "tensorboard"]] = Field(default_factory=lambda: ["jsonl", "tensorboard"])


class MonitoringSettings(AlertSettings):
    """The alert rules run during training (preftune/control/alerts.py) and their thresholds."""

    alerts: bool = Field(True, description="run the alert rules after every evaluation; alerts go to alerts.jsonl")


class ProbeSettings(Section):
    """Probes scored under the reference and the trained policy at the end of training (probes.json, in the report)."""

    file: str | None = Field(
        None, description="a JSONL of probes {prompt, chosen (safe), rejected (unsafe), id?, split?}; null = the shipped harmlessness probes"
    )
    max_length: int = Field(512, ge=8, description="prompt + answer tokens per probe sequence")
    generations: int = Field(
        4, ge=0, description="held-out probe prompts answered greedily before (reference) and after (trained), shown side by side; 0 = off"
    )
    max_new_tokens: int = Field(64, ge=1, description="the most tokens of each before/after answer")


class RunConfig(Section):
    output_dir: str = "runs/preftune"
    resume_from: str | None = Field(None, description="a checkpoint folder, or 'latest' in output_dir")
    overwrite_output_dir: bool = False
    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    method: SerializeAsAny[MethodSettings] = Field(
        default_factory=lambda: METHODS[DEFAULT_METHOD].default_settings(),
        description="loss_type picks the method; its own keys are validated by that method's schema "
        "(`preftune config --method NAME` lists them)",
    )
    training: TrainingSettings = Field(default_factory=TrainingSettings)
    monitoring: MonitoringSettings = Field(default_factory=MonitoringSettings)
    probes: ProbeSettings | None = Field(None, description="score probes before/after training; null = off")

    @field_validator("method", mode="before")
    @classmethod
    def _method_schema(cls, value: Any) -> Any:
        return validate_method_settings(value) if isinstance(value, dict) else value

    @property
    def method_spec(self) -> Method:
        return get_method(self.method.loss_type)

    @model_validator(mode="after")
    def _prompt_fits(self) -> RunConfig:
        if self.data.max_prompt_length is not None and self.data.max_prompt_length >= self.data.max_length:
            raise ValueError("data.max_prompt_length must be smaller than data.max_length to leave room for answers")
        return self

    @model_validator(mode="after")
    def _four_bit_trains_a_causal_lm(self) -> RunConfig:
        if self.model.load_in_4bit and self.method_spec.model_kind != "causal_lm":
            raise ValueError(
                f"model.load_in_4bit: loss_type {self.method.loss_type} trains a {self.method_spec.model_kind}, "
                "which preftune keeps in fp32; 4-bit weights are for the policy's causal LM"
            )
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
    schemas = {
        "model": ModelSettings,
        "training": TrainingSettings,
        "data": DataSettings,
        "method.constraints": ConstraintSettings,
    }
    translated, notes, warnings = translate_template(raw, source=source, schemas=schemas)
    logger.warning("%s uses the `%s:` template; translated as:\n  %s", source, TEMPLATE_KEY, "\n  ".join(notes))
    for warning in warnings:
        logger.warning("%s: %s", source, warning)
    return translated


def validate_method_settings(raw: dict[str, Any]) -> MethodSettings:
    """Validate a `method:` mapping with the schema of the method its `loss_type` names."""
    loss_type = raw.get("loss_type", DEFAULT_METHOD)
    method = get_method(loss_type) if isinstance(loss_type, str) else get_method(DEFAULT_METHOD)
    return method.settings.model_validate({**raw, "loss_type": loss_type})


def validate_config(raw: dict[str, Any], *, source: str = "<config>") -> RunConfig:
    """Validate everything at once: one error lists every problem, the method's keys checked by its own schema."""
    raw = dict(raw)
    problems: list[str] = []
    method_raw = raw.get("method")
    if isinstance(method_raw, dict):
        try:
            raw["method"] = validate_method_settings(method_raw)
        except ConfigError as error:
            problems.append(f"  method.loss_type: {error}")
            raw.pop("method")
        except ValidationError as error:
            loss_type = method_raw.get("loss_type", DEFAULT_METHOD)
            problems.append(format_validation_error(error, prefix="method", method=str(loss_type)))
            raw.pop("method")
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as error:
        problems.append(format_validation_error(error))
    if problems:
        raise ConfigError(f"{source}: invalid configuration:\n" + "\n".join(problems)) from None
    return config


# Top-level keys people write without their section, and where they belong.
def _section_of(key: str) -> str | None:
    for section, field in RunConfig.model_fields.items():
        annotation = field.annotation
        fields = getattr(annotation, "model_fields", None)
        if isinstance(fields, dict) and key in fields:
            return section
    for method in METHODS.values():
        if key in method.settings.model_fields:
            return "method"
    return None


def format_validation_error(error: ValidationError, *, prefix: str = "", method: str | None = None) -> str:
    lines = []
    for problem in error.errors():
        parts = [str(part) for part in problem["loc"]]
        key = ".".join([prefix, *parts] if prefix else parts) or "<top level>"
        if problem["type"] == "extra_forbidden":
            hint = "check the spelling; `preftune config` prints every key"
            if method is not None:
                hint = f"not a setting of loss_type {method}; `preftune config --method {method}` lists them"
            elif len(parts) == 1 and (section := _section_of(parts[0])) is not None:
                hint = f"did you mean {section}.{parts[0]}? (it belongs in the `{section}:` section)"
            lines.append(f"  {key}: unknown key ({hint})")
        else:
            lines.append(f"  {key}: {problem['msg']} (got {problem.get('input')!r})")
    return "\n".join(lines)


def describe_defaults(method_name: str = DEFAULT_METHOD) -> str:
    """The library defaults for one method as commented YAML: every key, its default and what it does."""
    method = get_method(method_name)
    config = RunConfig(method=method.default_settings())
    lines = [f"# preftune library defaults with method.loss_type: {method.name} ({method.summary})"]
    _describe(config, lines, indent=0)
    return "\n".join(lines) + "\n"


def _describe(section: BaseModel, lines: list[str], *, indent: int) -> None:
    pad = "  " * indent
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        comment = f"  # {field.description}" if field.description else ""
        if isinstance(value, BaseModel):  # a section, or a nested settings model (e.g. GRPO's generation)
            lines.append(f"{pad}{name}:{comment}")
            _describe(value, lines, indent=indent + 1)
        else:
            rendered = yaml.safe_dump(to_jsonable_python(value), default_flow_style=True).strip().removesuffix("...").strip()
            lines.append(f"{pad}{name}: {rendered}{comment}")


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
    node[parts[-1]] = _override_value(key.strip(), value)


def _override_value(key: str, value: str) -> Any:
    """Parse a `--set` value as YAML with `yaml.safe_load`: tags such as `!!python/object` are refused, not run."""
    try:
        return yaml.safe_load(value)
    except yaml.constructor.ConstructorError:
        raise ConfigError(
            f"--set {key}={value}: YAML tags that build objects (such as !!python/...) are not allowed; give a plain "
            "value (a number, true/false, a string, a [list] or a {mapping})"
        ) from None
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(
            f"--set {key}={value}: not a valid YAML value ({problem}); quote a string that starts with [ {{ ! & * or %, "
            "e.g. --set 'KEY=\"[text\"'"
        ) from None


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
