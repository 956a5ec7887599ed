import json
import math

import pytest

from preftune.config import DataSettings
from preftune.data import Example
from preftune.data.mixing import SourceGroup, groups_by_provenance, histogram_kl, kl_divergence, mix_sources
from preftune.data.pipeline import prepare_examples
from preftune.errors import ConfigError, DataError
from tests.support import load_test_tokenizer


def pairs(n, tag, difference=0, provenance=None):
    return [
        Example.pair(f"{tag} q{i}", "x" * (5 + difference), "x" * 5, f"{tag}.jsonl:{i + 1}", provenance=provenance) for i in range(n)
    ]


def test_kl_of_two_known_histograms():
    # P = (1/2, 1/2), Q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3)
    assert kl_divergence([1, 1], [3, 1], smoothing=0) == pytest.approx(0.5 * math.log(4 / 3))
    assert kl_divergence([3, 1], [3, 1], smoothing=0) == 0.0
    # smoothing 0.5: P = (0.5, 2.5)/3, Q = (2.5, 0.5)/3 → 1/6 ln(1/5) + 5/6 ln 5 = 2/3 ln 5
    assert kl_divergence([0, 2], [2, 0], smoothing=0.5) == pytest.approx(2 / 3 * math.log(5))
    assert kl_divergence([0, 2], [2, 0], smoothing=0) == math.inf


def test_histogram_kl_bins_the_pooled_range():
    # two bins over [0, 1]: counts (2, 2) against (3, 1)
    assert histogram_kl([0, 0, 1, 1], [0, 0, 0, 1], bins=2, smoothing=0) == pytest.approx(0.5 * math.log(4 / 3))
    assert histogram_kl([3, 3], [3, 3, 3]) == 0.0


def test_human_ratio_is_a_floor_met_by_subsampling_synthetic_data():
    groups = [
        SourceGroup(pairs(70, "human"), "human", name="h"),
        SourceGroup(pairs(30, "synthA"), "synthetic", name="a"),
        SourceGroup(pairs(20, "synthB"), "synthetic", name="b"),
    ]
    mixed, report = mix_sources(groups, human_ratio=0.7, seed=1)
    # at most floor(70 · 0.3 / 0.7) = 30 synthetic pairs, split 30:20 → 18 + 12
    assert [g.kept for g in report.groups] == [70, 18, 12]
    assert [g.subsampled_for_ratio for g in report.groups] == [0, 12, 8]
    assert report.achieved_human_ratio == pytest.approx(0.7)
    assert len(mixed) == 100
    assert [p.prompt for p in mixed[:70]] == [p.prompt for p in groups[0].pairs]  # human data is never touched
    assert [p.provenance for p in mixed] == ["human"] * 70 + ["synthetic"] * 30  # the group's provenance fills the pairs'
    synth_a = [p for p in mixed if p.prompt.startswith("synthA")]
    assert synth_a == sorted(synth_a, key=lambda p: int(p.source.rsplit(":", 1)[1]))  # file order kept
    assert mix_sources(groups, human_ratio=0.7, seed=1)[0] == mixed


def test_a_floor_already_met_changes_nothing_and_ratio_one_drops_all_synthetic():
    groups = [SourceGroup(pairs(80, "human"), "human"), SourceGroup(pairs(20, "synth"), "synthetic")]
    mixed, report = mix_sources(groups, human_ratio=0.7)
    assert len(mixed) == 100 and report.achieved_human_ratio == pytest.approx(0.8)
    mixed, report = mix_sources(groups, human_ratio=1.0)
    assert len(mixed) == 80 and report.achieved_human_ratio == 1.0


def test_weight_is_the_fraction_of_a_group_used():
    groups = [SourceGroup(pairs(10, "human"), "human", weight=0.5), SourceGroup(pairs(8, "synth"), "synthetic", weight=0.25)]
    mixed, report = mix_sources(groups)
    assert [(g.after_weight, g.kept) for g in report.groups] == [(5, 5), (2, 2)]
    with pytest.raises(ConfigError, match="weight"):
        SourceGroup(pairs(2, "h"), "human", weight=1.5)
    with pytest.raises(ConfigError, match="provenance"):
        SourceGroup(pairs(2, "h"), "people")


def test_a_floor_without_human_data_is_an_error():
    with pytest.raises(DataError, match="no human pairs"):
        mix_sources([SourceGroup(pairs(5, "s"), "synthetic")], human_ratio=0.5)


def test_kl_warning_on_the_default_length_statistic():
    same = mix_sources([SourceGroup(pairs(20, "h", 2), "human"), SourceGroup(pairs(20, "s", 2), "synthetic")])[1]
    assert same.kl_after == 0.0 and not same.warnings
    assert "length difference" in same.statistic
    human = pairs(20, "h", 0) + pairs(20, "h2", 10)
    synthetic = pairs(40, "s", 10)
    report = mix_sources([SourceGroup(human, "human"), SourceGroup(synthetic, "synthetic")])[1]
    # two occupied bins of 20 (first, last): P = (0.5, 40.5)/50, Q = (20.5, 20.5)/50 over the other 18 bins at 0.5/50 each
    p = [0.5 / 50] + [0.5 / 50] * 18 + [40.5 / 50]
    q = [20.5 / 50] + [0.5 / 50] * 18 + [20.5 / 50]
    expected = sum(a * math.log(a / b) for a, b in zip(p, q))
    assert report.kl_after == pytest.approx(expected)
    assert report.kl_after > 0.15
    assert any("KL(synthetic ‖ human)" in w for w in report.warnings)


def test_outlier_filter_keeps_synthetic_pairs_inside_the_human_quantile_range():
    human = pairs(100, "h")
    synthetic = pairs(3, "s")
    groups = [
        SourceGroup(human, "human", statistic=list(range(100))),  # quantiles 5% → 4.95, 95% → 94.05
        SourceGroup(synthetic, "synthetic", statistic=[-10.0, 50.0, 200.0]),
    ]
    mixed, report = mix_sources(groups, filter_outliers=True)
    assert report.outlier_range == pytest.approx((4.95, 94.05))
    assert report.groups[1].filtered_outliers == 2
    assert [p.origin for p in mixed[100:]] == [synthetic[1].origin]
    assert report.statistic == "the given statistic"
    assert report.kl_before is not None and report.kl_after is not None
    with pytest.raises(ConfigError, match="every source group"):
        mix_sources([SourceGroup(human, "human", statistic=[0.0] * 100), SourceGroup(synthetic, "synthetic")])


def test_groups_from_a_parallel_list_or_a_mapping():
    items = pairs(4, "x")
    by_list = groups_by_provenance(items, ["human", "synthetic", "human", "synthetic"])
    assert [(g.provenance, [p.source for p in g.pairs]) for g in by_list] == [
        ("human", ["x.jsonl:1", "x.jsonl:3"]),
        ("synthetic", ["x.jsonl:2", "x.jsonl:4"]),
    ]
    by_mapping = groups_by_provenance(items, {p.source: "human" for p in items})
    assert len(by_mapping) == 1 and by_mapping[0].pairs == items


def test_groups_from_the_records_own_provenance_and_the_source_wins_over_it():
    items = pairs(2, "h", provenance="human") + pairs(3, "s", provenance="synthetic") + pairs(1, "h2", provenance="human")
    groups = groups_by_provenance(items)
    assert [(g.provenance, [p.origin for p in g.pairs]) for g in groups] == [
        ("human", ["h.jsonl:1", "h.jsonl:2", "h2.jsonl:1"]),
        ("synthetic", ["s.jsonl:1", "s.jsonl:2", "s.jsonl:3"]),
    ]
    mixed, _ = mix_sources(groups)
    assert all(any(p is q for q in items) for p in mixed)  # pairs that already say their group's provenance come back as they are
    with pytest.raises(DataError, match=r"1 of 3 pairs carry no provenance \(e.g. x.jsonl:1\)"):
        groups_by_provenance(pairs(1, "x") + pairs(2, "y", provenance="human"))
    # a file listed as synthetic whose records say human: the source sets the provenance, and says so
    mixed, report = mix_sources([SourceGroup(pairs(4, "h"), "human"), SourceGroup(pairs(2, "s", provenance="human"), "synthetic")])
    assert [p.provenance for p in mixed] == ["human"] * 4 + ["synthetic"] * 2
    assert [g.relabelled for g in report.groups] == [0, 2]
    assert "2 of them said they were human: relabelled synthetic" in report.summary()
    assert any("sets the provenance of the whole file" in w for w in report.warnings)


def write_pairs(path, n, tag, provenance=lambda i: None):
    records = []
    for i in range(n):
        record = {"prompt": f"{tag} {i}?", "chosen": " yes" * (1 + i % 3), "rejected": " no"}
        if provenance(i) is not None:
            record["provenance"] = provenance(i)
        records.append(json.dumps(record) + "\n")
    path.write_text("".join(records))
    return str(path)


def test_the_pipeline_mixes_data_sources_with_the_human_floor(tmp_path):
    settings = DataSettings(
        sources=[
            {"path": write_pairs(tmp_path / "human.jsonl", 14, "human"), "source": "human"},
            {"path": write_pairs(tmp_path / "synthetic.jsonl", 10, "synthetic"), "source": "synthetic"},
        ],
        human_ratio=0.7,
        validation_file=None,
        validation_split=2,
        max_length=64,
    )
    data = prepare_examples(settings, load_test_tokenizer(), seed=0, paired=True)
    assert settings.train_file is None
    assert [g.kept for g in data.mix.groups] == [14, 6]  # floor(14 · 0.3 / 0.7) = 6 synthetic pairs
    assert len(data.load_reports) == 2
    assert len(data.train) + len(data.validation) == 20  # the split comes after the mix
    assert data.audit.count == 18
    assert "mix: 20 pairs, human share 0.700 (floor 0.7)" in data.summary()
    assert "tokens" in data.mix.statistic


def test_the_pipeline_applies_the_floor_to_one_file_by_the_provenance_its_records_carry(tmp_path):
    # 14 records: every third one synthetic (i = 0, 3, 6, 9, 12 → 5 synthetic, 9 human)
    path = write_pairs(tmp_path / "mixed.jsonl", 14, "q", provenance=lambda i: "synthetic" if i % 3 == 0 else "human")
    settings = DataSettings(train_file=path, human_ratio=0.75, validation_file=None, validation_split=0, max_length=64)
    data = prepare_examples(settings, load_test_tokenizer(), seed=0, paired=True)
    # at most floor(9 · 0.25 / 0.75) = 3 synthetic pairs: 12 kept, in file order
    assert [g.kept for g in data.mix.groups] == [9, 3]
    assert [g.subsampled_for_ratio for g in data.mix.groups] == [0, 2]
    lines = [int(example.origin.rsplit(":", 1)[1]) for example in data.train]
    assert len(lines) == 12 and lines == sorted(lines)
    assert sum(example.provenance == "synthetic" for example in data.train) == 3
    assert not data.warnings


def test_human_ratio_without_provenance_is_a_recorded_no_op(tmp_path):
    path = write_pairs(tmp_path / "plain.jsonl", 10, "q")
    settings = DataSettings(train_file=path, human_ratio=0.3, validation_file=None, validation_split=2, max_length=64)
    data = prepare_examples(settings, load_test_tokenizer(), seed=0, paired=True)
    assert data.mix is None and len(data.train) == 8
    (warning,) = data.warnings
    assert warning.startswith("data.human_ratio 0.3 NOT applied: 10 of the 10 records of")
    assert "data.sources" in warning
    assert f"data warning: {warning}" in data.summary()
    # the same file with no mixing setting: nothing to say
    plain = prepare_examples(settings.model_copy(update={"human_ratio": None}), load_test_tokenizer(), seed=0, paired=True)
    assert plain.mix is None and not plain.warnings
