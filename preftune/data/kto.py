"""Unpaired (KTO) data from paired data: each pair becomes a desirable and an undesirable example.

Files already in an unpaired format (`kto`, `sharegpt_kto`) are read by `preftune.data.formats`.
A paired file (any paired format) becomes unpaired data by `pairs_to_unpaired`: each pair gives
its chosen answer as a desirable example and its rejected answer as an undesirable one, both with
the pair's prompt. `preftune convert --to kto` writes that conversion to a JSONL file, and KTO
training does it on the fly (after the train/validation split, so the two halves of a pair never
straddle it), so a paired file can be trained with `loss_type: kto` directly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from preftune.atomic import atomic_write_text
from preftune.data.formats import UNPAIRED, format_kind, load_pairs
from preftune.data.records import Example, LoadReport


def pairs_to_unpaired(pairs: Sequence[Example]) -> list[Example]:
    """Each pair → (prompt, chosen, desirable) and (prompt, rejected, undesirable), in file order.

    Origins get " (chosen)" / " (rejected)" appended; provenance and each answer's score are kept.
    """
    examples = []
    for pair in pairs:
        for index, (name, label) in enumerate((("chosen", True), ("rejected", False))):
            score = None if pair.scores is None else (pair.scores[index],)
            examples.append(
                Example(pair.prompt, (pair.answers[index],), (label,), score, pair.provenance, f"{pair.origin} ({name})")
            )
    return examples


def as_unpaired(examples: Sequence[Example], format: str) -> list[Example]:
    """Unpaired examples as they are; pairs (from a paired `format`) split by `pairs_to_unpaired`."""
    return list(examples) if format_kind(format) == UNPAIRED else pairs_to_unpaired(examples)


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
