"""From config to tokenised train/validation examples: load → validate → format → mix → split → balance → tokenize.

Paired methods get pairs (`TokenizedExample`s with 2 answers: chosen, rejected); unpaired ones
(KTO) get examples with 1 labelled answer, from an unpaired file or from a paired one split into
chosen/rejected examples after the train/validation split (so the two answers of one pair never
straddle it). Online methods get prompts alone (K = 0), from a prompt-only file or a paired one's prompts.

Evidence about the data rides along (`PreparedData.mix`, `.balance`, `.audit`, `.warnings`, all in
`summary()`): the human/synthetic mix of `data.sources` or of the records' own provenance
(preftune/data/mixing.py), `data.length_balance`, and the audit of the training split as trained
(preftune/data/audit.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from preftune.data.audit import BalanceReport, DataAudit, audit_records, length_balance
from preftune.data.formats import FORMAT_KINDS, PAIRED, PROMPT_ONLY, UNPAIRED, load_examples
from preftune.data.kto import as_unpaired
from preftune.data.mixing import MixReport, SourceGroup, groups_by_provenance, mix_sources
from preftune.data.records import Example, LoadReport, TokenizedExample
from preftune.data.split import split_train_validation
from preftune.data.tokenize import TokenizationReport, tokenize_examples
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
    train: list[TokenizedExample]
    validation: list[TokenizedExample]
    load_reports: list[LoadReport]
    tokenization_reports: dict[str, TokenizationReport]
    unit: str = "pairs"  # what one example is, for the summary: "pairs" or "unpaired examples"
    audit: DataAudit | None = None  # of the training split as trained (after mixing, caps and balancing), as text
    balance: BalanceReport | None = None  # data.length_balance
    mix: MixReport | None = None  # data.sources, or the records' own provenance
    warnings: list[str] = field(default_factory=list)  # data settings that could not act on this data, and why

    def summary(self) -> str:
        lines = [report.summary() for report in self.load_reports]
        lines += [report.summary() for report in (self.mix, self.balance) if report is not None]
        lines += [f"data warning: {warning}" for warning in self.warnings]
        if self.audit is not None:
            lines += [f"data audit warning: {warning}" for warning in self.audit.warnings]
        lines += [f"{split}: {report.summary()}" for split, report in self.tokenization_reports.items()]
        lines.append(f"{self.unit}: {len(self.train)} train, {len(self.validation)} validation")
        return "\n".join(lines)

    def evidence(self) -> dict:
        """The audit, length balance, mix and data warnings as JSON-able data (the run folder's data_audit.json)."""
        parts = {"audit": self.audit, "length_balance": self.balance, "mix": self.mix}
        evidence = {name: report.to_dict() for name, report in parts.items() if report is not None}
        return {**evidence, "warnings": self.warnings} if self.warnings else evidence


def prepare_examples(data_settings, tokenizer, *, seed: int, paired: bool, prompts: bool = False) -> PreparedData:
    """The train and validation examples a method needs: pairs when `paired`, prompts alone (K = 0) when
    `prompts`, unpaired (labelled) examples otherwise.

    load (the train file, or the `data.sources` mixed) → split (or a validation file) → cap the
    counts → length-balance and audit the training split → unpair (KTO) → tokenise.
    `max_*_samples` count records of the file (pairs or examples), before pairs are unpaired.
    """
    forced = data_settings.format
    if paired and forced != "auto" and FORMAT_KINDS[forced] != PAIRED:
        raise ConfigError(f"data.format: {forced} ({FORMAT_KINDS[forced]} records) does not train a paired method")
    if prompts and forced != "auto" and FORMAT_KINDS[forced] == UNPAIRED:
        raise ConfigError(f"data.format: {forced} (unpaired records) does not give prompts: use a prompts or paired file")
    accept = (PAIRED,) if paired else (PAIRED, PROMPT_ONLY) if prompts else (PAIRED, UNPAIRED)
    options = dict(
        format=forced,
        tokenizer=tokenizer,
        skip_invalid=data_settings.skip_invalid,
        columns=data_settings.columns,
        accept=accept,
    )
    train_items, reports, mix, warnings = _load_training_items(data_settings, options, tokenizer=tokenizer, seed=seed)
    train_format = reports[0].format
    if data_settings.validation_file is None:
        train_items, validation_items = split_train_validation(train_items, data_settings.validation_split, seed)
    else:
        validation_items, validation_report = load_examples(resolve_data_path(data_settings.validation_file), **options)
        reports.append(validation_report)
    train_items = train_items[: data_settings.max_train_samples]
    validation_items = validation_items[: data_settings.max_validation_samples]
    balance, audit = None, None
    if prompts:  # a paired file is a prompt source: its answers are dropped (and there are no pairs to audit)
        train_items, validation_items = _prompts_only(train_items), _prompts_only(validation_items)
    else:
        train_items, balance, audit = _balance_and_audit(data_settings, train_items, train_format, tokenizer=tokenizer, seed=seed)
    if not paired and not prompts:
        train_items = as_unpaired(train_items, train_format)
        validation_items = as_unpaired(validation_items, reports[-1].format)

    lengths = dict(
        max_length=data_settings.max_length, max_prompt_length=data_settings.max_prompt_length, skip_invalid=data_settings.skip_invalid
    )
    train, train_tokens = tokenize_examples(train_items, tokenizer, **lengths)
    validation, validation_tokens = tokenize_examples(validation_items, tokenizer, **lengths)
    unit = "pairs" if paired else "prompts" if prompts else "unpaired examples"
    if not train:
        where = _training_files(data_settings)
        raise DataError(f"no usable training {unit} in {where}: {reports[0].summary()}; {train_tokens.summary()}")
    tokenization_reports = {"train": train_tokens, "validation": validation_tokens}
    return PreparedData(
        train, validation, reports, tokenization_reports, unit, audit=audit, balance=balance, mix=mix, warnings=warnings
    )


# --- Evidence about the data: the human/synthetic mix, length balancing, the audit ----------------------------
# (preftune/data/mixing.py, preftune/data/audit.py, docs/EVIDENCE.md). Mixing happens before the
# train/validation split, so a held-out split has the same mix; balancing touches the training split only.


def _training_files(data_settings) -> str:
    if data_settings.sources:
        return ", ".join(source.path for source in data_settings.sources)
    return data_settings.train_file


def _load_training_items(
    data_settings, options, *, tokenizer, seed: int
) -> tuple[list[Example], list[LoadReport], MixReport | None, list[str]]:
    """The training records and one load report per file; mixed (`mix_sources`) when there is provenance to mix by.

    With `data.sources`, each file is one group whose `source` sets its examples' provenance.
    Without, the train file's pairs are grouped by their own `provenance` when every record
    carries one (`_mix_by_record_provenance`); the returned warnings say why a mixing setting
    could not act.
    """
    mixing = dict(
        human_ratio=data_settings.human_ratio,
        seed=seed,
        tokenizer=tokenizer,
        kl_threshold=data_settings.kl_divergence_threshold,
        filter_outliers=data_settings.filter_synthetic_outliers,
    )
    if not data_settings.sources:
        items, report = load_examples(resolve_data_path(data_settings.train_file), **options)
        items, mix, warnings = _mix_by_record_provenance(data_settings, items, report, mixing)
        return items, [report], mix, warnings
    groups, reports = [], []
    for source in data_settings.sources:
        items, report = load_examples(resolve_data_path(source.path), **options)
        if FORMAT_KINDS[report.format] != PAIRED:
            raise DataError("data.sources mixes paired files (prompt, chosen, rejected); this one holds unpaired records", path=source.path)
        groups.append(SourceGroup(items, source.source, source.weight, name=source.path))
        reports.append(report)
    mixed, mix = mix_sources(groups, **mixing)
    return mixed, reports, mix, []


def _mix_by_record_provenance(
    data_settings, items: list[Example], report: LoadReport, mixing: dict
) -> tuple[list[Example], MixReport | None, list[str]]:
    """Mix one file's pairs by the provenance each record carries, keeping file order; or say why not.

    Runs when every record has a provenance and either a mixing setting asks for it
    (`human_ratio`, `filter_synthetic_outliers`) or both provenances are present (then only the
    KL check speaks). A mixing setting on records without provenance, or on unpaired records,
    is a no-op recorded as a warning: the floor and the filter need to know which pairs are human.
    """
    settings = (("human_ratio", data_settings.human_ratio), ("filter_synthetic_outliers", data_settings.filter_synthetic_outliers))
    asked = [f"data.{name} {value}" for name, value in settings if value not in (None, False)]
    unknown = [example for example in items if example.provenance is None]
    if FORMAT_KINDS[report.format] != PAIRED:
        why = f"{report.path} holds unpaired records ({report.format}), and mixing compares pairs"
    elif unknown:
        why = (
            f"{len(unknown)} of the {len(items)} records of {report.path} carry no provenance (e.g. {unknown[0].origin}); "
            "list the files under data.sources with source: human|synthetic, or give each record provenance: human|synthetic"
        )
    else:
        if not asked and len({example.provenance for example in items}) < 2:
            return items, None, []
        mixed, mix = mix_sources(groups_by_provenance(items), **mixing)
        # mix_sources returns a record that already carries its group's provenance as is, so identity finds it.
        kept = {id(example) for example in mixed}
        return [example for example in items if id(example) in kept], mix, []
    if not asked:
        return items, None, []
    return items, None, [f"{' and '.join(asked)} NOT applied: {why}"]


def _balance_and_audit(
    data_settings, train_items: list[Example], train_format: str, *, tokenizer, seed: int
) -> tuple[list[Example], BalanceReport | None, DataAudit]:
    """`length_balance` the training items when `data.length_balance`, then audit what is left (lengths in tokens)."""
    balance = None
    if data_settings.length_balance:
        if FORMAT_KINDS[train_format] != PAIRED:
            raise ConfigError("data.length_balance balances pairs; this training file holds unpaired records")
        train_items, balance = length_balance(train_items, tokenizer, seed=seed)
    return train_items, balance, audit_records(train_items, tokenizer)


def _prompts_only(examples: list[Example]) -> list[Example]:
    return [
        Example(example.prompt, (), provenance=example.provenance, origin=example.origin, columns=example.columns)
        for example in examples
    ]
