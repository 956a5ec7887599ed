"""LoRA through peft: the policy trains small adapters; the base weights stay frozen and double as the reference."""

from __future__ import annotations

from peft import LoraConfig, PeftModel, get_peft_model
from transformers import PreTrainedModel

from preftune.errors import ConfigError


def apply_lora(model: PreTrainedModel, *, r: int, alpha: int, dropout: float, target_modules: list[str]) -> PeftModel:
    module_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(target_modules) - module_names)
    if missing:
        raise ConfigError(
            f"model.lora.target_modules: {missing} not found in {type(model).__name__}; "
            f"linear layers it has include {sorted(n for n in module_names if n.endswith('proj'))}"
        )
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def is_lora(model) -> bool:
    return isinstance(model, PeftModel)
