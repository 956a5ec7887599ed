"""Write single-turn prompts from the shipped hh-rlhf harmlessness pairs as a prompt file for
`preftune constitute` (the answers are dropped: Constitutional AI makes its own pairs).

    python examples/online/hh_prompts.py --count 50 --output runs/online/prompts.jsonl

Each line is `{"prompt": "\\n\\nHuman: ...\\n\\nAssistant:", "source_line": N}`, the red-team
transcript format the data and the probes use. Only conversations with one human turn are kept,
so every prompt is a request the model answers from scratch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from preftune.atomic import atomic_write_text
from preftune.data.formats import load_pairs
from preftune.data.pipeline import resolve_data_path


def single_turn_prompts(spec: str, count: int) -> list[dict]:
    examples, _ = load_pairs(resolve_data_path(spec))
    prompts = []
    for example in examples:
        if example.prompt.count("\n\nHuman:") == 1:
            prompts.append({"prompt": example.prompt, "source_line": int(example.origin.rsplit(":", 1)[-1])})
        if len(prompts) == count:
            break
    return prompts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="hh-rlhf-harmless:train", help="a paired file or embedded 'name:split'")
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    prompts = single_turn_prompts(args.data, args.count)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(output, "".join(json.dumps(p) + "\n" for p in prompts))
    print(f"wrote {len(prompts)} prompts to {output}")


if __name__ == "__main__":
    main()
