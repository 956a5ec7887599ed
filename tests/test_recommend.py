import json

import pytest
import torch
import yaml

from preftune.cli import main
from preftune.config import load_config
from preftune.cli import AUDITED_FORMATS
from preftune.data.formats import FORMAT_KINDS, PAIRED, UNPAIRED
from preftune.data.records import TokenizedExample
from preftune.errors import ConfigError
from preftune.eval.recommend import (
    DataTraits,
    ReferenceAccuracy,
    data_kind,
    decide,
    measure_reference_accuracy,
    measure_traits,
    write_recommended_config,
)
from preftune.logprobs import unshared_sequence_logps
from preftune.model.loading import load_model, load_tokenizer
from tests.support import save_tiny_model, tokenized_hh_pairs


def paired(accuracy, se=0.01, **traits):
    return DataTraits("paired", 1000, reference_accuracy=accuracy, reference_accuracy_se=se, reference_sample=900, **traits)


def test_high_reference_accuracy_means_dpo():
    rec = decide(paired(0.8))
    assert (rec.method, rec.branch) == ("dpo", "dpo")
    assert rec.settings == {"method": {"loss_type": "sigmoid"}}
    assert "80.0%" in rec.reason and rec.expected_overhead.startswith("1×")
    assert rec.notes == []


def test_middle_accuracy_means_soft_cpo_and_the_boundaries_belong_to_it():
    for accuracy in (0.6, 0.7, 0.5):
        rec = decide(paired(accuracy, se=0.001))
        assert rec.branch == "cpo_soft"
        assert rec.settings == {"method": {"loss_type": "cpo", "constraints": {"mode": "soft"}}}
        assert "negligible" in rec.expected_overhead


def test_low_accuracy_means_hard_cpo_with_length_rebalancing():
    rec = decide(paired(0.4))
    assert rec.branch == "cpo_hard_rebalance"
    assert rec.settings == {"method": {"loss_type": "cpo", "constraints": {"mode": "hard"}}, "data": {"length_balance": True}}


def test_mostly_synthetic_pairs_get_cpo_with_distribution_filtering():
    rec = decide(paired(0.8, synthetic_share=0.8))
    assert rec.branch == "cpo_synthetic_filter"
    assert rec.settings == {"method": {"loss_type": "cpo", "constraints": {"mode": "soft"}}, "data": {"filter_synthetic_outliers": True}}
    hard = decide(paired(0.3, synthetic_share=0.8))
    assert hard.settings["method"]["constraints"]["mode"] == "hard"
    assert hard.settings["data"] == {"filter_synthetic_outliers": True, "length_balance": True}
    assert decide(paired(0.8, synthetic_share=0.5)).branch == "dpo"  # half is not "mostly"


def test_unpaired_reward_and_principles_branches():
    kto = decide(DataTraits("unpaired", 500))
    assert (kto.method, kto.settings, kto.trainable) == ("kto", {"method": {"loss_type": "kto"}}, True)
    rl = decide(DataTraits("reward", 300))
    assert (rl.method, rl.branch, rl.trainable) == ("grpo", "online_rl", False)
    assert "generation" in rl.expected_overhead
    cai = decide(DataTraits("principles", 0))
    assert (cai.method, cai.trainable) == ("constitutional_ai", False)


def test_unmeasured_accuracy_falls_back_to_soft_cpo():
    rec = decide(DataTraits("paired", 100))
    assert rec.branch == "cpo_soft_unmeasured"
    assert rec.settings["method"]["constraints"] == {"mode": "soft"}


def test_length_bias_duplicates_and_borderline_accuracy_add_notes():
    rec = decide(paired(0.72, se=0.02, length_bias="longer", share_chosen_longer=0.68, duplicate_rate=0.1))
    assert rec.branch == "dpo"
    assert rec.settings["data"] == {"length_balance": True}
    assert any("longer is better" in note for note in rec.notes)
    assert any("duplicates" in note for note in rec.notes)
    assert any("70% boundary" in note for note in rec.notes)  # |0.72 − 0.70| < 1.96 · 0.02
    assert not any("boundary" in note for note in decide(paired(0.8, se=0.02)).notes)


def test_reference_accuracy_counts_ties_as_neither():
    result = ReferenceAccuracy(correct=6, wrong=2, ties=2, length_normalized=True)
    assert result.accuracy == 0.75
    assert result.standard_error == pytest.approx((0.75 * 0.25 / 8) ** 0.5)
    assert ReferenceAccuracy(0, 0, 3, True).accuracy is None


@pytest.mark.parametrize(
    "traits",
    [paired(0.8), paired(0.6), paired(0.4), DataTraits("unpaired", 10), paired(0.3, synthetic_share=0.9)],
    ids=["dpo", "cpo_soft", "cpo_hard", "kto", "synthetic"],
)
def test_recommended_configs_load_as_run_configs(tmp_path, traits):
    rec = decide(traits)
    path = tmp_path / "recommended.yaml"
    synthetic = ["synthetic.jsonl"] if traits.synthetic_share else []
    write_recommended_config(rec, path, data_file="hh-rlhf-harmless:train", synthetic_files=synthetic)
    config = load_config(path)
    method = rec.settings["method"]
    assert config.method.loss_type == method["loss_type"]
    if "constraints" in method:
        assert config.method.constraints.mode == method["constraints"]["mode"]
    assert config.data.length_balance == rec.settings.get("data", {}).get("length_balance", False)
    assert config.data.validation_file is None
    if synthetic:
        assert config.data.train_file is None and config.data.filter_synthetic_outliers
        assert [(s.path, s.source) for s in config.data.sources] == [("hh-rlhf-harmless:train", "human"), ("synthetic.jsonl", "synthetic")]
    else:
        assert config.data.train_file == "hh-rlhf-harmless:train"
    assert path.read_text().startswith("# Written by `preftune recommend`")


def test_untrainable_recommendations_write_no_config(tmp_path):
    with pytest.raises(ConfigError, match="not trainable"):
        write_recommended_config(decide(DataTraits("reward", 3)), tmp_path / "x.yaml", data_file="r.jsonl")


def test_a_filter_recommendation_on_one_file_filters_by_the_records_own_provenance(tmp_path):
    path = tmp_path / "mixed.jsonl"
    records = [{"prompt": f"q{i}?", "chosen": " yes", "rejected": " nah", "provenance": "synthetic" if i % 4 else "human"} for i in range(8)]
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    traits = measure_traits([str(path)]).traits
    assert traits.synthetic_share == 0.75  # 6 of the 8 records say synthetic
    assert measure_traits([str(path)], synthetic_files=[str(path)]).traits.synthetic_share == 0.5  # the files say it
    rec = decide(traits)
    assert (rec.branch, rec.settings["data"]) == ("cpo_synthetic_filter", {"filter_synthetic_outliers": True})
    written = write_recommended_config(rec, tmp_path / "x.yaml", data_file=str(path))
    assert (written.data.train_file, written.data.filter_synthetic_outliers, written.data.sources) == (str(path), True, None)


def test_data_kinds_from_the_first_record(tmp_path):
    reward = tmp_path / "reward.jsonl"
    reward.write_text(json.dumps({"prompt": "hi", "reward": 0.3}) + "\n")
    unpaired = tmp_path / "kto.jsonl"
    unpaired.write_text(json.dumps({"prompt": "hi", "completion": " yo", "label": True}) + "\n")
    assert data_kind(reward) == "reward"
    assert data_kind(unpaired) == "unpaired"
    assert measure_traits([str(unpaired)]).traits.kind == "unpaired"
    assert decide(measure_traits([str(reward)]).traits).branch == "online_rl"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = save_tiny_model(tmp_path_factory.mktemp("model"))
    return folder, load_model(str(folder)), load_tokenizer(str(folder))


def test_reference_accuracy_matches_the_plain_computation(tiny):
    _, model, tokenizer = tiny
    pairs = tokenized_hh_pairs(tokenizer, read=12)
    tie = TokenizedExample(pairs[0].prompt_ids, (pairs[0].chosen_ids, list(pairs[0].chosen_ids)), origin="tie")
    for length_normalize in (True, False):
        measured = measure_reference_accuracy(model, [*pairs, tie], pad_id=tokenizer.pad_token_id, batch_size=5, length_normalize=length_normalize)
        with torch.no_grad():
            plain = unshared_sequence_logps(
                model, [p.prompt_ids for p in pairs], [(p.chosen_ids, p.rejected_ids) for p in pairs], pad_id=tokenizer.pad_token_id
            )
        chosen, rejected = plain.by_answer(2)
        margin = chosen.mean - rejected.mean if length_normalize else chosen.sum - rejected.sum
        assert measured.ties == 1
        assert measured.correct == int((margin > 1e-4).sum())
        assert measured.wrong == int((margin < -1e-4).sum())
        assert measured.decided == 12


def test_recommend_command_measures_and_writes_a_config(tiny, tmp_path, capsys):
    folder, _, _ = tiny
    output = tmp_path / "recommended.yaml"
    code = main(
        ["recommend", "--data", "hh-rlhf-harmless:train", "--model", str(folder), "--sample", "16", "--max-length", "96", "--output", str(output)]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "recommended:" in printed and "length bias" in printed
    raw = yaml.safe_load(output.read_text())
    assert raw["model"]["name_or_path"] == str(folder)
    assert load_config(output).data.train_file == "hh-rlhf-harmless:train"


def test_audit_and_recommend_read_every_paired_and_unpaired_format():
    assert set(AUDITED_FORMATS) == {name for name, kind in FORMAT_KINDS.items() if kind in (PAIRED, UNPAIRED)}


def test_audit_command_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "audit.json"
    assert main(["audit", "hh-rlhf-harmless:validation", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "286 paired records (lengths in characters)" in printed
    data = json.loads(out.read_text())
    assert data["hh-rlhf-harmless:validation"]["count"] == 286
    assert main(["audit", str(tmp_path / "missing.jsonl")]) == 2
