"""The design's `preference_training:` template, translated into preftune's own config sections.

A file whose top level holds `preference_training:` is rewritten into `model` / `data` / `method` /
`training` / `monitoring` / `not_yet_applied` before validation; `load_config` logs what went where.
Every template key is checked here and an unknown one is a `ConfigError` naming it, so a typo
cannot be dropped silently. Keys of preftune's own sections may also be used inside the template
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
    "model": {"base_model": "model.name_or_path"},
    "optimization": {
        "method": "method.loss_type",
        "learning_rate": "training.learning_rate",
        "batch_size": "training.per_device_train_batch_size",
        "gradient_accumulation_steps": "training.gradient_accumulation_steps",
        "num_epochs": "training.num_train_epochs",
        "warmup_ratio": "training.warmup_ratio",
        "beta": "method.beta",
        "label_smoothing": "method.label_smoothing",
    },
    "monitoring": {
        "eval_steps": "training.eval_steps",
        "validation_size": "data.max_validation_samples",
        "alert_negative_margin_ratio": "monitoring.negative_margin_alert",
        "alert_constraint_violation": "method.constraints.violation_alert",
        "alert_patience": "method.constraints.patience",
    },
    "data": {"max_sequence_length": "data.max_length"},
}
# Template keys preftune validates and records under `not_yet_applied`, but does not act on.
NOT_YET_APPLIED = {"data": ("synthetic_ratio", "human_ratio", "kl_divergence_threshold")}
# Template sections that also take the keys of a preftune section under their own names.
PASS_THROUGH = {"model": "model", "optimization": "training", "data": "data", "constraints": "method.constraints"}
# Keys about the reference model: preftune builds it itself (LoRA: adapters disabled; full fine-tune: a frozen copy).
REFERENCE_KEYS = ("reference_model", "freeze_reference")


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

    def put(path: str, value: Any, origin: str) -> None:
        _set_path(translated, path, value, origin=f"{where}.{origin}")
        notes.append(f"{TEMPLATE_KEY}.{origin} → {path} = {json.dumps(value, default=str)}")

    constrained = _method_is_constrained(template)
    for section, values in template.items():
        if section not in _SECTIONS:
            raise ConfigError(f"{where}.{section}: unknown section; the template has: {', '.join(_SECTIONS)}")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{where}.{section}: must be a mapping, got {values!r}")
        for key, value in values.items():
            origin = f"{section}.{key}"
            if section == "model" and key in REFERENCE_KEYS:
                _check_reference(key, value, f"{where}.{origin}")
                notes.append(f"{TEMPLATE_KEY}.{origin} = {json.dumps(value, default=str)}: as built in (the reference is the frozen base model)")
            elif key in NOT_YET_APPLIED.get(section, ()):
                _set_path(translated, f"not_yet_applied.{key}", value, origin=f"{where}.{origin}")
                warnings.append(
                    f"{TEMPLATE_KEY}.{origin} = {value!r} is recorded under not_yet_applied.{key} but NOT applied: "
                    "this version of preftune does not mix synthetic/human data or enforce a KL threshold"
                )
            elif (section == "constraints" or RENAMES[section].get(key, "").startswith("method.constraints")) and not constrained:
                warnings.append(
                    f"{TEMPLATE_KEY}.{origin} ignored: constraints apply only to optimization.method cpo (constrained DPO)"
                )
            elif key in RENAMES.get(section, {}):
                put(RENAMES[section][key], value, origin)
            elif key in _pass_through_keys(section, schemas):
                put(f"{PASS_THROUGH[section]}.{key}", value, origin)
            else:
                known = sorted({*RENAMES.get(section, {}), *NOT_YET_APPLIED.get(section, ()), *_pass_through_keys(section, schemas)})
                if section == "model":
                    known += list(REFERENCE_KEYS)
                raise ConfigError(f"{where}.{origin}: unknown key; {section} takes: {', '.join(known)}")

    for key, value in raw.items():
        if key != TEMPLATE_KEY:
            _merge(translated, key, value, origin=f"{source}: {key}")
    return translated, notes, warnings


_SECTIONS = ("model", "optimization", "constraints", "monitoring", "data")


def _pass_through_keys(section: str, schemas: dict[str, type[BaseModel]]) -> list[str]:
    target = PASS_THROUGH.get(section)
    if target is None:
        return []
    model = schemas[target]
    renamed_targets = {path.rsplit(".", 1)[-1] for path in RENAMES.get(section, {}).values()}
    # A key with a template name is only accepted under that name (e.g. max_sequence_length, not max_length).
    return [name for name in model.model_fields if name not in renamed_targets]


def _method_is_constrained(template: dict[str, Any]) -> bool:
    optimization = template.get("optimization") or {}
    loss_type = optimization.get("method", "sigmoid") if isinstance(optimization, dict) else None
    return isinstance(loss_type, str) and ALIASES.get(loss_type, loss_type) == CONSTRAINED_METHOD


def _check_reference(key: str, value: Any, where: str) -> None:
    if key == "reference_model" and value is not None:
        raise ConfigError(
            f"{where}: {value!r}: preftune takes the reference from the base model itself (with LoRA: the same "
            "model with its adapters disabled; with a full fine-tune: a frozen copy). A separate reference model "
            "is not supported: set reference_model: null"
        )
    if key == "freeze_reference" and value is not True:
        raise ConfigError(f"{where}: {value!r}: the reference model is always frozen in preftune; set freeze_reference: true")


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
