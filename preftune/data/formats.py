"""Turn raw records into `Example`s: the supported formats, their detection, and `load_examples`.

Formats (detected per file from its first recognisable record, or forced with `data.format`):

paired (K = 2 answers: chosen, rejected)
- `pairs`: `{"prompt": str, "chosen": str, "rejected": str}`, answers are the text after the prompt.
- `chat`: `chosen`/`rejected` are message lists `[{"role", "content"}]`, each ending with the
  assistant answer; the messages before it are the prompt, rendered with the tokenizer's chat
  template. An optional `prompt` is prepended to both when it is a message list (TRL's
  conversational format); when it is a string (UltraFeedback-binarized, whose `chosen`/`rejected`
  hold the whole conversation) it is only used as the user turn if the lists hold the answer
  alone. Numeric `score_chosen`/`score_rejected` become the example's scores.
- `hh_rlhf`: `{"chosen": str, "rejected": str}`, two full `\\n\\nHuman: ... \\n\\nAssistant: ...`
  transcripts; the prompt is everything up to and including the final `\\n\\nAssistant:`.
- `sharegpt` (LLaMA-Factory's preference files): `{"conversations": [{"from", "value"}, ...],
  "chosen": {"from": "gpt", "value": str}, "rejected": {...}}`, optional `system` string. Roles:
  human/user → user, gpt/assistant → assistant, system → system, observation → tool (a tool's
  output), function_call → assistant (the model's call, as text). The conversation ends with the
  turn being answered; it is rendered with the chat template.

unpaired (K = 1 answer with a label)
- `kto` (TRL's unpaired format): `{"prompt", "completion", "label": bool}`, as text, or `prompt` a
  message list and `completion` a list holding the one assistant message.
- `sharegpt_kto` (LLaMA-Factory's KTO files): `{"messages" or "conversations": [...], "kto_tag":
  bool}`; the last turn is the assistant's completion, the turns before it the prompt. Turns may be
  `{"role", "content"}` or `{"from", "value"}`.

prompt only (K = 0, for methods that generate their answers)
- `prompts`: `{"prompt": str}`, or `prompt` (or `messages`) a message list rendered with the
  generation prompt; the messages end with the turn to answer.

Any record may carry `provenance: "human" | "synthetic"` (or `source` with one of those values;
another `source`, e.g. a dataset name, is not a provenance and is ignored). `data.columns` (preftune name → the
file's field name, for prompt/chosen/rejected/completion/label/messages) renames fields before
detection, for files that use other names.

A record that cannot become an example is skipped with a counted reason (or raises a
`DataError` naming file, line and field when `skip_invalid=False`):

    unknown_format       no format reads the record: the message names the closest one and the
                         `data.columns` that would read it
    format_changed       the record is in another format than the file's first record
    missing_field, wrong_type   a field is absent/null, or of the wrong type (a close misspelling is named)
    no_shared_prompt     hh_rlhf: the transcripts differ before the final assistant turn
    prompt_mismatch      chat: the messages before the final answer differ
    no_assistant_answer  chat, kto: a conversation does not end with an assistant message
    no_turn_to_answer    sharegpt: the conversation is empty or ends with an assistant turn
    unknown_role         sharegpt: a turn's role is none of the above
    template_error       the chat template rejected the messages
    empty_answer         an answer is empty or only whitespace
    identical_answers    chosen == rejected: no preference to learn
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError

from preftune.data.fields import (
    CLOSE_MATCH_CUTOFF,
    SkipRecord,
    check_columns,
    message_list,
    rename_columns,
    require_object,
    required_field,
)
from preftune.data.hints import FORMAT_FIELDS, unknown_format_message
from preftune.data.readers import RawRecord, read_records
from preftune.data.records import PROVENANCES, Example, LoadReport
from preftune.errors import ConfigError, DataError

PAIRED, UNPAIRED, PROMPT_ONLY = "paired", "unpaired", "prompt_only"
FORMAT_KINDS = {
    "pairs": PAIRED,
    "chat": PAIRED,
    "hh_rlhf": PAIRED,
    "sharegpt": PAIRED,
    "kto": UNPAIRED,
    "sharegpt_kto": UNPAIRED,
    "prompts": PROMPT_ONLY,
}
FORMATS = tuple(FORMAT_KINDS)
UNITS = {PAIRED: "preference pairs", UNPAIRED: "unpaired examples", PROMPT_ONLY: "prompts"}
HH_ASSISTANT_MARKER = "\n\nAssistant:"
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
    "observation": "tool",
    "tool": "tool",
    "function_call": "assistant",
}
ANSWER_FIELDS = ("chosen", "rejected", "completion", "label", "kto_tag")


def load_examples(
    path: str | Path,
    *,
    format: str = "auto",
    tokenizer=None,
    skip_invalid: bool = True,
    max_samples: int | None = None,
    columns: dict[str, str] | None = None,
    accept: Collection[str] = (PAIRED, UNPAIRED, PROMPT_ONLY),
) -> tuple[list[Example], LoadReport]:
    """Read a JSONL/JSON/Parquet file into examples of one format, in file order.

    `format` is "auto" or one of `FORMATS`; `tokenizer` renders chat-format prompts with its chat
    template. Bad records are counted per reason in the report, or raise a `DataError` with
    `skip_invalid=False`; an unreadable or malformed file always raises, and so does a file whose
    format is of a kind (`FORMAT_KINDS`) not in `accept`. `max_samples` stops after that many
    kept examples. Raises `DataError` if no example is usable.
    """
    if format != "auto" and format not in FORMATS:
        raise ConfigError(f"unknown data format {format!r}: use 'auto' or one of {', '.join(FORMATS)}")
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"max_samples must be at least 1, got {max_samples}")
    columns = check_columns(columns)
    report = LoadReport(path=str(path), format=format)
    if format != "auto":
        _check_kind(format, accept, report.path, None)
    first_of_format: RawRecord | None = None
    first_unknown: str | None = None

    examples: list[Example] = []
    for record in read_records(path):
        report.read += 1
        value = rename_columns(record.value, columns)
        try:
            require_object(value)
            if report.format == "auto":
                detected = detect_format(value)
                if detected is None:
                    raise SkipRecord("unknown_format", unknown_format_message(value))
                _check_kind(detected, accept, report.path, record)
                report.format, first_of_format = detected, record
            example = _PARSERS[report.format](value, tokenizer, report.path)
            example = dataclasses.replace(example, provenance=_provenance(value), origin=record.source)
        except SkipRecord as skip:
            if format == "auto" and first_of_format not in (None, record):
                skip = _format_change(skip, value, report.format, first_of_format)
            if not skip_invalid:
                raise skip_as_error(record, skip, columns) from None
            if skip.reason == "unknown_format" and first_unknown is None:
                first_unknown = f"{record.source}: {skip.message}"
            report.add_skip(skip.reason, record.source)
            continue
        examples.append(example)
        if len(examples) == max_samples:
            break

    report.kept = len(examples)
    if not examples:
        kind = FORMAT_KINDS.get(report.format, next(iter(accept)) if len(accept) == 1 else None)
        unit = UNITS[kind] if kind else "records"
        raise DataError(f"no usable {unit}: {report.summary()}{_why_nothing(format, first_unknown, path)}", path=report.path)
    return examples, report


def load_pairs(
    path: str | Path,
    *,
    format: str = "auto",
    tokenizer=None,
    skip_invalid: bool = True,
    max_samples: int | None = None,
    columns: dict[str, str] | None = None,
) -> tuple[list[Example], LoadReport]:
    """`load_examples` for preference pairs only (K = 2: `example.chosen`, `example.rejected`)."""
    return load_examples(
        path, format=format, tokenizer=tokenizer, skip_invalid=skip_invalid, max_samples=max_samples, columns=columns, accept=(PAIRED,)
    )


def detect_format(value: Any) -> str | None:
    """The format a record is written in, judged from which fields it has and their types; None if none fits."""
    if not isinstance(value, dict):
        return None
    chosen = value.get("chosen")
    conversation = value.get("messages", value.get("conversations"))
    if isinstance(chosen, dict) or ("conversations" in value and chosen is not None and not isinstance(chosen, list)):
        return "sharegpt"
    if isinstance(chosen, list):
        return "chat"
    if isinstance(chosen, str):
        return "pairs" if "prompt" in value else "hh_rlhf"
    if isinstance(conversation, list) and ("kto_tag" in value or "label" in value) and "chosen" not in value:
        return "sharegpt_kto"
    if "completion" in value and "label" in value:
        return "kto"
    if ("prompt" in value or isinstance(conversation, list)) and not _has_answer_like_field(value):
        return "prompts"
    return None


def _has_answer_like_field(value: dict[str, Any]) -> bool:
    """Whether a field is (or is spelt close to) an answer or label: then the record is no bare prompt."""
    return any(difflib.get_close_matches(str(key), ANSWER_FIELDS, n=1, cutoff=CLOSE_MATCH_CUTOFF) for key in value)


def format_kind(format: str) -> str:
    """`paired`, `unpaired` or `prompt_only`."""
    return FORMAT_KINDS[format]


def _check_kind(format: str, accept: Collection[str], path: str, record: RawRecord | None) -> None:
    kind = FORMAT_KINDS[format]
    if kind in accept:
        return
    if kind == UNPAIRED:
        fix = "train it with `method.loss_type: kto`, or give a paired file (prompt, chosen, rejected)"
    elif kind == PROMPT_ONLY:
        fix = "these are prompts without answers, for methods that generate their own; give a file with answers"
    else:
        fix = "give a file of the kind this method needs"
    message = f"the file holds {UNITS[kind]} (format {format}), but this needs {' or '.join(UNITS[k] for k in accept)}: {fix}"
    raise record.error(message) if record is not None else DataError(message, path=path)


def _format_change(skip: SkipRecord, value: Any, format: str, first: RawRecord) -> SkipRecord:
    """A record that fails its file's format but reads as another one: say so instead of naming a field."""
    other = detect_format(value)
    if other is None or other == format:
        return skip
    if skip.reason == "missing_field" and _field_names(other) <= _field_names(format):
        return skip  # a record of this format lacking a field (a pair without its prompt reads like hh_rlhf)
    return SkipRecord(
        "format_changed",
        f"this record is in format {other}, but the file started in format {format} ({first.source}); "
        "a file holds records of one format",
    )


def _field_names(format: str) -> set[str]:
    return {name for name, _ in FORMAT_FIELDS[format]}


def _why_nothing(format: str, first_unknown: str | None, path: str | Path) -> str:
    """What to try when a file gave nothing: the records' own format, or the closest one."""
    if first_unknown is not None:
        return f"; {first_unknown}"
    if format == "auto":
        return ""
    for record in read_records(path):
        if isinstance(record.value, dict):
            detected = detect_format(record.value)
            if detected not in (None, format):
                return f"; the records look like format {detected}: set data.format: auto or {detected}"
        break
    return ""


def skip_as_error(record: RawRecord, skip: SkipRecord, columns: dict[str, str] | None = None) -> DataError:
    """The `DataError` for a skipped record, naming the file's own field when `data.columns` renamed it."""
    message = f"{skip.message} [{skip.reason}]"
    if columns and skip.field in columns:
        return record.error(f"{message} (data.columns.{skip.field} names it)", field=columns[skip.field])
    return record.error(message, field=skip.field)


def _provenance(value: dict[str, Any]) -> str | None:
    provenance = value.get("provenance")
    if provenance is None and value.get("source") in PROVENANCES:
        return value["source"]
    if provenance is not None and provenance not in PROVENANCES:
        raise SkipRecord("wrong_type", f"expected one of {', '.join(PROVENANCES)}, got {provenance!r}", "provenance")
    return provenance


# --- paired formats ---------------------------------------------------------------------------


def _parse_pairs(value: dict[str, Any], tokenizer, path: str) -> Example:
    prompt = required_field(value, "prompt", str)
    return _pair(prompt, required_field(value, "chosen", str), required_field(value, "rejected", str))


def _parse_hh_rlhf(value: dict[str, Any], tokenizer, path: str) -> Example:
    chosen, rejected = required_field(value, "chosen", str), required_field(value, "rejected", str)
    # The prompt is the longest shared prefix that ends at the final assistant marker of *both*.
    cut = chosen.rfind(HH_ASSISTANT_MARKER)
    if cut < 0 or rejected.rfind(HH_ASSISTANT_MARKER) != cut or chosen[:cut] != rejected[:cut]:
        raise SkipRecord(
            "no_shared_prompt",
            "chosen and rejected transcripts do not share the same text up to their final '\\n\\nAssistant:' turn",
        )
    end = cut + len(HH_ASSISTANT_MARKER)
    return _pair(chosen[:end], chosen[end:], rejected[end:])


def _parse_chat(value: dict[str, Any], tokenizer, path: str) -> Example:
    prompt = value.get("prompt")
    shared = message_list(value, "prompt") if isinstance(prompt, list) else []
    conversations = {name: shared + message_list(value, name) for name in ("chosen", "rejected")}
    for name, conversation in conversations.items():
        if not conversation or conversation[-1]["role"] != "assistant":
            raise SkipRecord("no_assistant_answer", "the conversation does not end with an assistant message", name)
    chosen, rejected = conversations["chosen"], conversations["rejected"]
    if chosen[:-1] != rejected[:-1]:
        raise SkipRecord("prompt_mismatch", "the messages before the final assistant answer differ between chosen and rejected")
    before = chosen[:-1]
    if not before and prompt is not None:  # UltraFeedback-style string prompt with answer-only lists
        before = [{"role": "user", "content": required_field(value, "prompt", str)}]
    return _pair(render_prompt(tokenizer, before, path), chosen[-1]["content"], rejected[-1]["content"], scores=_pair_scores(value))


def _pair_scores(value: dict[str, Any]) -> tuple[float, float] | None:
    scores = value.get("score_chosen"), value.get("score_rejected")
    if all(isinstance(score, (int, float)) and not isinstance(score, bool) for score in scores):
        return float(scores[0]), float(scores[1])
    return None


def _parse_sharegpt(value: dict[str, Any], tokenizer, path: str) -> Example:
    name = _conversation_field(value)
    conversation = _system_turn(value) + _sharegpt_turns(value, name)
    if not conversation or conversation[-1]["role"] == "assistant":
        raise SkipRecord(
            "no_turn_to_answer", "the conversation must end with the turn being answered (human/observation), not an assistant turn", name
        )
    chosen, rejected = (_sharegpt_answer(value, name) for name in ("chosen", "rejected"))
    return _pair(render_prompt(tokenizer, conversation, path), chosen, rejected)


def _sharegpt_answer(value: dict[str, Any], name: str) -> str:
    answer = required_field(value, name, (dict, str))
    if isinstance(answer, str):
        return answer
    turn = _sharegpt_turn(answer, name)
    if turn["role"] != "assistant":
        raise SkipRecord("no_assistant_answer", f"the answer must be a gpt/assistant turn, got '{answer.get('from', answer.get('role'))}'", name)
    return turn["content"]


def _pair(prompt: str, chosen: str, rejected: str, scores: tuple[float, float] | None = None) -> Example:
    for name, answer in (("chosen", chosen), ("rejected", rejected)):
        if not answer.strip():
            raise SkipRecord("empty_answer", "the answer is empty", name)
    if chosen == rejected:
        raise SkipRecord("identical_answers", "chosen and rejected answers are identical: nothing to prefer")
    return Example.pair(prompt, chosen, rejected, scores=scores)


# --- unpaired formats -------------------------------------------------------------------------


def _parse_kto(value: dict[str, Any], tokenizer, path: str) -> Example:
    label = required_field(value, "label", bool)
    if isinstance(value.get("completion"), list):
        completion = message_list(value, "completion")
        if len(completion) != 1 or completion[0]["role"] != "assistant":
            raise SkipRecord("no_assistant_answer", "the completion must be one assistant message", "completion")
        prompt, text = render_prompt(tokenizer, message_list(value, "prompt"), path), completion[0]["content"]
    else:
        prompt, text = required_field(value, "prompt", str), required_field(value, "completion", str)
    return _unpaired(prompt, text, label, "completion")


def _parse_sharegpt_kto(value: dict[str, Any], tokenizer, path: str) -> Example:
    label = required_field(value, "kto_tag" if "kto_tag" in value else "label", bool)
    name = _conversation_field(value)
    conversation = _system_turn(value) + _sharegpt_turns(value, name)
    if not conversation or conversation[-1]["role"] != "assistant":
        raise SkipRecord("no_assistant_answer", "the last turn must be the assistant's completion", name)
    return _unpaired(render_prompt(tokenizer, conversation[:-1], path), conversation[-1]["content"], label, name)


def _unpaired(prompt: str, completion: str, label: bool, field: str) -> Example:
    if not completion.strip():
        raise SkipRecord("empty_answer", "the completion is empty", field)
    return Example.unpaired(prompt, completion, label)


# --- prompt-only format -----------------------------------------------------------------------


def _parse_prompts(value: dict[str, Any], tokenizer, path: str) -> Example:
    if "prompt" not in value and "messages" in value:
        messages = _system_turn(value) + message_list(value, "messages")
        if not messages or messages[-1]["role"] == "assistant":
            raise SkipRecord("no_turn_to_answer", "the messages must end with the turn to answer, not an assistant turn", "messages")
        return Example(render_prompt(tokenizer, messages, path), (), columns=_other_fields(value))
    prompt = required_field(value, "prompt", (str, list))
    if isinstance(prompt, list):
        prompt = render_prompt(tokenizer, message_list(value, "prompt"), path)
    elif not prompt.strip():
        raise SkipRecord("empty_prompt", "the prompt is empty", "prompt")
    return Example(prompt, (), columns=_other_fields(value))


def _other_fields(value: dict[str, Any]) -> dict[str, Any]:
    """A prompt record's fields besides the prompt itself: the columns reward functions may read (a reference answer)."""
    return {key: field for key, field in value.items() if key not in ("prompt", "messages", "system")}


_PARSERS: dict[str, Callable[[dict[str, Any], Any, str], Example]] = {
    "pairs": _parse_pairs,
    "chat": _parse_chat,
    "hh_rlhf": _parse_hh_rlhf,
    "sharegpt": _parse_sharegpt,
    "kto": _parse_kto,
    "sharegpt_kto": _parse_sharegpt_kto,
    "prompts": _parse_prompts,
}


# --- chat messages ----------------------------------------------------------------------------


def _conversation_field(value: dict[str, Any]) -> str:
    return "messages" if "messages" in value or "conversations" not in value else "conversations"


def _system_turn(value: dict[str, Any]) -> list[dict[str, str]]:
    system = value.get("system")
    if system is None or system == "":
        return []
    if not isinstance(system, str):
        raise SkipRecord("wrong_type", f"expected str, got {type(system).__name__}", "system")
    return [{"role": "system", "content": system}]


def _sharegpt_turns(value: dict[str, Any], name: str) -> list[dict[str, str]]:
    return [_sharegpt_turn(turn, name) for turn in required_field(value, name, list)]


def _sharegpt_turn(turn: Any, name: str) -> dict[str, str]:
    """A ShareGPT `{"from", "value"}` or OpenAI `{"role", "content"}` turn as `{"role", "content"}`."""
    if isinstance(turn, dict) and isinstance(turn.get("from"), str) and isinstance(turn.get("value"), str):
        role, content = turn["from"], turn["value"]
    elif isinstance(turn, dict) and isinstance(turn.get("role"), str) and isinstance(turn.get("content"), str):
        role, content = turn["role"], turn["content"]
    else:
        raise SkipRecord("wrong_type", 'expected turns {"from", "value"} or {"role", "content"} with string values', name)
    if role not in SHAREGPT_ROLES:
        raise SkipRecord("unknown_role", f"unknown role '{role}': use one of {', '.join(SHAREGPT_ROLES)}", name)
    return {"role": SHAREGPT_ROLES[role], "content": content}


def render_prompt(tokenizer, messages: list[dict[str, str]], path: str) -> str:
    """The messages through the tokenizer's chat template, ending with the assistant generation prompt."""
    require_chat_template(tokenizer, path)
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as error:
        raise SkipRecord("template_error", f"the chat template rejected the messages: {error}") from None


def require_chat_template(tokenizer, path: str) -> None:
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "chat-format records (message lists) need a tokenizer with a chat template to render the prompt: "
            "pass the model's tokenizer (load_pairs(..., tokenizer=...)) and use a chat/instruct model, "
            "or set `tokenizer.chat_template`",
            path=path,
        )


