"""Settings that validate but are almost certainly a mistake: warnings, not errors.

`config_warnings(config)` returns one sentence per suspicious setting, saying what it is, what it
usually does and what to try. The trainer prints each once at the start of training and records
them as `warnings` in run.json. The thresholds are deliberately far from ordinary values, so a
warning means "look again", not "unusual":

    learning_rate ≥ 1e-2 with a full fine-tune, ≥ 1e-1 with LoRA      (typical: 1e-6..1e-5 / 1e-5..5e-4)
    max_grad_norm null with learning_rate ≥ 1e-4 full, ≥ 1e-3 LoRA    (one bad batch moves the weights unbounded)
    method.beta ≥ 100 or ≤ 1e-4                                         (typical: 0.01..1)
    CPO constraints.lagrangian_lr ≥ 1                                   (typical: 1e-3..1e-1)
    CPO soft mode, constraint_slack ≥ τ / 2 (τ > 0)                     (λ can stay 0 while every pair is below τ)
    CPO lambda_step_clip ≥ lambda_max (or ≥ anchor_max with the anchor) (one dual step saturates the multiplier)

Why the multiplier's rate is not compared with training.learning_rate directly: the two numbers
have different units (docs/CPO.md, "The multiplier's rate and the policy's").
"""

from __future__ import annotations

from preftune.config import RunConfig

EXTREME_LR_FULL = 1e-2
EXTREME_LR_LORA = 1e-1
HIGH_LR_FULL = 1e-4
HIGH_LR_LORA = 1e-3
EXTREME_BETA_HIGH = 100.0
EXTREME_BETA_LOW = 1e-4
EXTREME_LAGRANGIAN_LR = 1.0
# The mean hinge is τ when every pair sits at the reference's margin (m = 0, as at step 0).
SLACK_SHARE_OF_THRESHOLD = 0.5


def config_warnings(config: RunConfig) -> list[str]:
    """One warning sentence per setting that is very likely a mistake (thresholds in the module docstring)."""
    warnings: list[str] = []
    training = config.training
    lora = config.model.lora is not None
    kind = "LoRA" if lora else "a full fine-tune"
    lr = training.learning_rate
    if lr >= (EXTREME_LR_LORA if lora else EXTREME_LR_FULL):
        typical = "1e-5 to 5e-4" if lora else "1e-6 to 1e-5"
        warnings.append(
            f"training.learning_rate {lr:g} is extreme for {kind} (typical {typical}): expect diverging losses, "
            "non-finite gradients (those steps are skipped) or a destroyed model"
        )
    if training.max_grad_norm is None and lr >= (HIGH_LR_LORA if lora else HIGH_LR_FULL):
        warnings.append(
            f"training.max_grad_norm is null with learning_rate {lr:g} ({kind}): no gradient clipping, so one bad "
            "batch can move the weights without bound; set max_grad_norm: 1.0"
        )
    beta = getattr(config.method, "beta", None)
    if beta is not None and beta >= EXTREME_BETA_HIGH:
        warnings.append(
            f"method.beta {beta:g} is extreme (typical 0.01 to 1): the loss scales with beta × the log-ratio margin, "
            "so losses in the thousands and saturated gradients are likely"
        )
    elif beta is not None and beta <= EXTREME_BETA_LOW:
        warnings.append(
            f"method.beta {beta:g} is tiny (typical 0.01 to 1): the preference term barely moves the policy and "
            "nothing keeps it near the reference"
        )
    constraints = getattr(config.method, "constraints", None)
    lagrangian_lr = getattr(constraints, "lagrangian_lr", None)
    if lagrangian_lr is not None and lagrangian_lr >= EXTREME_LAGRANGIAN_LR:
        warnings.append(
            f"method.constraints.lagrangian_lr {lagrangian_lr:g} is extreme (typical 1e-3 to 1e-1): the multiplier "
            "will oscillate instead of settling"
        )
    if constraints is not None and hasattr(constraints, "constraint_slack"):
        warnings += _constraint_warnings(constraints)
    return warnings


def _constraint_warnings(constraints) -> list[str]:
    warnings = []
    threshold, slack = constraints.threshold, constraints.constraint_slack
    if constraints.mode == "soft" and threshold > 0 and slack >= SLACK_SHARE_OF_THRESHOLD * threshold:
        warnings.append(
            f"method.constraints.constraint_slack {slack:g} is at least half of τ = {threshold:g} in soft mode: λ rises only "
            f"when the mean hinge relu(τ − margin) exceeds the slack, and a pair at the reference's margin has hinge τ, so λ can "
            f"stay 0 while most pairs are below τ (the run is then plain DPO); lower constraint_slack (e.g. {0.1 * threshold:g} "
            "= τ/10) or use mode: hard"
        )
    clip = constraints.lambda_step_clip
    for key, maximum in (("lambda_max", constraints.lambda_max), ("anchor_max", constraints.anchor_max if constraints.chosen_anchor else None)):
        if maximum is not None and clip >= maximum:
            warnings.append(
                f"method.constraints.lambda_step_clip {clip:g} ≥ {key} {maximum:g}: one dual step can take the multiplier "
                "from 0 to its maximum, so it switches on and off between steps faster than the policy can follow; "
                f"keep lambda_step_clip well below {key} (default 0.1 vs 10)"
            )
    return warnings
