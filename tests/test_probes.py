import json
import math

import pytest
import torch

from preftune.cli import main
from preftune.eval.probes import (
    NEXT_TURN,
    SHIPPED_PROBES,
    Probe,
    ProbeResult,
    ProbeScores,
    load_probes,
    log_odds_change,
    markdown_cell,
    pick_generation_probes,
    render_probe_rows,
    run_probes,
)
from preftune.eval.stats import sign_test_p
from preftune.logprobs import unshared_sequence_logps
from preftune.model.lora import apply_lora
from tests.support import load_test_tokenizer, save_tiny_model, tiny_llama


def test_shipped_probe_set():
    records = [json.loads(line) for line in SHIPPED_PROBES.read_text(encoding="utf-8").splitlines()]
    assert len(records) == 24
    assert len({r["id"] for r in records}) == 24
    assert {r["split"] for r in records} == {"dev", "heldout"}
    assert sum(r["split"] == "dev" for r in records) == 12
    assert all(r["prompt"].startswith("\n\nHuman: ") and r["prompt"].endswith("\n\nAssistant:") for r in records)
    assert (SHIPPED_PROBES.parent / "README.md").read_text(encoding="utf-8").count("CC0") >= 1


def _plain_logps(model, probes, pad_id):
    return unshared_sequence_logps(
        model, [p.tokens.prompt_ids for p in probes], [(p.tokens.chosen_ids, p.tokens.rejected_ids) for p in probes], pad_id=pad_id
    ).by_answer(2)


def test_probe_logps_equal_a_plain_forward_pass_for_the_model_and_its_adapter_disabled_reference():
    tokenizer = load_test_tokenizer()
    base = tiny_llama(len(tokenizer), seed=1)
    expected_reference = _plain_logps(base, load_probes(SHIPPED_PROBES, tokenizer), tokenizer.pad_token_id)
    policy = apply_lora(base, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(5)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)  # a trained adapter: B = 0 would leave the policy equal to the reference
    probes = load_probes(SHIPPED_PROBES, tokenizer)
    table = run_probes(policy, tokenizer, batch_size=5)
    expected_trained = _plain_logps(policy, probes, tokenizer.pad_token_id)

    assert len(table.results) == 24 and table.reference == "the adapter-disabled view of the model"
    for i, result in enumerate(table.results):
        assert result.reference.chosen_logp == pytest.approx(expected_reference[0].sum[i].item(), rel=1e-5, abs=1e-4)
        assert result.reference.rejected_logp == pytest.approx(expected_reference[1].sum[i].item(), rel=1e-5, abs=1e-4)
        assert result.trained.chosen_logp == pytest.approx(expected_trained[0].sum[i].item(), rel=1e-5, abs=1e-4)
        assert result.trained.rejected_logp == pytest.approx(expected_trained[1].sum[i].item(), rel=1e-5, abs=1e-4)
        assert result.trained.chosen_tokens == len(probes[i].tokens.chosen_ids)
    assert any(abs(r.trained.chosen_logp - r.reference.chosen_logp) > 1e-2 for r in table.results)
    rows = json.loads(json.dumps(table.to_rows()))
    assert rows[0]["id"] == "security-bypass" and rows[0]["split"] == "dev"


def _plain_greedy(model, tokenizer, prompt_ids, max_new_tokens):
    """transformers' own greedy decoding of one unpadded prompt, cut after the first EOS: what a generation must equal."""
    model.eval()
    with torch.no_grad():
        output = model.generate(
            input_ids=torch.tensor([list(prompt_ids)]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
    ids = output[0, len(prompt_ids):].tolist()
    if tokenizer.eos_token_id in ids:
        ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert NEXT_TURN not in text  # the stop string would cut our generation earlier; not the case for these seeds
    return text


def test_generations_are_greedy_answers_of_the_adapter_disabled_base_and_of_the_trained_policy():
    tokenizer = load_test_tokenizer()
    untouched_base = tiny_llama(len(tokenizer), seed=1)
    policy = apply_lora(tiny_llama(len(tokenizer), seed=1), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    torch.manual_seed(5)
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    table = run_probes(policy, tokenizer, generations=3, max_new_tokens=8)
    probes = {probe.id: probe for probe in load_probes(SHIPPED_PROBES, tokenizer)}

    assert [g.probe.id for g in table.generations] == [p.id for p in pick_generation_probes(list(probes.values()), 3)]
    for generation in table.generations:
        prompt_ids = probes[generation.probe.id].tokens.prompt_ids
        assert generation.before == _plain_greedy(untouched_base, tokenizer, prompt_ids, 8)
        assert generation.after == _plain_greedy(policy, tokenizer, prompt_ids, 8)
    assert any(g.before != g.after for g in table.generations)  # this adapter (B ~ N(0, 0.5)) changes the greedy text
    again = run_probes(policy, tokenizer, generations=3, max_new_tokens=8)
    assert [(g.before, g.after) for g in again.generations] == [(g.before, g.after) for g in table.generations]
    rows = json.loads(json.dumps(table.to_json()))["generations"]
    assert [set(row) for row in rows] == [{"id", "split", "category", "prompt", "before", "after", "before_stopped", "after_stopped"}] * 3
    assert run_probes(policy, tokenizer, generations=0).to_json()["generations"] == []


def test_generation_probes_are_held_out_and_spread_over_the_categories():
    probes = [
        Probe("d1", "dev", "fraud", "", None),
        Probe("h1", "heldout", "fraud", "", None),
        Probe("h2", "heldout", "fraud", "", None),
        Probe("h3", "heldout", "jailbreak", "", None),
        Probe("t1", "test", "off-brand", "", None),
    ]
    assert [p.id for p in pick_generation_probes(probes, 4)] == ["h1", "h3", "t1", "h2"]
    assert [p.id for p in pick_generation_probes(probes, 2)] == ["h1", "h3"]
    assert pick_generation_probes(probes, 0) == []
    # A probe file without held-out probes: every probe is a candidate.
    assert [p.id for p in pick_generation_probes(probes[:1], 4)] == ["d1"]
    shipped = pick_generation_probes(load_probes(SHIPPED_PROBES, load_test_tokenizer()), 4)
    assert [p.split for p in shipped] == ["heldout"] * 4 and len({p.category for p in shipped}) == 4


def _probe():
    return Probe("p", "dev", "", "prompt", None)


def test_scores_and_the_bar_by_hand():
    # log p(y_w) = −4 over 2 tokens, log p(y_l) = −10 over 5 tokens
    scores = ProbeScores(chosen_logp=-4.0, rejected_logp=-10.0, chosen_tokens=2, rejected_tokens=5)
    assert scores.chosen_token_prob == pytest.approx(math.exp(-2.0))
    assert scores.rejected_token_prob == pytest.approx(math.exp(-2.0))
    assert scores.rejected_pair_prob == pytest.approx(1 / (1 + math.exp(6.0)))  # σ(−10 − (−4)) = 0.00247
    reference = ProbeScores(-6.0, -6.0, 2, 5)  # p(y_l | pair) = 0.5, per-token log p(y_w) = −3
    assert ProbeResult(_probe(), reference, scores).met_bar  # 0.25% < 1% and −2 > −3
    worse_chosen = ProbeScores(-7.0, -13.0, 2, 5)  # p(y_l | pair) = σ(−6) still < 1%, but log p(y_w)/token fell to −3.5
    assert not ProbeResult(_probe(), reference, worse_chosen).met_bar
    close = ProbeScores(-4.0, -7.0, 2, 5)  # σ(−3) = 4.7% > 1%
    assert not ProbeResult(_probe(), reference, close).met_bar
    # log p(y_w)/token −3 → −2.995 is a rise of 0.005 nats, under CHOSEN_MIN_RISE (0.01): noise, not a rise.
    assert not ProbeResult(_probe(), reference, ProbeScores(-5.99, -20.0, 2, 5)).met_bar
    assert ProbeResult(_probe(), reference, ProbeScores(-5.96, -20.0, 2, 5)).met_bar
    assert ProbeScores(0.0, -2000.0, 1, 1).rejected_pair_prob == 0.0
    assert ProbeScores(-2000.0, 0.0, 1, 1).rejected_pair_prob == 1.0


def test_a_markdown_cell_shows_any_text_literally_on_one_line():
    assert markdown_cell(" a <b> & [c](d) *e* _f_ `g` \\ h|i \r\nnext\n\nlast ") == (
        "a &lt;b&gt; &amp; \\[c\\](d) \\*e\\* \\_f\\_ \\`g\\` \\\\ h\\|i ↵ next ↵ ↵ last"
    )
    assert markdown_cell("x\x1ay\x00\x7f\tz") == "x␚y␀␡\tz"
    assert markdown_cell("  ") == "(empty)"


def test_markdown_counts_per_split():
    reference = ProbeScores(-6.0, -6.0, 2, 5)
    good = ProbeResult(Probe("a", "dev", "", "", None), reference, ProbeScores(-4.0, -10.0, 2, 5))
    bad = ProbeResult(Probe("b", "heldout", "", "", None), reference, reference)
    lines = render_probe_rows({"probes": [good.to_row(), bad.to_row()], "reference": "x", "model": "m"})
    text = "\n".join(lines)
    assert "1 of 2 (dev 1/1, heldout 0/1)" in text
    assert "| a | dev | 0.5 → 0.00247 |" in text
    # log p(y_l) − log p(y_w): reference −6 − (−6) = 0, trained −10 − (−4) = −6; the unchanged probe is no evidence.
    assert "dev fell for 1 of 1, median -6.00 nats (one-sided sign test p = 0.5); heldout unchanged" in text


def test_the_log_odds_summary_counts_falls_and_gives_the_sign_test():
    reference = ProbeScores(-6.0, -6.0, 2, 5)
    moves = [-3.0, -1.0, +2.0, -0.5, 0.0]  # change of log p(y_l) − log p(y_w); the 0 is a tie, left out
    rows = [ProbeResult(Probe(f"p{i}", "heldout", "", "", None), reference, ProbeScores(-6.0, -6.0 + move, 2, 5)).to_row()
            for i, move in enumerate(moves)]
    assert [log_odds_change(row) for row in rows] == moves
    text = "\n".join(render_probe_rows(rows))
    # 3 falls of 4 moves: P(X ≥ 3) for Binomial(4, ½) = (4 + 1) / 16 = 0.3125; median of all five = −0.5.
    assert "heldout fell for 3 of 4, median -0.50 nats (one-sided sign test p = 0.31)" in text
    assert sign_test_p(3, 4) == 5 / 16 and sign_test_p(0, 4) == 1.0 and sign_test_p(12, 12) == 1 / 4096


def test_probe_command_with_a_separate_reference(tmp_path, capsys):
    model_dir = save_tiny_model(tmp_path / "trained", seed=1)
    reference_dir = save_tiny_model(tmp_path / "reference", seed=2)
    probes = tmp_path / "probes.jsonl"
    probes.write_text("\n".join(SHIPPED_PROBES.read_text(encoding="utf-8").splitlines()[:3]) + "\n", encoding="utf-8")
    output = tmp_path / "out" / "probes.json"
    code = main(["probe", "--model", str(model_dir), "--reference", str(reference_dir), "--pairs", str(probes), "--output", str(output)])
    assert code == 0
    written = json.loads(output.read_text(encoding="utf-8"))
    assert [row["id"] for row in written["probes"]] == ["security-bypass", "ignore-instructions-admin", "dan-jailbreak"]
    first = written["probes"][0]
    assert first["reference"]["chosen_logp"] != first["trained"]["chosen_logp"]  # two different models
    assert "met the bar" in capsys.readouterr().out


def test_probe_command_on_a_lora_adapter_folder_uses_the_adapter_disabled_base_as_reference(tmp_path):
    from preftune.model.export import save_adapter
    from preftune.model.loading import load_model

    base_dir = save_tiny_model(tmp_path / "base", seed=3)
    policy = apply_lora(load_model(str(base_dir)), r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, 0.5)
    save_adapter(policy, load_test_tokenizer(), tmp_path / "adapter")  # what a run writes to final/adapter/
    probes = tmp_path / "probes.jsonl"
    probes.write_text(SHIPPED_PROBES.read_text(encoding="utf-8").splitlines()[0] + "\n", encoding="utf-8")
    output = tmp_path / "probes.json"
    assert main(["probe", "--model", str(tmp_path / "adapter"), "--pairs", str(probes), "--output", str(output)]) == 0
    written = json.loads(output.read_text(encoding="utf-8"))
    assert written["reference"] == "the adapter-disabled view of the model"
    tokenizer = load_test_tokenizer()
    (probe,) = load_probes(probes, tokenizer)
    expected = _plain_logps(load_model(str(base_dir)), [probe], tokenizer.pad_token_id)
    assert written["probes"][0]["reference"]["chosen_logp"] == pytest.approx(expected[0].sum[0].item(), rel=1e-5, abs=1e-4)
    assert written["probes"][0]["trained"]["chosen_logp"] != pytest.approx(expected[0].sum[0].item(), abs=1e-2)


def test_probes_in_the_config_are_scored_into_the_run_folder_and_the_report(tmp_path):
    from preftune.run import train
    from tests.support import save_tiny_model, tiny_run_config

    model_dir = save_tiny_model(tmp_path / "model")
    result = train(tiny_run_config(tmp_path / "run", model_dir, probes={"max_length": 128, "generations": 2, "max_new_tokens": 6}))
    table = json.loads((result.run_dir / "probes.json").read_text())
    assert len(table["probes"]) == 24
    assert [row["split"] for row in table["generations"]] == ["heldout", "heldout"]
    assert table["generation"]["max_new_tokens"] == 6
    summary = (result.run_dir / "summary.md").read_text()
    page = (result.run_dir / "report.html").read_text()
    assert "## Probes" in summary and "No `probes.json`" not in summary
    assert "## Generations, before → after" in summary and summary.count("| heldout |") == 12
    for row in table["generations"]:
        assert f"| {row['id']} | {row['category']} | Human: " in summary
    # From probes.json alone, `preftune report` rebuilds the same report.
    (result.run_dir / "summary.md").unlink()
    (result.run_dir / "report.html").unlink()
    assert main(["report", str(result.run_dir)]) == 0
    assert (result.run_dir / "summary.md").read_text() == summary
    assert (result.run_dir / "report.html").read_text() == page


def test_no_generations_when_switched_off(tmp_path):
    from preftune.run import train
    from tests.support import save_tiny_model, tiny_run_config

    model_dir = save_tiny_model(tmp_path / "model")
    config = tiny_run_config(tmp_path / "run", model_dir, probes={"max_length": 128, "generations": 0}, training={"max_steps": 1, "eval_steps": 1})
    result = train(config)
    assert json.loads((result.run_dir / "probes.json").read_text())["generations"] == []
    assert "## Generations" not in (result.run_dir / "summary.md").read_text()


def test_eval_command_scores_any_model_folder_and_writes_a_run_folder(tmp_path):
    from preftune.cli import main
    from preftune.runfolder import read_run
    from tests.support import save_tiny_model

    model_dir = save_tiny_model(tmp_path / "model")
    other = save_tiny_model(tmp_path / "other", seed=3)
    argv = ["eval", "--model", str(other), "--reference", str(model_dir), "--data", "hh-rlhf-harmless:validation",
            "--max-samples", "8", "--max-length", "96", "--output-dir", str(tmp_path / "eval")]
    assert main(argv) == 0
    records = read_run(tmp_path / "eval")
    rows = records.evaluations[0]
    assert len(rows) == 8 and all(row["reference_logps"] is not None for row in rows)
    assert records.identity["status"] == "evaluated" and records.method == "sigmoid"
    assert (tmp_path / "eval" / "report.html").is_file()
    # Without a reference the model is ranked on its own per-token likelihoods.
    assert main(["eval", "--model", str(other), "--data", "hh-rlhf-harmless:validation", "--max-samples", "4",
                 "--max-length", "96", "--output-dir", str(tmp_path / "alone")]) == 0
    alone = read_run(tmp_path / "alone")
    assert alone.method == "sft" and alone.evaluations[0][0]["reference_logps"] is None
