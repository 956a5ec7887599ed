"""Build the two small test tokenizers under tests/assets/tokenizers/ (run once; the output is committed).

Both are trained on the shared hh-rlhf train transcripts, so they tokenise the test data with
realistic merges, and saved as Hugging Face folders that `AutoTokenizer.from_pretrained` loads
offline:

- `bytebpe/`: byte-level BPE like GPT-2/SmolLM2: no BOS, EOS `<|im_end|>`, pad `<|endoftext|>`,
  a ChatML chat template. The default tokenizer of the tiny test models.
- `metaspace/`: sentencepiece-style BPE like Llama-2: Metaspace pre-tokenizer (a "▁" is prepended
  to the start of the text), byte fallback, `<s>` added by the post-processor, EOS `</s>`. The case
  that stresses the prompt/answer boundary.

Usage: python tests/assets/build_tokenizers.py
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

ASSETS = Path(__file__).resolve().parent / "tokenizers"
TRAIN_FILE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "hh-rlhf-harmless" / "train.jsonl"
VOCAB_SIZE = 1024

# SmolLM2-135M-Instruct's template with a shorter default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def training_texts() -> list[str]:
    texts = []
    with TRAIN_FILE.open(encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            texts += [record["chosen"], record["rejected"]]
    return texts


def build_bytebpe(texts: list[str]) -> PreTrainedTokenizerFast:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def build_metaspace(texts: list[str]) -> PreTrainedTokenizerFast:
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    byte_pieces = [f"<0x{byte:02X}>" for byte in range(256)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - len(byte_pieces), special_tokens=specials, show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)

    # Byte fallback needs the 256 "<0xNN>" pieces as ordinary vocabulary entries (ids right after
    # the specials, as in Llama-2); the trainer cannot add them, so rewrite the vocabulary.
    state = json.loads(tokenizer.to_str())
    learned = sorted(state["model"]["vocab"].items(), key=lambda item: item[1])
    ordered = specials + byte_pieces + [piece for piece, _ in learned if piece not in specials]
    state["model"]["vocab"] = {piece: index for index, piece in enumerate(ordered)}
    tokenizer = Tokenizer.from_str(json.dumps(state))

    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def main() -> None:
    texts = training_texts()
    for name, build in (("bytebpe", build_bytebpe), ("metaspace", build_metaspace)):
        folder = ASSETS / name
        build(texts).save_pretrained(folder)
        print(f"wrote {folder}")


if __name__ == "__main__":
    main()
