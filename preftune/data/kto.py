"""Unpaired (KTO) data: `{prompt, completion, label}` records, and paired data turned into them.

Formats of an unpaired record (TRL's unpaired preference format):

- text: `{"prompt": str, "completion": str, "label": bool}`; the completion is the text after the prompt.
- chat: `prompt` is a message list and `completion` a list holding the one assistant answer; the
  prompt is rendered with the tokenizer's chat template, ending with the generation prompt.

`label: true` marks a desirable completion, `false` an undesirable one. A paired file (any format
`preftune.data.formats` reads) becomes unpaired data by `pairs_to_unpaired`: each pair gives its
chosen answer as a desirable example and its rejected answer as an undesirable one, both with the
pair's prompt. `preftune convert --to kto` writes that conversion to a JSONL file, and KTO training
does it on the fly, so a paired file can be trained with `loss_type: kto` directly.

Skip reasons (counted, like the paired formats'): missing_field, wrong_type, no_assistant_answer,
template_error, empty_answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError

from preftune.atomic import atomic_write_text
from preftune.data.formats import SkipRecord, skip_as_error, required_field, message_list, require_chat_template, require_object, load_pairs
from preftune.data.readers import read_records
from preftune.data.records import LoadReport, PreferencePair
from preftune.data.tokenize import BoundaryTokenizer, prompt_budget
from preftune.errors import DataError

UNPAIRED_FORMAT = "kto"


@dataclass(frozen=True)
class UnpairedExample:
    """One prompt with one completion and whether it is desirable, as text (see `PreferencePair` for the text contract)."""

    prompt: str
    completion: str
    label: bool
    source: str


@dataclass(frozen=True)
class TokenizedUnpaired:
    """An unpaired example as token ids: the model sees `prompt_ids + completion_ids` (completion ends with one EOS unless truncated)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    source: str


@dataclass
class UnpairedTokenizationReport:
    kept: int = 0
    prompt_truncated: int = 0
    completion_truncated: int = 0

    def summary(self) -> str:
        return (
            f"tokenized examples: kept {self.kept}, prompt truncated (kept its end) {self.prompt_truncated}, "
            f"completion truncated (no EOS) {self.completion_truncated}"
        )


def is_unpaired_record(value: Any) -> bool:
    """Whether a raw record is written in the unpaired format (has `completion` and `label`, no `chosen`)."""
    return isinstance(value, dict) and "completion" in value and "label" in value and "chosen" not in value


def file_is_unpaired(path: str | Path) -> bool:
    """Judged from the file's first record, like the paired formats' detection."""
    first = next(iter(read_records(path)), None)
    return first is not None and is_unpaired_record(first.value)


def pairs_to_unpaired(pairs: list[PreferencePair]) -> list[UnpairedExample]:
    """Each pair → (prompt, chosen, desirable) and (prompt, rejected, undesirable), in file order."""
    examples = []
    for pair in pairs:
        examples.append(UnpairedExample(pair.prompt, pair.chosen, True, f"{pair.source} (chosen)"))
        examples.append(UnpairedExample(pair.prompt, pair.rejected, False, f"{pair.source} (rejected)"))
    return examples


def load_unpaired_records(
    path: str | Path, *, tokenizer=None, skip_invalid: bool = True
) -> tuple[list[UnpairedExample], LoadReport]:
    """Read a file of unpaired records (format in the module docstring); bad records are counted or raise `DataError`."""
    report = LoadReport(path=str(path), format=UNPAIRED_FORMAT)
    examples: list[UnpairedExample] = []
    for record in read_records(path):
        report.read += 1
        try:
            prompt, completion, label = _parse_unpaired(require_object(record.value), tokenizer, report.path)
        except SkipRecord as skip:
            if not skip_invalid:
                raise skip_as_error(record, skip) from None
            report.add_skip(skip.reason, record.source)
            continue
        examples.append(UnpairedExample(prompt, completion, label, record.source))
    report.kept = len(examples)
    if not examples:
        raise DataError(f"no usable unpaired examples: {report.summary()}", path=report.path)
    return examples, report


def load_pairs_or_unpaired(
    path: str | Path, *, format: str = "auto", tokenizer=None, skip_invalid: bool = True
) -> tuple[list[PreferencePair] | list[UnpairedExample], LoadReport]:
    """Unpaired examples from an unpaired file, pairs (to split before unpairing) from a paired one."""
    if format == UNPAIRED_FORMAT or (format == "auto" and file_is_unpaired(path)):
        return load_unpaired_records(path, tokenizer=tokenizer, skip_invalid=skip_invalid)
    return load_pairs(path, format=format, tokenizer=tokenizer, skip_invalid=skip_invalid)


def as_unpaired(items: list[PreferencePair] | list[UnpairedExample]) -> list[UnpairedExample]:
    return pairs_to_unpaired(items) if items and isinstance(items[0], PreferencePair) else list(items)


def _parse_unpaired(value: dict[str, Any], tokenizer, path: str) -> tuple[str, str, bool]:
    label = value.get("label")
    if label is None:
        raise SkipRecord("missing_field", "missing field", "label")
    if not isinstance(label, bool):
        raise SkipRecord("wrong_type", f"expected true or false, got {type(label).__name__}", "label")
    if isinstance(value.get("completion"), list):
        require_chat_template(tokenizer, path)
        prompt_messages = message_list(value, "prompt")
        completion = message_list(value, "completion")
        if len(completion) != 1 or completion[0]["role"] != "assistant":
            raise SkipRecord("no_assistant_answer", "the completion must be one assistant message", "completion")
        try:
            prompt = tokenizer.apply_chat_template(prompt_messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as error:
            raise SkipRecord("template_error", f"the chat template rejected the messages: {error}") from None
        text = completion[0]["content"]
    else:
        prompt, text = required_field(value, "prompt", str), required_field(value, "completion", str)
    if not text.strip():
        raise SkipRecord("empty_answer", "the completion is empty", "completion")
    return prompt, text, label


def tokenize_unpaired(
    examples: list[UnpairedExample], tokenizer, *, max_length: int, max_prompt_length: int | None = None
) -> tuple[list[TokenizedUnpaired], UnpairedTokenizationReport]:
    """Tokenise with the same prompt/answer boundary and over-long policy as pairs (`preftune.data.tokenize`)."""
    max_prompt_length = prompt_budget(max_length, max_prompt_length)
    boundary = BoundaryTokenizer(tokenizer)
    report = UnpairedTokenizationReport()
    tokenized: list[TokenizedUnpaired] = []
    for example in examples:
        prompt_ids, (completion_ids,) = boundary.example_ids(example.source, example.prompt, [example.completion])
        if len(prompt_ids) > max_prompt_length:
            prompt_ids = boundary.keep_prompt_end(prompt_ids, max_prompt_length)
            report.prompt_truncated += 1
        budget = max_length - len(prompt_ids)
        if len(completion_ids) > budget:
            completion_ids = completion_ids[:budget]
            report.completion_truncated += 1
        tokenized.append(TokenizedUnpaired(prompt_ids, completion_ids, example.label, example.source))
    report.kept = len(tokenized)
    return tokenized, report


def convert_to_kto(
    source: str | Path, target: str | Path, *, format: str = "auto", tokenizer=None, skip_invalid: bool = True
) -> tuple[int, LoadReport]:
    """Write a paired file as unpaired KTO records (JSONL, one `{prompt, completion, label}` per line), atomically.

    Returns the number of records written and the load report of the paired file.
    """
    pairs, report = load_pairs(source, format=format, tokenizer=tokenizer, skip_invalid=skip_invalid)
    examples = pairs_to_unpaired(pairs)
    lines = [
        json.dumps({"prompt": e.prompt, "completion": e.completion, "label": e.label}, ensure_ascii=False) for e in examples
    ]
    atomic_write_text(target, "\n".join(lines) + "\n")
    return len(examples), report
