"""The design's `preference_training:` template, translated into preftune's own config sections.

A file whose top level holds `preference_training:` is rewritten into `model` / `data` / `method` /
`training` / `monitoring` before validation; `load_config` logs what went where.
Every template key is checked here; every problem of a file is reported in one `ConfigError`
(not one per run), naming each key, so a typo cannot be dropped silently. Keys of preftune's own sections may also be used inside the template
section they belong to (e.g. `data.train_file`, `optimization.max_steps`, `constraints.mode`).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from preftune.errors import ConfigError
from preftune.methods import ALIASES
from preftune.methods.cpo import METHOD as CONSTRAINED

CONSTRAINED_METHOD = CONSTRAINED.name

TEMPLATE_KEY = "preference_training"

# template section -> {template key -> preftune key path}
RENAMES: dict[str, dict[str, str]] = {
    "model": {"base_model": "model.name_or_path", "policy_path": "model.name_or_path"},
    "optimization": {
        "method": "method.loss_type",
        "learning_rate": "training.learning_rate",
        "policy_lr": "training.learning_rate",
        "policy_weight_decay": "training.weight_decay",
        "gradient_clip_norm": "training.max_grad_norm",
        "lagrangian_lr": "method.constraints.lagrangian_lr",
        "margin_threshold": "method.constraints.margin_threshold",
        "batch_size": "training.per_device_train_batch_size",
        "gradient_accumulation_steps": "training.gradient_accumulation_steps",
        "num_epochs": "training.num_train_epochs",
        "warmup_ratio": "training.warmup_ratio",
        "beta": "method.beta",
        "label_smoothing": "method.label_smoothing",
    },
    "constraints": {
        "normalize_by_length": "method.constraints.length_normalize",
        "violation_alert_threshold": "method.constraints.violation_alert",
    },
    "monitoring": {
        "eval_steps": "training.eval_steps",
        "evaluation_interval_steps": "training.eval_steps",
        "validation_size": "data.max_validation_samples",
        "alert_negative_margin_ratio": "monitoring.alert_negative_margin_ratio",
        "alert_constraint_violation": "method.constraints.violation_alert",
        "alert_patience": "method.constraints.patience",
    },
    "data": {"max_sequence_length": "data.max_length"},
}
# `data.human_ratio` and `data.kl_divergence_threshold` pass through to preftune's data section under
# their own names. `data.synthetic_ratio` is the same fact seen from the other side: human_ratio = 1 − it.
SYNTHETIC_RATIO = "synthetic_ratio"
RATIO_TOLERANCE = 1e-9
# Template sections that also take the keys of a preftune section under their own names.
PASS_THROUGH = {"model": "model", "optimization": "training", "data": "data", "constraints": "method.constraints"}
# Keys about the reference model: preftune builds it itself (LoRA: adapters disabled; full fine-tune: a frozen copy).
REFERENCE_KEYS = ("reference_model", "reference_path", "freeze_reference")
# Keys that switch on what preftune always does.
ALWAYS_ON = {"monitoring": ("track_preference_accuracy", "track_margin_distribution")}
PREFERENCE_SOURCES = ("human", "synthetic", "mixed_human_synthetic")


def is_template(raw: dict[str, Any]) -> bool:
    return TEMPLATE_KEY in raw


def translate_template(
    raw: dict[str, Any], *, source: str, schemas: dict[str, type[BaseModel]]
) -> tuple[dict[str, Any], list[str], list[str]]:
    """Turn `{preference_training: {...}, ...}` into preftune's raw config mapping.

    Returns (mapping, notes, warnings): one note per translated key ("template key → preftune key"),
    and a warning per key that is accepted but not acted on. Other top-level keys of the file
    (`output_dir`, `resume_from`, ...) are kept; one set both ways is an error. `schemas` maps the
    PASS_THROUGH targets ("model", "training", "data", "method.constraints") to their settings classes.
    """
    template = raw[TEMPLATE_KEY]
    where = f"{source}: {TEMPLATE_KEY}"
    if not isinstance(template, dict):
        raise ConfigError(f"{where}: must be a mapping of sections ({', '.join(_SECTIONS)})")
    translated: dict[str, Any] = {}
    notes: list[str] = []
    warnings: list[str] = []

    problems: list[str] = []

    def put(path: str, value: Any, origin: str) -> None:
        try:
            _set_path(translated, path, value, origin=f"{where}.{origin}")
        except ConfigError as error:
            problems.append(str(error))
            return
        notes.append(f"{TEMPLATE_KEY}.{origin} → {path} = {json.dumps(value, default=str)}")

    constrained = _method_is_constrained(template)
    for section, values in template.items():
        if section not in _SECTIONS:
            problems.append(f"{where}.{section}: unknown section; the template has: {', '.join(_SECTIONS)}")
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            problems.append(f"{where}.{section}: must be a mapping, got {values!r}")
            continue
        for key, value in values.items():
            origin = f"{section}.{key}"
            here = f"{where}.{origin}"
            if section == "model" and key in REFERENCE_KEYS:
                problem = _check_reference(key, value, here, policy=values.get("policy_path", values.get("base_model")))
                if problem:
                    problems.append(problem)
                else:
                    notes.append(f"{TEMPLATE_KEY}.{origin} = {json.dumps(value, default=str)}: as built in (the reference is the frozen base model)")
            elif key in ALWAYS_ON.get(section, ()):
                notes.append(f"{TEMPLATE_KEY}.{origin} = {json.dumps(value)}: always on (every evaluation is kept per example in evaluations/)")
            elif section == "monitoring" and key == "divergence_alert":
                if isinstance(value, bool):
                    put("monitoring.alerts", value, origin)
                else:
                    problems.append(f"{here}: expected true or false, got {value!r}")
            elif section == "constraints" and key == "enforce_positive_margin":
                if not isinstance(value, bool):
                    problems.append(f"{here}: expected true or false, got {value!r}")
                elif value:
                    notes.append(f"{TEMPLATE_KEY}.{origin} = true → method.loss_type = cpo (constrained DPO)")
            elif section == "constraints" and key == "multiplier_clamp_min":
                if value != 0:
                    problems.append(f"{here}: {value!r}: the Lagrange multiplier is always clamped at 0 (λ ≥ 0); set 0.0")
                else:
                    notes.append(f"{TEMPLATE_KEY}.{origin} = 0.0: as built in (λ is clamped at 0)")
            elif section == "data" and key == "preference_source":
                if value not in PREFERENCE_SOURCES:
                    problems.append(f"{here}: {value!r} is not one of {', '.join(PREFERENCE_SOURCES)}")
                else:
                    notes.append(
                        f"{TEMPLATE_KEY}.{origin} = {value!r}: the template names no data files; give them as "
                        "data.train_file (and data.validation_file), or for a human/synthetic mix as "
                        "data.sources: [{path: human.jsonl, source: human}, {path: synthetic.jsonl, source: synthetic}]"
                    )
            elif section == "data" and key == SYNTHETIC_RATIO:
                problem = _synthetic_ratio(value, values.get("human_ratio"), here)
                if problem:
                    problems.append(problem)
                elif "human_ratio" in values:
                    notes.append(f"{TEMPLATE_KEY}.{origin} = {value!r}: consistent with human_ratio = 1 − synthetic_ratio")
                else:
                    put("data.human_ratio", round(1.0 - value, 12), origin)
            elif (section == "constraints" or RENAMES.get(section, {}).get(key, "").startswith("method.constraints")) and not constrained:
                warnings.append(
                    f"{TEMPLATE_KEY}.{origin} ignored: constraints apply only to optimization.method cpo (constrained DPO)"
                )
            elif key in RENAMES.get(section, {}):
                put(RENAMES[section][key], value, origin)
            elif key in _pass_through_keys(section, schemas):
                put(f"{PASS_THROUGH[section]}.{key}", value, origin)
            else:
                special = {
                    "model": REFERENCE_KEYS, "constraints": ("enforce_positive_margin", "multiplier_clamp_min"),
                    "monitoring": (*ALWAYS_ON["monitoring"], "divergence_alert"), "data": ("preference_source", SYNTHETIC_RATIO),
                }.get(section, ())
                known = sorted({*RENAMES.get(section, {}), *special, *_pass_through_keys(section, schemas)})
                problems.append(f"{here}: unknown key; {section} takes: {', '.join(known)}")
    if _enforces_margin(template) and "loss_type" not in translated.get("method", {}):
        translated.setdefault("method", {})["loss_type"] = CONSTRAINED_METHOD
    elif _enforces_margin(template) and not constrained:
        problems.append(f"{where}.constraints.enforce_positive_margin: true asks for constrained DPO, but optimization.method is "
                        f"{translated['method']['loss_type']!r}: set it to cpo or remove it")
    if "human_ratio" in translated.get("data", {}) and not _names_sources(template, raw):
        warnings.append(
            f"data.human_ratio {translated['data']['human_ratio']!r} is a floor on the human share: it acts on data.sources "
            "(files tagged source: human|synthetic) or on records that carry provenance: human|synthetic; on records "
            "without provenance it is not applied, and the run's data summary says so"
        )
    if not _names_data(template, raw):
        notes.append(
            "the template names no data file: training on the embedded hh-rlhf-harmless pairs; set data.train_file "
            "(e.g. --set data.train_file=pairs.jsonl) to train on yours"
        )
    if problems:
        raise ConfigError(f"{source}: the {TEMPLATE_KEY} template has {len(problems)} problem(s):\n  " + "\n  ".join(problems))

    for key, value in raw.items():
        if key != TEMPLATE_KEY:
            _merge(translated, key, value, origin=f"{source}: {key}")
    return translated, notes, warnings


_SECTIONS = ("model", "optimization", "constraints", "monitoring", "data")


def _pass_through_keys(section: str, schemas: dict[str, type[BaseModel]]) -> list[str]:
    target = PASS_THROUGH.get(section)
    if target is None:
        return []
    return list(schemas[target].model_fields)


def _enforces_margin(template: dict[str, Any]) -> bool:
    constraints = template.get("constraints") or {}
    return isinstance(constraints, dict) and constraints.get("enforce_positive_margin") is True


def _method_is_constrained(template: dict[str, Any]) -> bool:
    optimization = template.get("optimization") or {}
    if not isinstance(optimization, dict):
        return False
    default = CONSTRAINED_METHOD if _enforces_margin(template) else "sigmoid"
    loss_type = optimization.get("method", default)
    return isinstance(loss_type, str) and ALIASES.get(loss_type, loss_type) == CONSTRAINED_METHOD


def _names_data(template: dict[str, Any], raw: dict[str, Any]) -> bool:
    sections = [template.get("data"), raw.get("data")]
    return any(isinstance(s, dict) and ("train_file" in s or "sources" in s) for s in sections)


def _synthetic_ratio(value: Any, human_ratio: Any, where: str) -> str | None:
    """The problem with `data.synthetic_ratio`, or None: a share in [0, 1] that, beside human_ratio, adds up to 1 with it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        return f"{where}: {value!r}: expected the synthetic share of the data, a number from 0 to 1"
    if isinstance(human_ratio, (int, float)) and not isinstance(human_ratio, bool) and abs(value + human_ratio - 1.0) > RATIO_TOLERANCE:
        return (
            f"{where}: {value!r} and human_ratio {human_ratio!r} do not add up to 1: human_ratio = 1 − synthetic_ratio; "
            "keep one of them"
        )
    return None


def _names_sources(template: dict[str, Any], raw: dict[str, Any]) -> bool:
    sections = [template.get("data"), raw.get("data")]
    return any(isinstance(s, dict) and "sources" in s for s in sections)


def _check_reference(key: str, value: Any, where: str, *, policy: Any) -> str | None:
    """The problem with a reference key, or None: preftune's reference is the policy's own initial weights."""
    if key == "reference_model" and value is not None:
        return (
            f"{where}: {value!r}: preftune takes the reference from the base model itself (with LoRA: the same "
            "model with its adapters disabled; with a full fine-tune: a frozen copy). A separate reference model "
            "is not supported: set reference_model: null"
        )
    if key == "reference_path" and value != policy:
        return (
            f"{where}: {value!r} differs from the policy {policy!r}: the reference must match the policy's "
            "initialisation, and preftune builds it from the policy itself; set reference_path to the policy_path"
        )
    if key == "freeze_reference" and value is not True:
        return f"{where}: {value!r}: the reference model is always frozen in preftune; set freeze_reference: true"
    return None


def _set_path(mapping: dict[str, Any], path: str, value: Any, *, origin: str) -> None:
    *parents, leaf = path.split(".")
    node = mapping
    for part in parents:
        node = node.setdefault(part, {})
    if leaf in node:
        raise ConfigError(f"{origin}: sets {path}, which another template key already set; keep one of them")
    node[leaf] = value


def _merge(mapping: dict[str, Any], key: str, value: Any, *, origin: str) -> None:
    """Merge a top-level section written next to the template; the same key set both ways is an error."""
    if key not in mapping:
        mapping[key] = value
        return
    if not (isinstance(mapping[key], dict) and isinstance(value, dict)):
        raise ConfigError(f"{origin}: also set by the {TEMPLATE_KEY} template; keep one of them")
    for child, child_value in value.items():
        _merge(mapping[key], child, child_value, origin=f"{origin}.{child}")
