"""The scalar reward model: build from a tiny causal-LM folder, Bradley–Terry training on a separable toy
preference, export → reload → same scores."""

import json
import random
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from preftune.errors import ModelError
from preftune.losses.bradley_terry import bradley_terry_loss
from preftune.online.reward_model import (
    build_reward_model,
    export_reward_model,
    reward_logits,
    score_texts,
    tokenize_texts,
)
from tests.support import load_test_tokenizer, save_tiny_model

WORDS = "the a cat dog sun tree river stone cloud house road blue green small tall quick slow".split()


def toy_pairs(count: int, seed: int) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected): the chosen answer is the rejected one with the word "good" inserted somewhere."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        prompt = "Question: " + " ".join(rng.choices(WORDS, k=4)) + "?\nAnswer:"
        words = rng.choices(WORDS, k=6)
        chosen = list(words)
        chosen.insert(rng.randrange(len(words) + 1), "good")
        pairs.append((prompt, " " + " ".join(chosen), " " + " ".join(words)))
    return pairs


def reloaded_names(folder) -> list[str]:
    with safe_open(folder / "model.safetensors", framework="pt") as weights:
        return list(weights.keys())


def accuracy(model, tokenizer, pairs) -> float:
    prompts = [prompt for prompt, _, _ in pairs]
    chosen = score_texts(model, tokenizer, prompts, [c for _, c, _ in pairs], batch_size=16)
    rejected = score_texts(model, tokenizer, prompts, [r for _, _, r in pairs], batch_size=16)
    return sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("tiny-lm"))


def test_lora_reward_model_learns_a_separable_preference_and_exports(model_dir, tmp_path):
    tokenizer = load_test_tokenizer()
    lora = SimpleNamespace(r=8, alpha=16, dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = build_reward_model(str(model_dir), tokenizer, lora=lora, seed=0)
    head = [p for name, p in model.named_parameters() if "score" in name and p.requires_grad]
    assert head, "the score head must train alongside the adapters"
    head_before = head[0].detach().clone()
    train, validation = toy_pairs(64, seed=0), toy_pairs(64, seed=1)
    assert accuracy(model, tokenizer, validation) < 0.95  # the untrained head does not already know

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(40):
        batch = random.Random(step).sample(train, 16)
        prompts = [prompt for prompt, _, _ in batch]
        token_ids = tokenize_texts(tokenizer, prompts * 2, [c for _, c, _ in batch] + [r for _, _, r in batch])
        rewards = reward_logits(model, token_ids, tokenizer.pad_token_id)
        loss = bradley_terry_loss(rewards[:16], rewards[16:]).losses.mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert not torch.equal(head[0].detach(), head_before)
    assert accuracy(model, tokenizer, validation) >= 0.95

    exported = export_reward_model(model, tokenizer, tmp_path / "reward-model")
    assert (exported / "model.safetensors").is_file()
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    assert len(config["id2label"]) == 1 and config["pad_token_id"] == tokenizer.pad_token_id
    assert not any("lora" in name for name in reloaded_names(exported))
    reloaded = build_reward_model(str(exported), load_test_tokenizer())
    prompts = [prompt for prompt, _, _ in validation[:8]]
    completions = [chosen for _, chosen, _ in validation[:8]]
    assert score_texts(reloaded, tokenizer, prompts, completions) == pytest.approx(
        score_texts(model, tokenizer, prompts, completions), abs=1e-5
    )


def test_scores_do_not_depend_on_batching_or_padding(model_dir):
    tokenizer = load_test_tokenizer()
    model = build_reward_model(str(model_dir), tokenizer, seed=3)
    prompts = ["Question: a?\nAnswer:", "Question: a much longer question about the river?\nAnswer:", "Q:"]
    completions = [" yes", " the river is long and blue", " no"]
    together = score_texts(model, tokenizer, prompts, completions, batch_size=3)
    alone = score_texts(model, tokenizer, prompts, completions, batch_size=1)
    assert together == pytest.approx(alone, abs=1e-5)
    assert len(set(together)) == 3


def test_a_text_ending_with_the_pad_token_is_refused(model_dir):
    tokenizer = load_test_tokenizer()
    model = build_reward_model(str(model_dir), tokenizer)
    with pytest.raises(ModelError, match="pad token"):
        score_texts(model, tokenizer, ["Q:"], [" yes" + tokenizer.pad_token])
