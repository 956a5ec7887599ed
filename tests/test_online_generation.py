"""The generation module on a tiny random Llama: KV cache, seeding, EOS / stop-string trimming, adapters."""

import pytest
import torch

from preftune.errors import PreftuneError
from preftune.model.lora import apply_lora
from preftune.online.generation import GenerationSettings, generate
from tests.support import load_test_tokenizer, tiny_llama

PROMPTS = ["Human: hello there\n\nAssistant:", "Tell me a story", "a"]


@pytest.fixture()
def tokenizer():
    return load_test_tokenizer()


@pytest.fixture()
def prompt_ids(tokenizer):
    return [tokenizer(text).input_ids for text in PROMPTS]


def _greedy(max_new_tokens=12, **changes):
    return GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0, **changes)


def test_greedy_with_kv_cache_equals_without_token_for_token(tokenizer, prompt_ids):
    model = tiny_llama(len(tokenizer))
    cached = generate(model, tokenizer, prompt_ids, _greedy(use_cache=True), seed=0)
    uncached = generate(model, tokenizer, prompt_ids, _greedy(use_cache=False), seed=0)
    assert cached.completion_ids == uncached.completion_ids
    assert all(len(ids) == 12 for ids in cached.completion_ids)  # no EOS from this model in 12 steps
    assert cached.stopped == [False, False, False]  # cut by max_new_tokens
    assert cached.prompt_index == [0, 1, 2]
    # left padding changes nothing: one prompt at a time gives the same completions
    alone = generate(model, tokenizer, prompt_ids, _greedy(batch_size=1), seed=0)
    assert alone.completion_ids == cached.completion_ids


def test_seeded_sampling_is_reproducible_and_leaves_the_callers_rng_alone(tokenizer, prompt_ids):
    model = tiny_llama(len(tokenizer))
    settings = GenerationSettings(max_new_tokens=10, temperature=1.0, top_p=0.95, top_k=50, num_return_sequences=3)
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    first = generate(model, tokenizer, prompt_ids, settings, seed=7)
    assert torch.rand(1).item() == before.item()  # the global RNG was forked, not consumed
    second = generate(model, tokenizer, prompt_ids, settings, seed=7)
    other = generate(model, tokenizer, prompt_ids, settings, seed=8)
    assert first.completion_ids == second.completion_ids
    assert first.texts == second.texts
    assert first.completion_ids != other.completion_ids
    assert first.prompt_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert len({tuple(ids) for ids in first.completion_ids}) > 3  # the samples differ within groups


def test_groups_are_prompt_major(tokenizer, prompt_ids):
    model = tiny_llama(len(tokenizer))
    greedy = generate(model, tokenizer, prompt_ids, _greedy(max_new_tokens=6), seed=0)
    # top_k=1 sampling is greedy, so each prompt's G rows equal its greedy completion
    grouped = generate(model, tokenizer, prompt_ids, GenerationSettings(max_new_tokens=6, top_k=1, num_return_sequences=2), seed=0)
    assert grouped.completion_ids == [ids for ids in greedy.completion_ids for _ in range(2)]


def test_eos_ends_and_trims_the_completion(prompt_ids):
    tokenizer = load_test_tokenizer()
    model = tiny_llama(len(tokenizer))
    free = generate(model, tokenizer, prompt_ids, _greedy(), seed=0).completion_ids
    # Declare the token the first prompt's greedy completion produces at step 4 to be the EOS.
    eos_id = free[0][3]
    first_hit = free[0].index(eos_id)
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos_id)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    assert tokenizer.eos_token_id == eos_id and tokenizer.pad_token_id != eos_id
    out = generate(model, tokenizer, prompt_ids, _greedy(), seed=0)
    assert out.completion_ids[0] == free[0][: first_hit + 1]  # EOS kept, generate's padding dropped
    assert out.stopped[0] is True
    for row, ids in enumerate(out.completion_ids[1:], start=1):
        expected = free[row][: free[row].index(eos_id) + 1] if eos_id in free[row] else free[row]
        assert ids == expected
        assert out.stopped[row] is (eos_id in free[row])


def test_stop_string_ends_the_completion(tokenizer, prompt_ids):
    model = tiny_llama(len(tokenizer))
    free = generate(model, tokenizer, prompt_ids[:1], _greedy(), seed=0)
    text = free.texts[0]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    out = generate(model, tokenizer, prompt_ids[:1], _greedy(stop_strings=[stop]), seed=0)
    ids = out.completion_ids[0]
    assert ids == free.completion_ids[0][: len(ids)]
    assert stop in tokenizer.decode(ids) and stop not in tokenizer.decode(ids[:-1])
    assert out.stopped == [True]


def test_adapter_on_differs_and_adapter_off_equals_the_base_model(tokenizer, prompt_ids):
    model = tiny_llama(len(tokenizer))
    base = generate(model, tokenizer, prompt_ids, _greedy(), seed=0)
    policy = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(len(name)))
    policy.train()
    with_adapter = generate(policy, tokenizer, prompt_ids, _greedy(), seed=0)
    without_adapter = generate(policy, tokenizer, prompt_ids, _greedy(), seed=0, use_adapter=False)
    assert without_adapter.completion_ids == base.completion_ids
    assert with_adapter.completion_ids != base.completion_ids
    assert policy.training  # mode restored


def test_settings_are_validated_and_vllm_is_refused(tokenizer, prompt_ids):
    with pytest.raises(ValueError, match="extra"):
        GenerationSettings(max_tokens=3)
    with pytest.raises(ValueError):
        GenerationSettings(top_p=0.0)
    with pytest.raises(ValueError, match="identical completions"):
        GenerationSettings(temperature=0.0, num_return_sequences=2)
    model = tiny_llama(len(tokenizer))
    with pytest.raises(PreftuneError, match="vllm"):
        generate(model, tokenizer, prompt_ids, GenerationSettings(backend="vllm"), seed=0)


def test_entropy_is_the_models_next_token_entropy_averaged_over_the_kept_tokens(tokenizer, prompt_ids):
    model = tiny_llama(len(tokenizer)).eval()
    # Sampling at temperature 2 with top-k: the recorded entropy is still the model's own (T = 1) distribution.
    settings = GenerationSettings(max_new_tokens=5, temperature=2.0, top_k=20, num_return_sequences=2)
    generations = generate(model, tokenizer, prompt_ids, settings, seed=3)
    for row, ids in enumerate(generations.completion_ids):
        prompt = prompt_ids[generations.prompt_index[row]]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : len(prompt) - 1 + len(ids)]
        probabilities = torch.softmax(logits.double(), dim=-1)
        by_hand = (-(probabilities * probabilities.log()).sum(dim=-1)).mean().item()
        assert generations.entropy[row] == pytest.approx(by_hand, rel=1e-4)
    # A uniform distribution over the vocabulary would be log V; a random tiny model is close to it, never above.
    assert all(0 < value <= torch.log(torch.tensor(float(len(tokenizer)))).item() + 1e-6 for value in generations.entropy)
