"""From config to tokenised train/validation pairs: load → validate → format → tokenize → split."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from preftune.data.formats import LoadReport, load_pairs
from preftune.data.records import TokenizedPair
from preftune.data.split import split_train_validation
from preftune.data.tokenize import TokenizationReport, tokenize_pairs
from preftune.errors import DataError

EMBEDDED_DATASETS = {"hh-rlhf-harmless": Path(__file__).resolve().parents[1] / "datasets" / "hh-rlhf-harmless"}


def resolve_data_path(spec: str) -> Path:
    """`name:split` names a dataset shipped with preftune; anything else is a file path."""
    name, sep, split = spec.partition(":")
    if sep and name in EMBEDDED_DATASETS:
        path = EMBEDDED_DATASETS[name] / f"{split}.jsonl"
        if not path.is_file():
            available = sorted(p.stem for p in EMBEDDED_DATASETS[name].glob("*.jsonl"))
            raise DataError(f"embedded dataset '{name}' has no split '{split}'; it has {available}")
        return path
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    return path


@dataclass
class PreparedData:
    train: list[TokenizedPair]
    validation: list[TokenizedPair]
    load_reports: list[LoadReport]
    tokenization_reports: dict[str, TokenizationReport]

    def summary(self) -> str:
        lines = [report.summary() for report in self.load_reports]
        lines += [f"{split}: {report.summary()}" for split, report in self.tokenization_reports.items()]
        lines.append(f"pairs: {len(self.train)} train, {len(self.validation)} validation")
        return "\n".join(lines)


def prepare_pairs(data_settings, tokenizer, *, seed: int) -> PreparedData:
    """Load, validate, split and tokenise the train and validation pairs a run config names."""
    load = dict(format=data_settings.format, tokenizer=tokenizer, skip_invalid=data_settings.skip_invalid)
    train_pairs, train_report = load_pairs(resolve_data_path(data_settings.train_file), **load)
    reports = [train_report]
    if data_settings.validation_file is None:
        train_pairs, validation_pairs = split_train_validation(train_pairs, data_settings.validation_split, seed)
    else:
        validation_pairs, validation_report = load_pairs(resolve_data_path(data_settings.validation_file), **load)
        reports.append(validation_report)
    train_pairs = train_pairs[: data_settings.max_train_samples]
    validation_pairs = validation_pairs[: data_settings.max_validation_samples]

    tokenize = dict(max_length=data_settings.max_length, max_prompt_length=data_settings.max_prompt_length)
    train, train_tokens = tokenize_pairs(train_pairs, tokenizer, **tokenize)
    validation, validation_tokens = tokenize_pairs(validation_pairs, tokenizer, **tokenize)
    if not train:
        raise DataError(f"no usable training pairs in {data_settings.train_file}: {train_report.summary()}")
    return PreparedData(train, validation, reports, {"train": train_tokens, "validation": validation_tokens})
