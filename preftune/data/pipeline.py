"""From config to tokenised train/validation examples: load → validate → format → split → tokenize.

Paired methods get pairs (`TokenizedExample`s with 2 answers: chosen, rejected); unpaired ones
(KTO) get examples with 1 labelled answer, from an unpaired file or from a paired one split into
chosen/rejected examples after the train/validation split (so the two answers of one pair never
straddle it). Online methods get prompts alone (K = 0), from a prompt-only file or a paired one's prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from preftune.data.formats import FORMAT_KINDS, PAIRED, PROMPT_ONLY, UNPAIRED, load_examples
from preftune.data.kto import as_unpaired
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

    def summary(self) -> str:
        lines = [report.summary() for report in self.load_reports]
        lines += [f"{split}: {report.summary()}" for split, report in self.tokenization_reports.items()]
        lines.append(f"{self.unit}: {len(self.train)} train, {len(self.validation)} validation")
        return "\n".join(lines)


def prepare_examples(data_settings, tokenizer, *, seed: int, paired: bool, prompts: bool = False) -> PreparedData:
    """The train and validation examples a method needs: pairs when `paired`, prompts alone (K = 0) when
    `prompts`, unpaired (labelled) examples otherwise.

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
    train_items, train_report = load_examples(resolve_data_path(data_settings.train_file), **options)
    reports = [train_report]
    if data_settings.validation_file is None:
        train_items, validation_items = split_train_validation(train_items, data_settings.validation_split, seed)
    else:
        validation_items, validation_report = load_examples(resolve_data_path(data_settings.validation_file), **options)
        reports.append(validation_report)
    train_items = train_items[: data_settings.max_train_samples]
    validation_items = validation_items[: data_settings.max_validation_samples]
    if prompts:  # a paired file is a prompt source: its answers are dropped
        train_items, validation_items = _prompts_only(train_items), _prompts_only(validation_items)
    elif not paired:
        train_items = as_unpaired(train_items, train_report.format)
        validation_items = as_unpaired(validation_items, reports[-1].format)

    lengths = dict(
        max_length=data_settings.max_length, max_prompt_length=data_settings.max_prompt_length, skip_invalid=data_settings.skip_invalid
    )
    train, train_tokens = tokenize_examples(train_items, tokenizer, **lengths)
    validation, validation_tokens = tokenize_examples(validation_items, tokenizer, **lengths)
    unit = "pairs" if paired else "prompts" if prompts else "unpaired examples"
    if not train:
        raise DataError(f"no usable training {unit} in {data_settings.train_file}: {train_report.summary()}; {train_tokens.summary()}")
    return PreparedData(train, validation, reports, {"train": train_tokens, "validation": validation_tokens}, unit)


def _prompts_only(examples: list[Example]) -> list[Example]:
    return [Example(example.prompt, (), provenance=example.provenance, origin=example.origin) for example in examples]
