"""`preftune score`: a reward model's score for every record of a JSONL/JSON/Parquet file.

Each record's `prompt` (absent = "") + `completion` text is scored and written back with a `score`
field; a preference pair (`chosen` and `rejected`, no completion) gets `score_chosen` and
`score_rejected`. Scores come from `score_texts` (the head at the last token, eval mode, no gradient).
"""

from __future__ import annotations

import json
from pathlib import Path

from preftune.atomic import atomic_write_text
from preftune.data.readers import read_records
from preftune.model.loading import load_tokenizer
from preftune.online.reward_model import build_reward_model, score_texts


def score_file(
    model_path: str, data_path: str | Path, output: str | Path, *, prompt_field: str = "prompt",
    completion_field: str = "completion", batch_size: int = 8, max_length: int | None = None,
) -> int:
    """Write `output` = the records of `data_path` with their scores; returns how many records were scored."""
    records = []
    prompts: list[str] = []
    completions: list[str] = []
    slots: list[tuple[int, str]] = []  # (record index, field the score goes to)
    for record in read_records(data_path):
        value = record.value
        if not isinstance(value, dict):
            raise record.error("expected a JSON object")
        prompt = value.get(prompt_field, "")
        if not isinstance(prompt, str):
            raise record.error("expected a string", prompt_field)
        if completion_field in value:
            targets = [(completion_field, "score")]
        elif "chosen" in value and "rejected" in value:
            targets = [("chosen", "score_chosen"), ("rejected", "score_rejected")]
        else:
            raise record.error(f"no '{completion_field}' (or chosen/rejected) to score", completion_field)
        for field, score_field in targets:
            text = value[field]
            if not isinstance(text, str) or not (prompt + text):
                raise record.error("expected a non-empty string", field)
            prompts.append(prompt)
            completions.append(text)
            slots.append((len(records), score_field))
        records.append(dict(value))
    tokenizer = load_tokenizer(model_path)
    model = build_reward_model(model_path, tokenizer)
    scores = score_texts(model, tokenizer, prompts, completions, batch_size=batch_size, max_length=max_length)
    for (index, score_field), score in zip(slots, scores):
        records[index][score_field] = score
    atomic_write_text(output, "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    return len(records)
