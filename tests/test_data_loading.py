"""Loading preference files: readers, format detection and parsing, skip reasons, the real hh-rlhf files."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from preftune.data import Example, load_pairs
from preftune.errors import DataError

PAIR_RECORDS = [
    {"prompt": "Q: 2+2?\nA:", "chosen": " 4", "rejected": " 5"},
    {"prompt": "Say hi.", "chosen": "Hi! 😀", "rejected": "No."},
    {"prompt": "Name a colour.\n", "chosen": "Blue", "rejected": "Seven"},
]


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return str(path)


def texts(pairs: list[Example]) -> list[tuple[str, str, str]]:
    return [(pair.prompt, pair.chosen, pair.rejected) for pair in pairs]


# --- the real hh-rlhf files -------------------------------------------------------------------


def test_hh_rlhf_train_counts_and_skip_reasons(hh_train_path):
    pairs, report = load_pairs(hh_train_path)
    assert (report.format, report.read, report.kept, len(pairs)) == ("hh_rlhf", 1796, 1790, 1790)
    assert report.skipped == {"empty_answer": 4, "no_shared_prompt": 2}
    # Checked by hand: line 70's chosen answer is a lone space; 1297 and 1508 differ before the final turn.
    assert report.skipped_at["empty_answer"] == [f"{hh_train_path}:{line}" for line in (70, 402, 708, 848)]
    assert report.skipped_at["no_shared_prompt"] == [f"{hh_train_path}:{line}" for line in (1297, 1508)]
    assert "empty_answer 4 (e.g. line 70, line 402, line 708, ...)" in report.summary()


def test_hh_rlhf_validation_counts(hh_validation_path):
    pairs, report = load_pairs(hh_validation_path)
    assert (report.read, report.kept, report.skipped) == (289, 286, {"no_shared_prompt": 3})
    assert report.skipped_at["no_shared_prompt"] == [f"{hh_validation_path}:{line}" for line in (152, 252, 263)]


@pytest.mark.parametrize("split", ["train", "validation"])
def test_hh_rlhf_pairs_split_each_transcript_exactly(split, hh_train_path, hh_validation_path):
    path = {"train": hh_train_path, "validation": hh_validation_path}[split]
    raw = path.read_text(encoding="utf-8").splitlines()
    pairs, _ = load_pairs(path)
    for pair in pairs:
        record = json.loads(raw[int(pair.source.rsplit(":", 1)[1]) - 1])
        assert pair.prompt + pair.chosen == record["chosen"]
        assert pair.prompt + pair.rejected == record["rejected"]
        assert pair.prompt.endswith("\n\nAssistant:")
        assert "\n\nAssistant:" not in pair.chosen and "\n\nAssistant:" not in pair.rejected
        assert pair.chosen != pair.rejected
        assert pair.chosen.startswith(" ") and pair.chosen.strip()


def test_hh_rlhf_first_pair_by_hand(hh_train_path):
    pair = load_pairs(hh_train_path, max_samples=1)[0][0]
    assert pair.source == f"{hh_train_path}:1"
    assert pair.prompt.endswith("\n\nHuman: okay some of these do not have anything to do with pens\n\nAssistant:")
    assert pair.chosen.startswith(" No, sorry!  All of these involve a pen")
    assert pair.rejected.startswith(" There are lots of funny things you can do with pens")


def test_max_samples_keeps_the_first_kept_pairs(hh_train_path):
    pairs, report = load_pairs(hh_train_path, max_samples=70)
    # Line 70 (an empty answer) is read and skipped on the way to the 70th kept pair.
    assert (report.read, report.kept, report.skipped) == (71, 70, {"empty_answer": 1})
    assert pairs[-1].source == f"{hh_train_path}:71"


def test_hh_rlhf_skip_reasons_on_constructed_records(tmp_path):
    turn = "\n\nHuman: hi\n\nAssistant:"
    path = write_jsonl(
        tmp_path / "hh.jsonl",
        [
            {"chosen": turn + " Hello.", "rejected": turn + " Go away."},
            {"chosen": turn + " Same.", "rejected": turn + " Same."},
            {"chosen": turn + " ", "rejected": turn + " Fine."},
            {"chosen": "\n\nHuman: no marker", "rejected": "\n\nHuman: none here"},
            {"chosen": "\n\nHuman: a" + turn + " x", "rejected": "\n\nHuman: b" + turn + " y"},
        ],
    )
    pairs, report = load_pairs(path)
    assert texts(pairs) == [(turn, " Hello.", " Go away.")]
    assert report.skipped == {"identical_answers": 1, "empty_answer": 1, "no_shared_prompt": 2}


# --- readers ------------------------------------------------------------------------------------


def test_jsonl_bad_line_names_path_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(PAIR_RECORDS[0]) + "\n\n" + '{"prompt": "x", "chosen": \n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:3: not valid JSON") as caught:
        load_pairs(path)
    assert (caught.value.path, caught.value.line) == (str(path), 3)


def test_jsonl_ignores_blank_lines_and_keeps_line_numbers(tmp_path):
    path = tmp_path / "blank.jsonl"
    path.write_text("\n" + json.dumps(PAIR_RECORDS[0]) + "\n   \n" + json.dumps(PAIR_RECORDS[1]) + "\n", encoding="utf-8")
    pairs, report = load_pairs(path)
    assert report.read == 2
    assert [pair.source for pair in pairs] == [f"{path}:2", f"{path}:4"]


def test_missing_field_raises_naming_the_field_when_not_skipping(tmp_path):
    path = write_jsonl(tmp_path / "missing.jsonl", [PAIR_RECORDS[0], {"prompt": "p", "chosen": "c"}])
    with pytest.raises(DataError, match=rf"^{re.escape(path)}:2: missing field \[missing_field\] \(field 'rejected'\)$") as caught:
        load_pairs(path, skip_invalid=False)
    assert caught.value.field == "rejected"


def test_invalid_records_are_counted_when_skipping(tmp_path):
    records = [
        PAIR_RECORDS[0],
        {"prompt": "p", "chosen": "c"},  # missing rejected
        {"prompt": "p", "chosen": "c", "rejected": None},  # null counts as missing
        {"prompt": 3, "chosen": "c", "rejected": "r"},
        ["not", "an", "object"],
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"prompt": "p", "chosen": "\n ", "rejected": "r"},
    ]
    pairs, report = load_pairs(write_jsonl(tmp_path / "mixed.jsonl", records))
    assert texts(pairs) == [tuple(PAIR_RECORDS[0].values())]
    assert report.skipped == {"missing_field": 2, "wrong_type": 2, "identical_answers": 1, "empty_answer": 1}
    assert (report.read, report.kept) == (7, 1)


def test_identical_answers_raise_when_not_skipping(tmp_path):
    path = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "p", "chosen": "x", "rejected": "x"}])
    with pytest.raises(DataError, match=r":1: chosen and rejected answers are identical.*\[identical_answers\]"):
        load_pairs(path, skip_invalid=False)


def test_json_and_parquet_hold_the_same_records_as_jsonl(tmp_path):
    expected = texts(load_pairs(write_jsonl(tmp_path / "pairs.jsonl", PAIR_RECORDS))[0])
    (tmp_path / "list.json").write_text(json.dumps(PAIR_RECORDS), encoding="utf-8")
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": PAIR_RECORDS}), encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(PAIR_RECORDS), tmp_path / "pairs.parquet")
    for name in ("list.json", "wrapped.json", "pairs.parquet"):
        pairs, report = load_pairs(tmp_path / name)
        assert report.format == "pairs"
        assert texts(pairs) == expected
        assert pairs[2].source == f"{tmp_path / name}:record 3"


def test_json_record_errors_name_the_record(tmp_path):
    path = tmp_path / "records.json"
    path.write_text(json.dumps([PAIR_RECORDS[0], {"prompt": "p", "chosen": 1, "rejected": "r"}]), encoding="utf-8")
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: record 2: expected str, got int \[wrong_type\] \(field 'chosen'\)$"):
        load_pairs(path, skip_invalid=False)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("data.csv", "prompt,chosen,rejected\n", r"unsupported data file type '\.csv'"),
        ("data.json", '{"rows": 3, "ids": [], "more": []}', r"must hold a list of records.*under one of data, train"),
        ("data.json", "[{]", r"not valid JSON"),
        ("data.parquet", "not parquet", r"not a readable Parquet file"),
        ("empty.jsonl", "\n\n", r"no usable preference pairs"),
    ],
)
def test_malformed_files_raise(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        load_pairs(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_pairs(tmp_path / "absent.jsonl")


def test_forcing_the_wrong_format_reports_every_record(hh_validation_path):
    with pytest.raises(DataError, match=r"no usable preference pairs: .*\(pairs\): read 289, kept 0, skipped 289: missing_field 289"):
        load_pairs(hh_validation_path, format="pairs")


# --- chat format ----------------------------------------------------------------------------------

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
USER_HI = {"role": "user", "content": "Hi"}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def test_chat_format_renders_the_prompt_with_the_chat_template(tmp_path, bytebpe_tokenizer):
    records = [
        {"chosen": [USER_HI, assistant("Hello!")], "rejected": [USER_HI, assistant("Go away.")]},
        # TRL's conversational format: the shared prompt as its own message list.
        {"prompt": [USER_HI], "chosen": [assistant("Hello!")], "rejected": [assistant("Go away.")]},
        {"chosen": [USER_HI, assistant("a")], "rejected": [{"role": "user", "content": "Bye"}, assistant("b")]},
        {"chosen": [USER_HI], "rejected": [USER_HI, assistant("b")]},
        {"chosen": [USER_HI, {"role": "assistant", "content": ["parts"]}], "rejected": [USER_HI, assistant("b")]},
    ]
    pairs, report = load_pairs(write_jsonl(tmp_path / "chat.jsonl", records), tokenizer=bytebpe_tokenizer)
    assert report.format == "chat"
    prompt = SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert texts(pairs) == [(prompt, "Hello!", "Go away.")] * 2
    assert report.skipped == {"prompt_mismatch": 1, "no_assistant_answer": 1, "wrong_type": 1}


def test_chat_format_from_parquet(tmp_path, bytebpe_tokenizer):
    record = {"chosen": [USER_HI, assistant("Hello!")], "rejected": [USER_HI, assistant("Go away.")]}
    pq.write_table(pa.Table.from_pylist([record]), tmp_path / "chat.parquet")
    pairs, _ = load_pairs(tmp_path / "chat.parquet", tokenizer=bytebpe_tokenizer)
    assert texts(pairs) == [(SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "Hello!", "Go away.")]


def test_chat_format_without_a_chat_template_says_how_to_fix_it(tmp_path, metaspace_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"chosen": [USER_HI, assistant("a")], "rejected": [USER_HI, assistant("b")]}])
    for tokenizer in (None, metaspace_tokenizer):
        with pytest.raises(DataError, match=r"need a tokenizer with a chat template.*tokenizer\.chat_template"):
            load_pairs(path, tokenizer=tokenizer)


def test_the_shipped_readme_lists_exactly_the_records_skipped(hh_train_path, hh_validation_path):
    readme = (hh_train_path.parent / "README.md").read_text(encoding="utf-8")
    documented = {
        (name, int(line), reason) for name, line, reason in re.findall(r"^\| (\w+\.jsonl) \| (\d+) \| (\w+) \|", readme, flags=re.MULTILINE)
    }
    skipped = set()
    for path in (hh_train_path, hh_validation_path):
        _, report = load_pairs(path)
        for reason, origins in report.skipped_at.items():
            skipped |= {(path.name, int(origin.rsplit(":", 1)[1]), reason) for origin in origins}
    assert documented == skipped and len(skipped) == 9


@pytest.mark.parametrize(("split", "line", "reason"), [("train", 70, "empty_answer"), ("validation", 152, "no_shared_prompt")])
def test_skip_invalid_false_stops_at_the_first_documented_record(split, line, reason, hh_train_path, hh_validation_path):
    path = {"train": hh_train_path, "validation": hh_validation_path}[split]
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:{line}: .*\[{reason}\]") as caught:
        load_pairs(path, skip_invalid=False)
    assert caught.value.line == line
