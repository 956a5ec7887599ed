import json
import math

import pytest

from preftune.config import DataSettings
from preftune.data import Example, load_pairs
from preftune.data.audit import (
    audit_pairs,
    audit_records,
    audit_unpaired,
    length_balance,
    normalize_text,
    wilson_interval,
)
from preftune.data.pipeline import prepare_examples, resolve_data_path
from preftune.errors import ConfigError, DataError
from tests.support import load_test_tokenizer


def pair(prompt, chosen, rejected, line):
    return Example.pair(prompt, chosen, rejected, f"f.jsonl:{line}")


def pairs_with_differences(differences, start=1):
    """Pairs whose chosen − rejected character length is each given difference."""
    return [pair(f"q{i}", "x" * (10 + d), "x" * 10, start + i) for i, d in enumerate(differences)]


def test_normalisation_folds_case_whitespace_and_punctuation_only():
    assert normalize_text("  Hello,   World!\n") == "hello world"
    assert normalize_text("ＡＢＣ") == "abc"  # NFKC folds full-width letters
    assert normalize_text("hello world") != normalize_text("hello word")


def test_duplicates_identical_and_empty_answers_are_counted_exactly():
    pairs = [
        pair("Q", "Yes.", "No", 1),
        pair("Q", "Yes.", "No", 2),  # exact repeat of line 1
        pair("q ", "yes", "no!", 3),  # near repeat of line 1 (case, space, punctuation)
        pair("Other", "Same answer", "same answer.", 4),  # identical after normalisation only
        pair("Third", "   ", "text", 5),  # empty chosen
    ]
    audit = audit_pairs(pairs)
    assert audit.count == 5
    assert audit.exact_duplicates == 1
    assert audit.near_duplicates == 2
    assert audit.repeated_prompts == 1  # "Q" twice; "q " differs exactly
    assert audit.duplicate_examples == ["f.jsonl:2 repeats f.jsonl:1"]
    assert audit.identical_pairs == 0
    assert audit.identical_after_normalization == 1
    assert audit.empty_answers == {"chosen": 1, "rejected": 0}
    assert audit.duplicate_rate == pytest.approx(2 / 5)
    assert any("exact duplicate" in w for w in audit.warnings)
    assert any("empty answers" in w for w in audit.warnings)


def test_length_statistics_in_characters_and_tokens():
    pairs = [pair("a" * n, "b" * (2 * n), "c", n) for n in (1, 2, 3, 4, 10)]
    stats = audit_pairs(pairs).lengths["prompt"]
    assert (stats.min, stats.median, stats.max, stats.mean) == (1, 3, 10, 4)
    assert stats.p90 == pytest.approx(4 + 0.6 * (10 - 4))  # linear interpolation at rank 0.9 · 4 = 3.6
    tokenizer = load_test_tokenizer()
    token_audit = audit_pairs(pairs, tokenizer)
    assert token_audit.unit == "tokens"
    expected = [len(tokenizer("b" * (2 * n), add_special_tokens=False)["input_ids"]) for n in (1, 2, 3, 4, 10)]
    assert token_audit.lengths["chosen"].max == max(expected)
    assert token_audit.lengths["chosen"].mean == pytest.approx(sum(expected) / 5)


def test_length_bias_share_mean_and_correlation_by_hand():
    bias = audit_pairs(pairs_with_differences([3, 1, 0])).length_bias
    assert (bias.chosen_longer, bias.chosen_shorter, bias.equal_length, bias.compared) == (2, 0, 1, 2)
    assert bias.share_chosen_longer == 1.0
    assert bias.mean_difference == pytest.approx(4 / 3)
    # points (3,+1) (1,+1) (0,+1) (-3,-1) (-1,-1) (0,-1): r = mean(d)/rms(d) = (4/3) / sqrt(10/3)
    assert bias.correlation == pytest.approx((4 / 3) / math.sqrt(10 / 3))
    mixed = audit_pairs(pairs_with_differences([2, -2])).length_bias
    assert mixed.correlation == pytest.approx(0.0)
    assert mixed.share_chosen_longer == 0.5


def test_wilson_interval_matches_the_textbook_value():
    low, high = wilson_interval(7, 10)
    assert low == pytest.approx(0.3968, abs=1e-4)
    assert high == pytest.approx(0.8922, abs=1e-4)


def test_longer_is_better_warning_needs_the_share_and_the_interval():
    flagged = audit_pairs(pairs_with_differences([5] * 70 + [-5] * 30))
    assert flagged.length_bias.direction == "longer"
    assert any("longer is better" in w for w in flagged.warnings)
    # 7 of 10 exceeds 60% but its interval (0.40, 0.89) includes 0.5: not flagged.
    small = audit_pairs(pairs_with_differences([5] * 7 + [-5] * 3))
    assert small.length_bias.direction is None and not small.warnings
    # exactly 60% of 1000 is not above the threshold
    at_threshold = audit_pairs(pairs_with_differences([1] * 600 + [-1] * 400))
    assert at_threshold.length_bias.direction is None
    shorter = audit_pairs(pairs_with_differences([5] * 30 + [-5] * 70))
    assert shorter.length_bias.direction == "shorter"
    assert any("shorter is better" in w for w in shorter.warnings)


def test_format_and_script_heuristics():
    pairs = [
        pair("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", "hello", "go away", 1),
        pair("\n\nHuman: hi\n\nAssistant:", " hello", " no", 2),
        pair("Привет, как дела?", "Хорошо", "Плохо", 3),
        pair("你好", "你好吗", "不", 4),
    ]
    audit = audit_pairs(pairs)
    assert audit.formats == {"plain": 2, "chat_template": 1, "transcript": 1}
    assert audit.scripts == {"LATIN": 2, "CYRILLIC": 1, "CJK": 1}
    assert audit.ascii_only == 2


def test_unpaired_audit_counts_labels_conflicts_and_length_bias():
    examples = [
        Example.unpaired("p", "xxxxx", True, "k:1"),
        Example.unpaired("p", "yyyyy", True, "k:2"),
        Example.unpaired("p", "x", False, "k:3"),
        Example.unpaired("p", "zzzzz", False, "k:4"),
        Example.unpaired("p", "xxxxx", False, "k:5"),  # same text as k:1 with the other label
    ]
    audit = audit_records(examples)
    assert audit.kind == "unpaired"
    assert audit.labels == {"desirable": 2, "undesirable": 3}
    assert audit.conflicting_labels == 1
    assert audit.exact_duplicates == 0  # the label differs
    bias = audit.length_bias
    # desirable lengths [5, 5] vs undesirable [1, 5, 5]: 2 couples longer, 4 equal, none shorter
    assert (bias.chosen_longer, bias.chosen_shorter, bias.equal_length) == (2, 0, 4)
    assert bias.share_chosen_longer == 1.0
    assert bias.mean_difference == pytest.approx(5 - 11 / 3)
    assert bias.interval is None and bias.direction is None  # too few examples of each label to judge


def test_unpaired_length_bias_is_flagged_with_a_seeded_bootstrap_interval():
    examples = [Example.unpaired(f"p{i}", "long answer " * (1 + i % 3), True, f"k:{i}") for i in range(30)]
    examples += [Example.unpaired(f"p{i}", "no" if i % 4 else "long answer long answer", False, f"k:{30 + i}") for i in range(30)]
    audit = audit_unpaired(examples)
    bias = audit.length_bias
    assert bias.direction == "longer" and bias.interval[0] > 0.5
    assert any("longer is better" in w and "per label" in w for w in audit.warnings)
    assert audit_unpaired(examples).to_dict() == audit.to_dict()  # the bootstrap is seeded
    assert audit_unpaired(examples, seed=1).length_bias.interval != bias.interval


def test_audit_is_json_serialisable_and_summarised():
    audit = audit_pairs(pairs_with_differences([5] * 70 + [-5] * 30))
    data = json.loads(json.dumps(audit.to_dict()))
    assert data["length_bias"]["chosen_longer"] == 70
    assert data["lengths"]["chosen"]["max"] == 15
    assert "chosen longer in 70.0% of 100 pairs" in audit.summary()


def test_length_balance_removes_exactly_the_reported_bias():
    pairs = pairs_with_differences([4, 3, 2, -1, 5, 0, -2, 1])  # 5 longer, 2 shorter, 1 equal
    kept, report = length_balance(pairs, seed=3)
    assert report.before == {"chosen_longer": 5, "chosen_shorter": 2, "equal_length": 1}
    assert report.after == {"chosen_longer": 2, "chosen_shorter": 2, "equal_length": 1}
    assert (report.removed_chosen_longer, report.removed_chosen_shorter) == (3, 0)
    removed = [p for p in pairs if p not in kept]
    assert len(removed) == 3 and all(len(p.chosen) > len(p.rejected) for p in removed)
    assert kept == [p for p in pairs if p in kept]  # original order
    after = audit_pairs(kept).length_bias
    assert (after.chosen_longer, after.chosen_shorter, after.share_chosen_longer) == (2, 2, 0.5)
    assert length_balance(pairs, seed=3)[0] == kept


def test_length_balance_on_the_shipped_data():
    pairs, _ = load_pairs(resolve_data_path("hh-rlhf-harmless:train"), max_samples=400)
    before = audit_pairs(pairs).length_bias
    kept, report = length_balance(pairs, seed=0)
    after = audit_pairs(kept).length_bias
    assert after.share_chosen_longer == 0.5
    assert report.removed == abs(before.chosen_longer - before.chosen_shorter) == len(pairs) - len(kept)
    assert after.equal_length == before.equal_length


def test_length_balance_refuses_to_remove_everything():
    with pytest.raises(DataError, match="every pair"):
        length_balance(pairs_with_differences([1, 2, 3]))


def test_the_pipeline_balances_and_audits_the_training_split():
    settings = DataSettings(max_train_samples=40, max_validation_samples=4, max_length=96, length_balance=True)
    tokenizer = load_test_tokenizer()
    data = prepare_examples(settings, tokenizer, seed=0, paired=True)
    balance = data.balance
    assert balance.unit == "tokens"
    assert balance.after["chosen_longer"] == balance.after["chosen_shorter"]
    assert balance.removed == abs(balance.before["chosen_longer"] - balance.before["chosen_shorter"]) > 0
    assert data.audit.count == 40 - balance.removed
    assert data.audit.unit == "tokens"
    assert data.audit.length_bias.share_chosen_longer == 0.5
    assert "length balance (tokens)" in data.summary()
    unbalanced = prepare_examples(DataSettings(max_train_samples=40, max_validation_samples=4, max_length=96), tokenizer, seed=0, paired=True)
    assert unbalanced.balance is None and unbalanced.audit.count == 40


def test_audit_records_tells_pairs_from_labelled_examples_and_counts_provenance():
    pairs = [pair("q", "a", "b", 1), Example.pair("q2", "c", "d", "f.jsonl:2", provenance="synthetic")]
    audit = audit_records(pairs)
    assert audit.kind == "paired"  # a pair also has a `.completion` view; its two answers decide
    assert audit.provenance == {"unknown": 1, "synthetic": 1}
    assert "provenance: unknown 1 (50.0%), synthetic 1 (50.0%)" in audit.summary()
    with pytest.raises(DataError, match="3 answer"):
        audit_records([Example("q", ("a", "b", "c"), origin="g.jsonl:1")])


def test_the_pipeline_refuses_to_length_balance_unpaired_records(tmp_path):
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": " a" * (1 + i), "label": i % 2 == 0}) + "\n" for i in range(6)))
    settings = DataSettings(train_file=str(path), validation_file=None, validation_split=2, max_length=64, length_balance=True)
    with pytest.raises(ConfigError, match="balances pairs"):
        prepare_examples(settings, load_test_tokenizer(), seed=0, paired=False)
    data = prepare_examples(settings.model_copy(update={"length_balance": False}), load_test_tokenizer(), seed=0, paired=False)
    assert data.audit.kind == "unpaired" and data.audit.count == 4
