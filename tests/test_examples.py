"""The shipped example configs stay valid as the schema changes, and the prompt extractor writes
what `preftune constitute` reads."""

import json
from pathlib import Path

import pytest

from preftune.config import load_config
from preftune.online.constitute import read_prompts

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("path", sorted((EXAMPLES / "online").glob("*.yaml")), ids=lambda p: p.name)
def test_every_online_example_config_validates_for_its_method(path):
    config = load_config(path)
    assert config.output_dir.startswith("runs/online/")
    assert config.method_spec.name == config.method.loss_type


def test_hh_prompts_writes_single_turn_prompts_that_constitute_reads(tmp_path):
    from examples.online.hh_prompts import main

    output = tmp_path / "prompts.jsonl"
    main(["--count", "5", "--output", str(output)])
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == 5
    for record in records:
        assert record["prompt"].startswith("\n\nHuman:") and record["prompt"].endswith("\n\nAssistant:")
        assert record["prompt"].count("\n\nHuman:") == 1
        assert isinstance(record["source_line"], int)
    assert [p.text for p in read_prompts(output, tokenizer=None)] == [r["prompt"] for r in records]
