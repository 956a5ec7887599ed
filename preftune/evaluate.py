"""`preftune eval`: preference accuracy, margins and negative-margin fractions of ANY local model on any
preference file, written as a run folder with its report — one command for side-by-side comparisons.

The model may be a merged folder (a preftune `final/merged`, a TRL output, any causal LM), a LoRA
adapter folder (`final/adapter`), or an embedded name. The reference is, in order: `--reference DIR`;
the adapter-disabled view of an adapter; none. With a reference the margins are DPO's implicit
rewards β·[(log π(c) − log πref(c)) − (log π(r) − log πref(r))] (method `sigmoid`); without one, the
per-token log-prob margin mean log π(c) − mean log π(r) (method `sft`'s reward): a model ranked on
its own likelihoods.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape

from preftune import runfolder
from preftune.config import validate_config
from preftune.data.pipeline import prepare_examples
from preftune.eval.html_report import ReportPaths, build_report
from preftune.eval.probes import load_trained_model, model_logps
from preftune.methods.evaluation import evaluate_examples, summarize_evaluation
from preftune.model.loading import load_model, load_tokenizer
from preftune.model.lora import is_lora
from preftune.model.reference import ReferenceModel
from preftune.train import run_dir as run_folder
from preftune.train.metrics_log import MetricsLog


def evaluate_model(
    model_path: str,
    *,
    data: str,
    output_dir: str,
    reference: str | None = None,
    beta: float = 0.1,
    data_format: str = "auto",
    max_length: int = 512,
    max_samples: int | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    console: Console | None = None,
) -> ReportPaths:
    console = console or Console(stderr=True)
    model, tokenizer_source = load_trained_model(model_path)
    tokenizer = load_tokenizer(tokenizer_source)
    reference_model = load_model(reference) if reference else None
    has_reference = reference_model is not None or is_lora(model)
    method = {"loss_type": "sigmoid", "beta": beta} if has_reference else {"loss_type": "sft"}
    config = validate_config(
        {
            "output_dir": output_dir,
            "overwrite_output_dir": overwrite,
            "model": {"name_or_path": tokenizer_source, "lora": None},
            "data": {
                "train_file": data, "validation_file": data, "format": data_format, "max_length": max_length,
                "max_train_samples": 1, "max_validation_samples": max_samples,
            },
            "method": method,
            "training": {"report_to": ["jsonl"], "per_device_eval_batch_size": batch_size},
        },
        source="preftune eval",
    )
    run_dir = Path(output_dir)
    run_folder.claim(run_dir, config, resuming=False)
    prepared = prepare_examples(config.data, tokenizer, seed=config.training.seed, paired=True)
    identity = {**run_folder.run_identity(config, prepared.train, prepared.validation), "evaluated_model": model_path}
    if reference:
        identity["reference_model"] = reference
    run_folder.write_start(run_dir, config, identity, prepared.summary(), prepared.evidence())
    console.print(escape(prepared.summary()))

    spec = config.method_spec
    if reference_model is not None:
        reference_logps = model_logps(reference_model)
    elif is_lora(model):
        reference_logps = ReferenceModel(model, chunk_size=config.training.logprob_chunk_size).logps
    else:
        reference_logps = None
    device = next(model.parameters()).device
    rows = evaluate_examples(
        prepared.validation,
        loss=spec.build_loss(config.method),
        loss_inputs={},
        layout=spec.layout,
        policy_logps=model_logps(model),
        reference_logps=reference_logps,
        batch_size=batch_size,
        pad_id=tokenizer.pad_token_id,
        device=device,
    )
    summary = summarize_evaluation(rows)
    runfolder.write_evaluation(run_dir, 0, rows)
    log = MetricsLog(run_dir, tensorboard=False)
    try:
        log.log(0, summary)
    finally:
        log.close()
    run_folder.update_identity(run_dir, status="evaluated", steps=0)
    console.print(
        f"[cyan]{escape(model_path)}[/] on {len(rows)} pairs: accuracy {summary.get('eval/rewards/accuracies', float('nan')):.3f}, "
        f"negative margins {summary.get('eval/negative_margin_fraction', float('nan')):.1%}"
    )
    return build_report(run_dir)


__all__ = ["evaluate_model"]
