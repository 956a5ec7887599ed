"""From config to tokenised train/validation examples: load → validate → format → tokenize → split.

Paired methods get `TokenizedPair`s; unpaired ones (KTO) get `TokenizedUnpaired` examples, from
an unpaired file or from a paired one split into chosen/rejected examples after the
train/validation split (so the two answers of one pair never straddle it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from preftune.data.audit import BalanceReport, DataAudit, audit_records, length_balance
from preftune.data.formats import LoadReport, load_pairs
from preftune.data.kto import (
    TokenizedUnpaired,
    UnpairedExample,
    UnpairedTokenizationReport,
    as_unpaired,
    file_is_unpaired,
    load_pairs_or_unpaired,
    tokenize_unpaired,
)
from preftune.data.mixing import MixReport, SourceGroup, mix_sources
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
    audit: DataAudit | None = None  # of the training split as trained (after mixing, caps and balancing), as text
    balance: BalanceReport | None = None  # data.length_balance
    mix: MixReport | None = None  # data.sources

    def summary(self) -> str:
        lines = [report.summary() for report in self.load_reports]
        lines += [report.summary() for report in (self.mix, self.balance) if report is not None]
        if self.audit is not None:
            lines += [f"data audit warning: {warning}" for warning in self.audit.warnings]
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
    train_items, reports, mix = _load_training_items(data_settings, load, options, tokenizer=tokenizer, seed=seed)
    if data_settings.validation_file is None:
        train_items, validation_items = split_train_validation(train_items, data_settings.validation_split, seed)
    else:
        validation_items, validation_report = load(resolve_data_path(data_settings.validation_file), **options)
        reports.append(validation_report)
    train_items = train_items[: data_settings.max_train_samples]
    validation_items = validation_items[: data_settings.max_validation_samples]
    train_items, balance, audit = _balance_and_audit(data_settings, train_items, tokenizer=tokenizer, seed=seed)

    lengths = dict(max_length=data_settings.max_length, max_prompt_length=data_settings.max_prompt_length)
    train, train_tokens = tokenize(train_items, tokenizer, **lengths)
    validation, validation_tokens = tokenize(validation_items, tokenizer, **lengths)
    if not train:
        raise DataError(f"no usable training {unit} in {_training_files(data_settings)}: {reports[0].summary()}")
    tokenization_reports = {"train": train_tokens, "validation": validation_tokens}
    return PreparedData(train, validation, reports, tokenization_reports, audit=audit, balance=balance, mix=mix)


# --- Evidence about the data: the human/synthetic sources mix, length balancing, the audit ------------------
# (preftune/data/mixing.py, preftune/data/audit.py, docs/EVIDENCE.md). Mixing happens before the
# train/validation split, so a held-out split has the same mix; balancing touches the training split only.


def _training_files(data_settings) -> str:
    if data_settings.sources:
        return ", ".join(source.path for source in data_settings.sources)
    return data_settings.train_file


def _load_training_items(data_settings, load, options, *, tokenizer, seed: int) -> tuple[list, list[LoadReport], MixReport | None]:
    """The training file's records, or the `data.sources` files mixed (`mix_sources`); one load report per file."""
    if not data_settings.sources:
        items, report = load(resolve_data_path(data_settings.train_file), **options)
        return items, [report], None
    groups, reports = [], []
    for source in data_settings.sources:
        items, report = load(resolve_data_path(source.path), **options)
        if items and isinstance(items[0], UnpairedExample):
            raise DataError("data.sources mixes paired files (prompt, chosen, rejected); this one holds unpaired records", path=source.path)
        groups.append(SourceGroup(items, source.source, source.weight, name=source.path))
        reports.append(report)
    mixed, mix = mix_sources(
        groups,
        human_ratio=data_settings.human_ratio,
        seed=seed,
        tokenizer=tokenizer,
        kl_threshold=data_settings.kl_divergence_threshold,
        filter_outliers=data_settings.filter_synthetic_outliers,
    )
    return mixed, reports, mix


def _balance_and_audit(data_settings, train_items: list, *, tokenizer, seed: int) -> tuple[list, BalanceReport | None, DataAudit]:
    """`length_balance` the training items when `data.length_balance`, then audit what is left (lengths in tokens)."""
    balance = None
    if data_settings.length_balance:
        if train_items and isinstance(train_items[0], UnpairedExample):
            raise ConfigError("data.length_balance balances pairs; this training file holds unpaired records")
        train_items, balance = length_balance(train_items, tokenizer, seed=seed)
    return train_items, balance, audit_records(train_items, tokenizer)
