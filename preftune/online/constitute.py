"""Constitutional AI's supervised stage turned into preference pairs (Bai et al. 2022, "Constitutional AI").

For each prompt the model (1) answers, (2) critiques its answer against one principle drawn from
the constitution (seeded), (3) revises the answer in the light of the critique. Each prompt
becomes one JSONL line

    {"prompt", "chosen": revision, "rejected": original answer, "principle", "critique",
     "source": "synthetic", "prompt_index"}

which `preftune.data.formats.load_pairs` reads as the `pairs` format (it ignores the extra keys).

Prompts: a JSONL/JSON/Parquet file of `{"prompt": str}` (used verbatim as the model's input, e.g.
an hh-rlhf transcript ending in "\\n\\nAssistant:") or `{"messages": [{role, content}, ...]}`
(rendered with the tokenizer's chat template, ending with the generation prompt). Other fields
are ignored.

Resumable: a line is appended and fsynced per finished prompt; a rerun skips the prompts whose
index and prompt (SHA-256) are already in the output, and drops a torn last line first. Every
random choice is seeded from (seed, prompt index), so a resumed run writes what an uninterrupted
one would have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from jinja2.exceptions import TemplateError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from preftune.data.readers import RawRecord, read_records
from preftune.errors import ConfigError, DataError
from preftune.online.generation import GenerationSettings, generate

logger = logging.getLogger(__name__)

DEFAULT_CONSTITUTION = Path(__file__).resolve().parents[1] / "defaults" / "constitution.yaml"
REQUEST_PLACEHOLDER = "{request}"


class Principle(BaseModel):
    """One principle: how to ask for a critique against it, and how to ask for the revision."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="recorded in each pair's `principle` field")
    critique_request: str = Field(min_length=1, description="asks the model to critique its last response")
    revision_request: str = Field(min_length=1, description="asks the model to rewrite its response")


class Constitution(BaseModel):
    """The principles, and how plain-text prompts are continued with a critique and a revision turn."""

    model_config = ConfigDict(extra="forbid")

    principles: list[Principle] = Field(min_length=1)
    critique_turn: str = Field(
        "\n\nCritiqueRequest: {request}\n\nCritique:", description="appended after the answer; {request} = critique_request"
    )
    revision_turn: str = Field(
        "\n\nRevisionRequest: {request}\n\nRevision:", description="appended after the critique; {request} = revision_request"
    )
    stop_strings: list[str] = Field(
        default_factory=list, description="plain-text prompts only: generation stops at these, and they are cut off"
    )

    @field_validator("critique_turn", "revision_turn")
    @classmethod
    def _has_placeholder(cls, turn: str) -> str:
        if REQUEST_PLACEHOLDER not in turn:
            raise ValueError(f"must contain {REQUEST_PLACEHOLDER} where the principle's request goes")
        return turn

    @field_validator("principles")
    @classmethod
    def _unique_names(cls, principles: list[Principle]) -> list[Principle]:
        names = [principle.name for principle in principles]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"principle names must be unique, repeated: {', '.join(repeated)}")
        return principles


def load_constitution(path: str | Path | None = None) -> Constitution:
    """Read and validate a constitution YAML (yaml.safe_load); None = preftune's default."""
    path = Path(path) if path is not None else DEFAULT_CONSTITUTION
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the constitution: {error.strerror}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: not valid YAML: {getattr(error, 'problem', error)}") from None
    try:
        return Constitution.model_validate(raw)
    except ValidationError as error:
        problems = [
            f"{'.'.join(str(part) for part in issue['loc']) or '(top level)'}: {issue['msg'].removeprefix('Value error, ')}"
            for issue in error.errors()
        ]
        raise ConfigError(f"{path}: invalid constitution:\n  " + "\n  ".join(problems)) from None


@dataclass(frozen=True)
class PromptRecord:
    """A prompt to constitute: plain `text`, or chat `messages` (then `text` is their rendering)."""

    text: str
    messages: list[dict[str, str]] | None
    source: str


def read_prompts(path: str | Path, tokenizer) -> list[PromptRecord]:
    """Every record's prompt; a record with neither a `prompt` string nor a `messages` list is a `DataError` at file:line."""
    return [_prompt_record(record, tokenizer) for record in read_records(path)]


def _prompt_record(record: RawRecord, tokenizer) -> PromptRecord:
    value = record.value
    if not isinstance(value, dict):
        raise record.error(f"a prompt record must be a JSON object, got {type(value).__name__}")
    if isinstance(value.get("prompt"), str):
        if not value["prompt"].strip():
            raise record.error("the prompt is empty", field="prompt")
        return PromptRecord(value["prompt"], None, record.source)
    messages = value.get("messages")
    if messages is None:
        raise record.error("expected a 'prompt' string or a 'messages' list", field="prompt")
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
    ):
        raise record.error("expected a non-empty list of {role, content} messages with string content", field="messages")
    if messages[-1]["role"] == "assistant":
        raise record.error("the conversation must end with a user turn for the model to answer", field="messages")
    if not getattr(tokenizer, "chat_template", None):
        raise record.error("chat 'messages' need a tokenizer with a chat template: use a chat/instruct model", field="messages")
    return PromptRecord(_render(tokenizer, messages, record), messages, record.source)


def _render(tokenizer, messages: list[dict[str, str]], record: RawRecord | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except TemplateError as error:
        if record is None:
            raise
        raise record.error(f"the chat template rejected the messages: {error}", field="messages") from None


@dataclass
class ConstituteReport:
    prompts: int
    already_done: int
    written: int
    output: Path


def prompt_sha256(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def stage_seed(seed: int, prompt_index: int, stage: str) -> int:
    """An independent seed per (run seed, prompt, stage), so a prompt's outcome does not depend on which others ran."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{stage}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def constitute(
    prompts: list[PromptRecord],
    output: str | Path,
    *,
    model,
    tokenizer,
    constitution: Constitution,
    settings: GenerationSettings,
    seed: int = 0,
    on_pair: Callable[[int], None] | None = None,
) -> ConstituteReport:
    """Write one critique-and-revise pair per prompt to `output` (JSONL), resuming a partial file.

    `settings` is used for all three generations (answer, critique, revision) with one sequence
    each; `on_pair(prompt_index)` is called after each line is on disk.
    """
    settings = settings.model_copy(update={"num_return_sequences": 1})
    output = Path(output)
    done = finished_prompts(output, prompts)
    output.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with output.open("a", encoding="utf-8") as sink:
        for index, prompt in enumerate(prompts):
            if index in done:
                continue
            record = _constitute_one(index, prompt, model, tokenizer, constitution, settings, seed)
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            sink.flush()
            os.fsync(sink.fileno())
            written += 1
            if on_pair is not None:
                on_pair(index)
    return ConstituteReport(len(prompts), len(done), written, output)


def _constitute_one(index, prompt: PromptRecord, model, tokenizer, constitution: Constitution, settings, seed) -> dict[str, Any]:
    principle = random.Random(stage_seed(seed, index, "principle")).choice(constitution.principles)
    chat = prompt.messages is not None
    stops = [] if chat else constitution.stop_strings
    settings = settings.model_copy(update={"stop_strings": stops})

    def complete(text: str, stage: str) -> str:
        ids = tokenizer(text, add_special_tokens=not chat).input_ids
        completion = generate(model, tokenizer, [ids], settings, seed=stage_seed(seed, index, stage)).texts[0]
        return _cut_stop(completion, stops)

    answer = complete(prompt.text, "answer")
    if chat:
        critique_messages = [
            *prompt.messages,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": principle.critique_request},
        ]
        critique = complete(_render(tokenizer, critique_messages), "critique")
        revision_messages = [
            *critique_messages,
            {"role": "assistant", "content": critique},
            {"role": "user", "content": principle.revision_request},
        ]
        revision = complete(_render(tokenizer, revision_messages), "revision")
    else:
        critique_context = prompt.text + answer + constitution.critique_turn.replace(REQUEST_PLACEHOLDER, principle.critique_request)
        critique = complete(critique_context, "critique")
        revision_context = (
            critique_context + critique + constitution.revision_turn.replace(REQUEST_PLACEHOLDER, principle.revision_request)
        )
        revision = complete(revision_context, "revision")
    return {
        "prompt": prompt.text,
        "chosen": revision,
        "rejected": answer,
        "principle": principle.name,
        "critique": critique,
        "source": "synthetic",
        "prompt_index": index,
    }


def _cut_stop(text: str, stops: list[str]) -> str:
    for stop in stops:
        position = text.find(stop)
        if position >= 0:
            text = text[:position]
    return text


def finished_prompts(output: Path, prompts: list[PromptRecord]) -> set[int]:
    """Indices already in `output`. A torn last line (no newline: the writer was killed mid-line) is cut off the file.

    Every complete line must be a pair this prompts file produced: its `prompt_index` in range and
    its prompt's SHA-256 equal to that prompt's; otherwise a `DataError` names the line.
    """
    if not output.is_file():
        return set()
    content = output.read_bytes()
    keep = content.rfind(b"\n") + 1
    if keep < len(content):
        logger.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", output, len(content) - keep)
        with output.open("r+b") as handle:
            handle.truncate(keep)
            handle.flush()
            os.fsync(handle.fileno())
    done: set[int] = set()
    try:
        text = content[:keep].decode("utf-8")
    except UnicodeDecodeError:
        raise DataError("not valid UTF-8 text: not a file `preftune constitute` wrote; use a new --output", path=str(output)) from None
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"not valid JSON: {error.msg}; remove the line or use a new --output", path=str(output), line=number) from None
        index = value.get("prompt_index") if isinstance(value, dict) else None
        if not isinstance(index, int) or not isinstance(value.get("prompt"), str):
            raise DataError("not a line written by `preftune constitute` (no prompt_index/prompt)", path=str(output), line=number)
        if not 0 <= index < len(prompts) or prompt_sha256(prompts[index].text) != prompt_sha256(value["prompt"]):
            raise DataError(
                f"written for a different prompt at index {index} than the prompts file holds: "
                "resume with the same prompts file and model, or use a new --output",
                path=str(output),
                line=number,
                field="prompt",
            )
        done.add(index)
    return done
