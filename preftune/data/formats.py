"""Turn raw records into `PreferencePair`s: the supported formats, their detection, and `load_pairs`.

Formats (detected per file from the first record that has a `chosen` field, or forced):

- `pairs`: `{"prompt": str, "chosen": str, "rejected": str}`, answers are the text after the prompt.
- `chat`: `chosen`/`rejected` are message lists `[{"role", "content"}]`, each ending with the
  assistant answer; an optional `prompt` message list is prepended to both (TRL's conversational
  format). The shared messages are rendered with the tokenizer's chat template.
- `hh_rlhf`: `{"chosen": str, "rejected": str}`, two full `\\n\\nHuman: ... \\n\\nAssistant: ...`
  transcripts; the prompt is everything up to and including the final `\\n\\nAssistant:`.

A record that cannot become a usable pair is skipped with a counted reason (or raises a
`DataError` naming file, line and field when `skip_invalid=False`):

    missing_field, wrong_type      a field is absent/null, or not a string/message list
    no_shared_prompt               hh_rlhf: the transcripts differ before the final assistant turn
    prompt_mismatch                chat: the messages before the final answer differ
    no_assistant_answer            chat: a conversation does not end with an assistant message
    template_error                 chat: the chat template rejected the messages
    empty_answer                   an answer is empty or only whitespace
    identical_answers              chosen == rejected: no preference to learn
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError

from preftune.data.readers import RawRecord, read_records
from preftune.data.records import LoadReport, PreferencePair
from preftune.errors import ConfigError, DataError

FORMATS = ("pairs", "chat", "hh_rlhf")
HH_ASSISTANT_MARKER = "\n\nAssistant:"


class SkipRecord(Exception):
    """Raised by the parsers for a record that cannot become a pair; `reason` is what gets counted."""

    def __init__(self, reason: str, message: str, field: str | None = None):
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.field = field


def load_pairs(
    path: str | Path,
    *,
    format: str = "auto",
    tokenizer=None,
    skip_invalid: bool = True,
    max_samples: int | None = None,
) -> tuple[list[PreferencePair], LoadReport]:
    """Read a JSONL/JSON/Parquet file of preference records into pairs, in file order.

    `format` is "auto" or one of `FORMATS`; `tokenizer` is needed for chat data (its chat
    template renders the prompt). Bad records are counted per reason in the report, or raise a
    `DataError` with `skip_invalid=False`; an unreadable or malformed file always raises.
    `max_samples` stops after that many kept pairs. Raises `DataError` if no pair is usable.
    """
    if format != "auto" and format not in FORMATS:
        raise ConfigError(f"unknown data format {format!r}: use 'auto' or one of {', '.join(FORMATS)}")
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"max_samples must be at least 1, got {max_samples}")
    report = LoadReport(path=str(path), format=format)
    if format == "chat":
        require_chat_template(tokenizer, report.path)

    pairs: list[PreferencePair] = []
    for record in read_records(path):
        report.read += 1
        try:
            if report.format == "auto":
                report.format = detect_format(record.value)
                if report.format == "chat":
                    require_chat_template(tokenizer, report.path)
            prompt, chosen, rejected = _PARSERS[report.format](require_object(record.value), tokenizer)
            _check_answers(chosen, rejected)
        except SkipRecord as skip:
            if not skip_invalid:
                raise skip_as_error(record, skip) from None
            report.add_skip(skip.reason, record.source)
            continue
        pairs.append(PreferencePair(prompt, chosen, rejected, record.source))
        if len(pairs) == max_samples:
            break

    report.kept = len(pairs)
    if not pairs:
        raise DataError(f"no usable preference pairs: {report.summary()}", path=report.path)
    return pairs, report


def detect_format(value: Any) -> str:
    """The format a record is written in, judged from its `chosen` field (and whether it has `prompt`)."""
    chosen = required_field(require_object(value), "chosen", (str, list))
    if isinstance(chosen, list):
        return "chat"
    return "pairs" if "prompt" in value else "hh_rlhf"


def _parse_pairs(value: dict[str, Any], tokenizer) -> tuple[str, str, str]:
    return required_field(value, "prompt", str), required_field(value, "chosen", str), required_field(value, "rejected", str)


def _parse_hh_rlhf(value: dict[str, Any], tokenizer) -> tuple[str, str, str]:
    chosen, rejected = required_field(value, "chosen", str), required_field(value, "rejected", str)
    # The prompt is the longest shared prefix that ends at the final assistant marker of *both*.
    cut = chosen.rfind(HH_ASSISTANT_MARKER)
    if cut < 0 or rejected.rfind(HH_ASSISTANT_MARKER) != cut or chosen[:cut] != rejected[:cut]:
        raise SkipRecord(
            "no_shared_prompt",
            "chosen and rejected transcripts do not share the same text up to their final '\\n\\nAssistant:' turn",
        )
    end = cut + len(HH_ASSISTANT_MARKER)
    return chosen[:end], chosen[end:], rejected[end:]


def _parse_chat(value: dict[str, Any], tokenizer) -> tuple[str, str, str]:
    shared = message_list(value, "prompt") if value.get("prompt") is not None else []
    conversations = {name: shared + message_list(value, name) for name in ("chosen", "rejected")}
    for name, conversation in conversations.items():
        if not conversation or conversation[-1]["role"] != "assistant":
            raise SkipRecord("no_assistant_answer", "the conversation does not end with an assistant message", name)
    chosen, rejected = conversations["chosen"], conversations["rejected"]
    if chosen[:-1] != rejected[:-1]:
        raise SkipRecord("prompt_mismatch", "the messages before the final assistant answer differ between chosen and rejected")

    try:
        prompt = tokenizer.apply_chat_template(chosen[:-1], tokenize=False, add_generation_prompt=True)
    except TemplateError as error:
        raise SkipRecord("template_error", f"the chat template rejected the messages: {error}") from None
    return prompt, chosen[-1]["content"], rejected[-1]["content"]


_PARSERS: dict[str, Callable[[dict[str, Any], Any], tuple[str, str, str]]] = {
    "pairs": _parse_pairs,
    "chat": _parse_chat,
    "hh_rlhf": _parse_hh_rlhf,
}


def _check_answers(chosen: str, rejected: str) -> None:
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer.strip():
            raise SkipRecord("empty_answer", "the answer is empty", name)
    if chosen == rejected:
        raise SkipRecord("identical_answers", "chosen and rejected answers are identical: nothing to prefer")


def require_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SkipRecord("wrong_type", f"a record must be a JSON object, got {type(value).__name__}")
    return value


def required_field(value: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if value.get(name) is None:  # null counts as missing: Parquet fills absent columns with null
        raise SkipRecord("missing_field", "missing field", name)
    if not isinstance(value[name], kind):
        expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise SkipRecord("wrong_type", f"expected {expected}, got {type(value[name]).__name__}", name)
    return value[name]


def message_list(value: dict[str, Any], name: str) -> list[dict[str, Any]]:
    messages = required_field(value, name, list)
    for message in messages:
        if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
            raise SkipRecord("wrong_type", "expected a list of {role, content} messages with string content", name)
    return messages


def require_chat_template(tokenizer, path: str) -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "chat-format records (message lists) need a tokenizer with a chat template to render the prompt: "
            "pass the model's tokenizer (load_pairs(..., tokenizer=...)) and use a chat/instruct model, "
            "or set `tokenizer.chat_template`",
            path=path,
        )


def skip_as_error(record: RawRecord, skip: SkipRecord) -> DataError:
    return record.error(f"{skip.message} [{skip.reason}]", field=skip.field)
