"""From config to tokenised train/validation examples: load → validate → format → tokenize → split.

Paired methods get `TokenizedPair`s; unpaired ones (KTO) get `TokenizedUnpaired` examples, from
an unpaired file or from a paired one split into chosen/rejected examples after the
train/validation split (so the two answers of one pair never straddle it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from preftune.data.formats import LoadReport, load_pairs
from preftune.data.kto import (
    TokenizedUnpaired,
    UnpairedTokenizationReport,
    as_unpaired,
    file_is_unpaired,
    load_pairs_or_unpaired,
    tokenize_unpaired,
)
from preftune.data.records import TokenizedPair
from preftune.data.split import split_train_validation
from preftune.data.tokenize import TokenizationReport, tokenize_pairs
from preftune.errors import ConfigError, DataError

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
    train: list[TokenizedPair] | list[TokenizedUnpaired]
    validation: list[TokenizedPair] | list[TokenizedUnpaired]
    load_reports: list[LoadReport]
    tokenization_reports: dict[str, TokenizationReport | UnpairedTokenizationReport]

    def summary(self) -> str:
        lines = [report.summary() for report in self.load_reports]
        lines += [f"{split}: {report.summary()}" for split, report in self.tokenization_reports.items()]
        unit = "unpaired examples" if self.train and isinstance(self.train[0], TokenizedUnpaired) else "pairs"
        lines.append(f"{unit}: {len(self.train)} train, {len(self.validation)} validation")
        return "\n".join(lines)


def prepare_examples(data_settings, tokenizer, *, seed: int, paired: bool) -> PreparedData:
    """The train and validation examples a method needs: pairs when `paired`, unpaired examples otherwise."""
    if paired:
        if data_settings.format == "kto":
            raise ConfigError("data.format: kto (unpaired records) trains only with `method.loss_type: kto`")
        for spec in (data_settings.train_file, data_settings.validation_file):
            if spec is not None and file_is_unpaired(resolve_data_path(spec)):
                raise DataError(
                    f"{spec} holds unpaired records (prompt, completion, label): train it with `method.loss_type: kto`, "
                    "or give a paired file (prompt, chosen, rejected)"
                )
        return prepare_pairs(data_settings, tokenizer, seed=seed)
    return prepare_unpaired(data_settings, tokenizer, seed=seed)


def prepare_unpaired(data_settings, tokenizer, *, seed: int) -> PreparedData:
    """Like `prepare_pairs`, for unpaired (KTO) training; `max_*_samples` count records of the file (pairs or examples)."""

    def tokenize(items, tokenizer, **lengths):
        return tokenize_unpaired(as_unpaired(items), tokenizer, **lengths)

    return _prepare(data_settings, tokenizer, seed=seed, load=load_pairs_or_unpaired, tokenize=tokenize, unit="examples")


def prepare_pairs(data_settings, tokenizer, *, seed: int) -> PreparedData:
    """Load, validate, split and tokenise the train and validation pairs a run config names."""
    return _prepare(data_settings, tokenizer, seed=seed, load=load_pairs, tokenize=tokenize_pairs, unit="pairs")


def _prepare(data_settings, tokenizer, *, seed: int, load, tokenize, unit: str) -> PreparedData:
    """load → split (or a validation file) → cap the counts → tokenise, with one report per file and split."""
    options = dict(format=data_settings.format, tokenizer=tokenizer, skip_invalid=data_settings.skip_invalid)
    train_items, train_report = load(resolve_data_path(data_settings.train_file), **options)
    reports = [train_report]
    if data_settings.validation_file is None:
        train_items, validation_items = split_train_validation(train_items, data_settings.validation_split, seed)
    else:
        validation_items, validation_report = load(resolve_data_path(data_settings.validation_file), **options)
        reports.append(validation_report)
    train_items = train_items[: data_settings.max_train_samples]
    validation_items = validation_items[: data_settings.max_validation_samples]

    lengths = dict(max_length=data_settings.max_length, max_prompt_length=data_settings.max_prompt_length)
    train, train_tokens = tokenize(train_items, tokenizer, **lengths)
    validation, validation_tokens = tokenize(validation_items, tokenizer, **lengths)
    if not train:
        raise DataError(f"no usable training {unit} in {data_settings.train_file}: {train_report.summary()}")
    return PreparedData(train, validation, reports, {"train": train_tokens, "validation": validation_tokens})
