"""Reward functions: built-ins on hand examples, user functions by dotted path, weighted sums, settings errors."""

import math

import pytest

from preftune.errors import ConfigError, PreftuneError
from preftune.online.reward_model import build_reward_model, export_reward_model, score_texts
from preftune.online.rewards import (
    CombinedReward,
    contains_reward,
    exact_match_reward,
    length_reward,
    load_reward_function,
    regex_reward,
    validate_reward_terms,
)
from tests.support import load_test_tokenizer, save_tiny_model

PROMPTS = ["p1", "p2", "p3"]


def test_regex_search_and_format_match():
    completions = ["<think>x</think>\n<answer>4</answer>", "the answer is 4", "  <answer>4</answer>  "]
    assert regex_reward(r"\d")(PROMPTS, completions) == [1.0, 1.0, 1.0]
    format_check = regex_reward(r"(<think>.*</think>\s*)?<answer>.*</answer>", match="fullmatch")
    assert format_check(PROMPTS, completions) == [1.0, 0.0, 1.0]  # fullmatch of the stripped completion
    assert regex_reward("ANSWER", ignore_case=True)(PROMPTS, completions) == [1.0, 1.0, 1.0]
    assert regex_reward("ANSWER")(PROMPTS, completions) == [0.0, 0.0, 0.0]


def test_length_reward_is_linear_around_the_target():
    completions = ["one two three four", "one two", "w " * 8, ""]
    # target 4 words: |4-4|/4 = 0 → 1; |2-4|/4 = 0.5 → 0.5; |8-4|/4 = 1 → 0; |0-4|/4 = 1 → 0
    assert length_reward(4)(PROMPTS + ["p4"], completions) == [1.0, 0.5, 0.0, 0.0]
    assert length_reward(10, unit="characters")(["p"], ["abcdefgh"]) == [pytest.approx(0.8)]  # 1 − 2/10


def test_exact_match_against_a_reference_column():
    completions = ["  The answer is\n42 ", "<answer>41</answer> then <answer> 42</answer>", "no tags"]
    reference = ["the answer is 42", "42", "no tags"]
    assert exact_match_reward()(PROMPTS, completions, answer=reference) == [1.0, 0.0, 1.0]
    tagged = exact_match_reward(extract=r"<answer>(.*?)</answer>")
    assert tagged(PROMPTS, completions, answer=reference) == [0.0, 1.0, 0.0]  # last match; no match → 0
    strict = exact_match_reward(column="gold", normalize=False)
    assert strict(PROMPTS, completions, gold=["  The answer is\n42 ", "42", "No tags"]) == [1.0, 0.0, 0.0]
    with pytest.raises(PreftuneError, match="no column 'answer'.*gold"):
        exact_match_reward()(PROMPTS, completions, gold=reference)


def test_contains_reward():
    completions = ["I am sorry", "SORRY!", "fine"]
    assert contains_reward("sorry")(PROMPTS, completions) == [1.0, 0.0, 0.0]
    assert contains_reward("sorry", ignore_case=True)(PROMPTS, completions) == [1.0, 1.0, 0.0]


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards").mkdir()
    (tmp_path / "my_rewards" / "__init__.py").write_text("")
    (tmp_path / "my_rewards" / "scores.py").write_text(
        "NOT_CALLABLE = 3\n"
        "def polite(prompts, completions, **columns):\n"
        "    return [2.0 if 'please' in c else -1.0 for c in completions]\n"
        "def wrong_length(prompts, completions, **columns):\n"
        "    return [1.0]\n"
        "def not_a_number(prompts, completions, **columns):\n"
        "    return [float('nan')] * len(completions)\n"
        "class Graders:\n"
        "    @staticmethod\n"
        "    def by_length(prompts, completions, **columns):\n"
        "        return [float(len(c)) for c in completions]\n"
    )
    (tmp_path / "broken_rewards.py").write_text("import a_module_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_rewards.scores"


def test_user_functions_load_by_dotted_path_with_clear_errors(user_module):
    polite = load_reward_function(f"{user_module}:polite")
    assert polite(["p"], ["please sit", "sit"]) == [2.0, -1.0]
    assert load_reward_function(f"{user_module}:Graders.by_length")(["p"], ["abc"]) == [3.0]
    with pytest.raises(ConfigError, match="'my_rewards.nope:polite'.*module 'my_rewards.nope' not found"):
        load_reward_function("my_rewards.nope:polite")
    with pytest.raises(ConfigError, match="has no attribute 'missing'"):
        load_reward_function(f"{user_module}:missing")
    with pytest.raises(ConfigError, match="'NOT_CALLABLE' is a int, not callable"):
        load_reward_function(f"{user_module}:NOT_CALLABLE")
    with pytest.raises(ConfigError, match="importing 'broken_rewards' failed.*a_module_that_does_not_exist"):
        load_reward_function("broken_rewards:anything")
    with pytest.raises(ConfigError, match="expected 'package.module:function'"):
        load_reward_function("my_rewards.scores.polite")


def test_weighted_combination_of_builtins_and_a_user_function(user_module):
    terms = validate_reward_terms(
        [
            {"function": "contains", "text": "please", "weight": 0.5},
            {"function": f"{user_module}:polite", "weight": 2.0},
            {"function": "length", "target": 2},
            {"function": "length", "target": 4, "weight": -1.0},
        ]
    )
    reward = CombinedReward.from_terms(terms)
    scores = reward.score(["p", "p"], ["please sit", "sit down now"])
    # completion 0: 0.5·1 + 2·2 + 1·(1 − 0/2) − 1·(1 − 2/4) = 0.5 + 4 + 1 − 0.5 = 5.0
    # completion 1: 0.5·0 + 2·(−1) + 1·(1 − 1/2) − 1·(1 − 1/4) = −2 + 0.5 − 0.75 = −2.25
    assert scores.total == pytest.approx([5.0, -2.25])
    assert scores.per_function["contains"] == [1.0, 0.0]
    assert scores.per_function["length[2]"] == [1.0, 0.5] and scores.per_function["length[3]"] == [0.5, 0.75]
    assert reward(["p", "p"], ["please sit", "sit down now"]) == scores.total


def test_bad_outputs_of_a_reward_function_name_it(user_module):
    for name, message in (("wrong_length", "must return a list of 2 numbers, got 1 values"), ("not_a_number", "finite number")):
        reward = CombinedReward.from_terms(validate_reward_terms([{"function": f"{user_module}:{name}"}]))
        with pytest.raises(PreftuneError, match=f"'{user_module}:{name}'.*{message}"):
            reward(["p", "p"], ["a", "b"])


def test_settings_errors_name_the_term_and_field():
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.pattern: .*not a valid regular expression"):
        validate_reward_terms([{"function": "regex", "pattern": "("}])
    with pytest.raises(ConfigError, match=r"rewards\[1\]\.colour: Extra inputs"):
        validate_reward_terms([{"function": "contains", "text": "x"}, {"function": "contains", "text": "y", "colour": 1}])
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.function: .*unknown reward function 'regx'"):
        validate_reward_terms([{"function": "regx", "pattern": "a"}])
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.extract: .*exactly one capturing group"):
        validate_reward_terms([{"function": "exact_match", "extract": "(a)(b)"}])
    with pytest.raises(ConfigError, match=r"rewards\[0\]\.target"):
        validate_reward_terms([{"function": "length", "target": 0}])
    with pytest.raises(ConfigError, match="non-empty list"):
        validate_reward_terms([])


def test_reward_model_builtin_scores_like_the_model(tmp_path):
    tokenizer = load_test_tokenizer()
    model = build_reward_model(str(save_tiny_model(tmp_path / "lm")), tokenizer, seed=1)
    folder = export_reward_model(model, tokenizer, tmp_path / "rm")
    reward = CombinedReward.from_terms(validate_reward_terms([{"function": "reward_model", "path": str(folder), "weight": 2.0}]))
    prompts, completions = ["Q: hi?\nA:", "Q: why?\nA:"], [" hello", " because"]
    expected = score_texts(model, tokenizer, prompts, completions)
    assert reward(prompts, completions) == pytest.approx([2 * value for value in expected], abs=1e-5)
    assert all(math.isfinite(value) for value in expected) and expected[0] != expected[1]


def _named_answer(prompts, completions, answer, *, scale=1.0, **columns):
    return [scale] * len(completions)


def test_required_columns_are_exact_matchs_column_and_a_user_functions_parameters_without_defaults():
    from preftune.online.rewards import required_columns

    (exact,) = validate_reward_terms([{"function": "exact_match", "column": "solution"}])
    assert required_columns(exact) == ("solution",)
    (named,) = validate_reward_terms([{"function": "tests.test_online_rewards:_named_answer"}])
    assert required_columns(named) == ("answer",)  # scale has a default, **columns is optional
    (length,) = validate_reward_terms([{"function": "length", "target": 3}])
    assert required_columns(length) == ()
