"""What to say about a record no known format reads: the closest format and the `data.columns` that would read it.

For each format, its required fields are matched to the record's fields by, in order: the same
name (or the format's own alias, e.g. ShareGPT's `conversations`), a close spelling
(`difflib`), a common synonym (`question` → prompt), then any remaining field of the right JSON
type in the record's order that is not named for another role. The closest format fills the
most of its fields (a missing one costs half a match); ties go to the format listed first.
"""

from __future__ import annotations

import difflib
from typing import Any

from preftune.data.fields import CLOSE_MATCH_CUTOFF, COLUMN_NAMES

# format -> its required fields as (preftune name, JSON type); in detection-priority order.
FORMAT_FIELDS: dict[str, tuple[tuple[str, type], ...]] = {
    "pairs": (("prompt", str), ("chosen", str), ("rejected", str)),
    "hh_rlhf": (("chosen", str), ("rejected", str)),
    "chat": (("chosen", list), ("rejected", list)),
    "sharegpt": (("messages", list), ("chosen", dict), ("rejected", dict)),
    "kto": (("prompt", str), ("completion", str), ("label", bool)),
    "sharegpt_kto": (("messages", list), ("label", bool)),
    "prompts": (("prompt", str),),
}
# A format's own spelling of one of preftune's names.
FORMAT_ALIASES: dict[str, dict[str, str]] = {
    "sharegpt": {"messages": "conversations"},
    "sharegpt_kto": {"label": "kto_tag"},
}
SYNONYMS: dict[str, tuple[str, ...]] = {
    "prompt": ("question", "instruction", "query", "input", "context", "prefix", "request"),
    "chosen": ("good", "better", "preferred", "winner", "accepted", "positive", "chosen_response", "response_chosen"),
    "rejected": ("bad", "worse", "dispreferred", "loser", "negative", "rejected_response", "response_rejected"),
    "completion": ("response", "output", "answer", "generation", "reply"),
    "label": ("desirable", "is_good", "good", "kto_tag", "thumbs_up"),
    "messages": ("conversations", "conversation", "dialog", "dialogue", "turns", "chat"),
}

RESERVED_NAMES = set(COLUMN_NAMES) | {alias for aliases in FORMAT_ALIASES.values() for alias in aliases.values()}


def closest_format(value: dict[str, Any]) -> tuple[str, dict[str, str], list[str]]:
    """(format, {preftune name: record field} for the fields it found, preftune names it did not find)."""
    best: tuple[float, str, dict[str, str], list[str]] | None = None
    for name in FORMAT_FIELDS:
        found, missing = _match(name, value)
        score = len(found) - 0.5 * len(missing)
        if best is None or score > best[0]:
            best = (score, name, found, missing)
    assert best is not None
    return best[1], best[2], best[3]


def unknown_format_message(value: dict[str, Any]) -> str:
    """E.g. "closest to pairs: has 'question', 'good', 'bad'; try data.columns: {prompt: question, chosen: good, rejected: bad}"."""
    name, found, missing = closest_format(value)
    fields = ", ".join(f"'{key}'" for key in list(value)[:12])
    wanted = ", ".join(field for field, _ in FORMAT_FIELDS[name])
    message = f"no known record format (fields: {fields or 'none'}); closest to {name} ({wanted})"
    if missing:
        message += f", but it has nothing for {', '.join(missing)}"
    renames = {field: key for field, key in found.items() if key != FORMAT_ALIASES.get(name, {}).get(field, field)}
    if renames and not missing:
        mapping = ", ".join(f"{field}: {key}" for field, key in renames.items())
        message += f"; try data.columns: {{{mapping}}}"
    return message


def _match(name: str, value: dict[str, Any]) -> tuple[dict[str, str], list[str]]:
    wanted = FORMAT_FIELDS[name]
    aliases = FORMAT_ALIASES.get(name, {})
    found: dict[str, str] = {}

    def free(kind: type) -> list[str]:
        taken = set(found.values())
        return [key for key, item in value.items() if key not in taken and _is(item, kind)]

    for field, kind in wanted:
        for own in (field, aliases.get(field)):
            if own is not None and own in free(kind):
                found[field] = own
                break
    for field, kind in wanted:
        if field not in found:
            close = difflib.get_close_matches(field, free(kind), n=1, cutoff=CLOSE_MATCH_CUTOFF)
            if close:
                found[field] = close[0]
    for field, kind in wanted:
        if field not in found:
            synonyms = [key for key in free(kind) if key.lower() in SYNONYMS.get(field, ())]
            if synonyms:
                found[field] = synonyms[0]
    for field, kind in wanted:
        # A field already named for another role (e.g. "rejected") is never taken as the prompt.
        anonymous = [key for key in free(kind) if key not in RESERVED_NAMES]
        if field not in found and anonymous:
            found[field] = anonymous[0]
    ordered = {field: found[field] for field, _ in wanted if field in found}
    return ordered, [field for field, _ in wanted if field not in found]


def _is(item: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(item, bool)
    return isinstance(item, kind) and not isinstance(item, bool)
