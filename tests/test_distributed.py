"""Multi-process training: two processes with half the batch each compute the single-process gradient."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune import runfolder
from preftune.config import dump_config
from preftune.errors import ConfigError
from preftune.train.distributed import LauncherFSDP, launcher_fsdp, plan_distribution
from preftune.run import build_trainer
from tests.support import save_tiny_model, tiny_run_config


def _first_step_gradients(tmp_path, model_dir, name: str, processes: int, per_device: int) -> list[dict[str, torch.Tensor]]:
    config = tiny_run_config(tmp_path / name, model_dir, training={"per_device_train_batch_size": per_device})
    config_path = tmp_path / f"{name}.yaml"
    config_path.write_text(dump_config(config))
    # torchrun sets RANK/WORLD_SIZE; accelerate picks them up and uses gloo on CPU.
    finished = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
         "-m", "tests.distributed_gradients", str(config_path), str(tmp_path / name)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=180,
    )
    assert finished.returncode == 0, finished.stderr[-4000:]
    return [load_file(tmp_path / f"{name}-rank{rank}.safetensors") for rank in range(processes)]


def test_two_processes_with_half_the_batch_each_compute_the_single_process_gradient(tmp_path):
    model_dir = save_tiny_model(tmp_path / "model")
    (single,) = _first_step_gradients(tmp_path, model_dir, "single", processes=1, per_device=4)
    rank0, rank1 = _first_step_gradients(tmp_path, model_dir, "distributed", processes=2, per_device=2)

    assert any(gradient.abs().max() > 0 for gradient in single.values())
    for key in single:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)  # every process applies the same update
        torch.testing.assert_close(rank0[key], single[key], rtol=1e-5, atol=1e-7)


REPO_ROOT = Path(__file__).resolve().parents[1]
FSDP_LAUNCHER_CONFIG = REPO_ROOT / "examples" / "accelerate" / "fsdp.yaml"
# Generous for 2 shared cores; a collective mismatch hangs forever, and the test must fail instead.
HANG_TIMEOUT_S = 300


def _run_until_timeout(command: list[str]) -> subprocess.CompletedProcess:
    """Run a launcher; on timeout kill its whole process group (the workers too) and fail."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=HANG_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(command[:6])} ... did not finish in {HANG_TIMEOUT_S} s (a collective mismatch?)\n{stderr[-3000:]}")
    errors = [line for line in stderr.splitlines() if "Error" in line or "error:" in line]
    assert process.returncode == 0, "\n".join(errors[:20]) + "\n" + stderr[-3000:]
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def _fsdp_gradients(tmp_path, processes: int) -> dict[str, torch.Tensor]:
    out = tmp_path / f"fsdp-{processes}"
    _run_until_timeout([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
                        "-m", "tests.fsdp_gradients", str(out), "tied", "4"])
    return load_file(f"{out}.safetensors")


def test_fsdp_sharded_engine_gives_the_single_process_gradient_with_unequal_chunk_counts(tmp_path):
    """preftune's sharding (each decoder layer, then the causal LM as root, tied LM head and embeddings) under
    the engine, which calls the decoder and the LM head in chunks of 4 answer positions: process 0 has 1
    example, process 1 has 3, so they run different numbers of head chunks; the chunk loop issues no
    collective (the root's weights are gathered once around the whole engine forward), so nothing hangs,
    and the gathered gradient equals the single-process gradient over the 4 examples."""
    single = _fsdp_gradients(tmp_path, 1)
    sharded = _fsdp_gradients(tmp_path, 2)
    assert sorted(sharded) == sorted(single) and any(g.abs().max() > 0 for g in single.values())
    assert "lm_head.weight" not in single  # tied: one parameter, the embeddings
    for name in single:
        torch.testing.assert_close(sharded[name], single[name], rtol=1e-5, atol=1e-6)


# ---- training under FSDP, launched through accelerate with the shipped launcher config ---------------------------

FSDP_TRAINING = {
    "max_steps": 4, "save_steps": 2, "eval_steps": 2, "logprob_chunk_size": 8,
}
FSDP_DATA = {"max_train_samples": 10, "max_validation_samples": 7}
# Compared row by row: everything a step or an evaluation logs but its clock.
CLOCK_KEYS = {"time", "pairs_per_second"}


def _training_config(run_dir, model_dir, *, per_device: int, full_fine_tune: bool = False, **top):
    training = {**FSDP_TRAINING, "per_device_train_batch_size": per_device}
    model = {"name_or_path": str(model_dir), "dtype": "float32"}
    if full_fine_tune:
        training["gradient_checkpointing"] = True
        sections = {"model": {**model, "lora": None}, "training": {**training, "learning_rate": 1e-3}}
    else:
        sections = {"training": training}
    return tiny_run_config(run_dir, model_dir, data=FSDP_DATA, **sections, **top)


def _metric_rows(run_dir) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in CLOCK_KEYS} for row in runfolder.read_jsonl(run_dir / runfolder.METRICS)]


def _assert_same_run(fsdp_dir, single_dir) -> None:
    fsdp_rows, single_rows = _metric_rows(fsdp_dir), _metric_rows(single_dir)
    assert [sorted(row) for row in fsdp_rows] == [sorted(row) for row in single_rows]
    assert [row["step"] for row in fsdp_rows if "loss" in row] == [1, 2, 3, 4]
    for fsdp_row, single_row in zip(fsdp_rows, single_rows):
        for key, value in single_row.items():
            if isinstance(value, float):
                # abs 1e-5: rewards are β × differences of ~-300-nat log-prob sums, whose fp32 rounding (~3e-5 nats)
                # differs when the two runs pack their rows, and so block their attention, differently.
                assert fsdp_row[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (fsdp_row["step"], key)
            else:
                assert fsdp_row[key] == value, (fsdp_row["step"], key)
    for exported in ("final/merged/model.safetensors", "checkpoints/step-4/trainable.safetensors"):
        fsdp_weights, single_weights = load_file(fsdp_dir / exported), load_file(single_dir / exported)
        assert sorted(fsdp_weights) == sorted(single_weights)
        for name, tensor in single_weights.items():
            torch.testing.assert_close(fsdp_weights[name], tensor, rtol=1e-5, atol=1e-6, msg=f"{exported}: {name}")


def test_fsdp_through_accelerate_launch_trains_resumes_and_exports_as_one_process_does(tmp_path):
    """`accelerate launch --config_file examples/accelerate/fsdp.yaml` (2 CPU processes, gloo) with the
    default training.fsdp: auto shards the policy, and 2 processes × batch 2 train as 1 process × batch 4:
    the same losses and evaluations at every step and the same checkpointed and exported weights, to
    float rounding (rel 1e-5). The data make the collectives' hard cases: 10 examples in micro-batches
    of 4, so the third step leaves process 1 with no example (it runs a zero-weighted stand-in); 7
    validation examples (evaluation shards of 4 and 3, padded); 8-position LM-head chunks over answers of
    different lengths. The LoRA run (with fsdp_reshard_after_forward: false from the command line) crashes
    after step 3 and resumes from the sharded step-2 checkpoint; the full fine-tune (frozen reference copy
    sharded too, tied embeddings, gradient checkpointing) runs straight through."""
    lora_model = save_tiny_model(tmp_path / "model")
    tied_model = save_tiny_model(tmp_path / "tied-model", tie_word_embeddings=True)
    configs = {
        "lora-crash": _training_config(tmp_path / "lora-fsdp", lora_model, per_device=2),
        "lora-resume": _training_config(tmp_path / "lora-fsdp", lora_model, per_device=2, resume_from="latest"),
        "full": _training_config(tmp_path / "full-fsdp", tied_model, per_device=2, full_fine_tune=True),
    }
    for name, config in configs.items():
        (tmp_path / f"{name}.yaml").write_text(dump_config(config))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_LAUNCHER_CONFIG),
              "--num_processes", "2", "--main_process_port", "0"]
    # The LoRA runs also override a launcher setting on the command line: layers stay gathered from forward to
    # backward, and after an evaluation (no backward) until the next step, so checkpoints meet gathered units.
    _run_until_timeout([*launch, "--fsdp_reshard_after_forward", "false", "-m", "tests.fsdp_training", str(tmp_path),
                        f"{tmp_path / 'lora-crash.yaml'}:3", str(tmp_path / "lora-resume.yaml")])
    _run_until_timeout([*launch, "-m", "tests.fsdp_training", str(tmp_path), str(tmp_path / "full.yaml")])
    build_trainer(_training_config(tmp_path / "lora-single", lora_model, per_device=4)).train()
    build_trainer(_training_config(tmp_path / "full-single", tied_model, per_device=4, full_fine_tune=True)).train()

    for name in configs:
        ranks = [json.loads((tmp_path / f"{name}-rank{rank}.json").read_text()) for rank in (0, 1)]
        for record in ranks:
            assert record["distribution"]["strategy"] == "fsdp"
            assert record["distribution"]["sharded_layers"] == 2 and record["distribution"]["layer_classes"] == ["LlamaDecoderLayer"]
            assert record["distribution"]["reshard_after_forward"] == (name == "full")
            for kind in ("trainable", "all"):  # every parameter sharded; each process holds about half of each kind
                assert record[kind]["local"] <= 0.55 * record[kind]["full"]
        for kind in ("trainable", "all"):
            assert ranks[0][kind]["local"] + ranks[1][kind]["local"] == ranks[0][kind]["full"]
        assert [record["crashed"] for record in ranks] == [name == "lora-crash"] * 2
    _assert_same_run(tmp_path / "lora-fsdp", tmp_path / "lora-single")
    _assert_same_run(tmp_path / "full-fsdp", tmp_path / "full-single")


# ---- what the launcher passes on, and the layout chosen from it ----------------------------------------------------

# What `accelerate launch --config_file examples/accelerate/fsdp.yaml` sets (checked with a script printing its environment).
FSDP_YAML_ENVIRONMENT = {
    "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
    "FSDP_RESHARD_AFTER_FORWARD": "true", "FSDP_OFFLOAD_PARAMS": "false", "FSDP_MIN_NUM_PARAMS": "100000000",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP", "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer",
    "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT", "FSDP_FORWARD_PREFETCH": "false", "FSDP_USE_ORIG_PARAMS": "true",
    "FSDP_CPU_RAM_EFFICIENT_LOADING": "false", "FSDP_SYNC_MODULE_STATES": "true", "FSDP_ACTIVATION_CHECKPOINTING": "false",
}


def test_the_launchers_fsdp_settings_pass_through_or_are_refused_by_name():
    assert launcher_fsdp({}) is None
    assert launcher_fsdp({"ACCELERATE_USE_FSDP": "false"}) is None
    assert launcher_fsdp(FSDP_YAML_ENVIRONMENT) == LauncherFSDP(reshard_after_forward=True, layer_classes=("LlamaDecoderLayer",))
    keep_gathered = {**FSDP_YAML_ENVIRONMENT, "FSDP_RESHARD_AFTER_FORWARD": "false", "FSDP_TRANSFORMER_CLS_TO_WRAP": "A, B"}
    assert launcher_fsdp(keep_gathered) == LauncherFSDP(reshard_after_forward=False, layer_classes=("A", "B"))
    refused = {
        "FSDP_VERSION": ("1", "fsdp_version: 1"),
        "FSDP_OFFLOAD_PARAMS": ("true", "fsdp_offload_params"),
        "FSDP_ACTIVATION_CHECKPOINTING": ("true", "training.gradient_checkpointing"),
        "FSDP_CPU_RAM_EFFICIENT_LOADING": ("true", "fsdp_cpu_ram_efficient_loading"),
        "FSDP_STATE_DICT_TYPE": ("SHARDED_STATE_DICT", "FULL_STATE_DICT"),
        "FSDP_AUTO_WRAP_POLICY": ("SIZE_BASED_WRAP", "TRANSFORMER_BASED_WRAP"),
        "FSDP_RESHARD_AFTER_FORWARD": ("FULL_SHARD", "fsdp_reshard_after_forward must be true or false"),
    }
    for variable, (value, named) in refused.items():
        with pytest.raises(ConfigError, match=named):
            launcher_fsdp({**FSDP_YAML_ENVIRONMENT, variable: value})


def test_the_layout_follows_training_fsdp_the_launcher_and_the_process_count(tmp_path):
    def plan(processes, environ, **training):
        config = tiny_run_config(tmp_path, tmp_path, training=training)
        return plan_distribution(config, processes=processes, device=torch.device("cpu"), environ=environ)

    assert plan(1, FSDP_YAML_ENVIRONMENT).strategy == "single"
    assert plan(2, {}).strategy == "data_parallel"  # auto without an FSDP launcher config
    assert plan(2, FSDP_YAML_ENVIRONMENT, fsdp=False).strategy == "data_parallel"
    assert plan(2, {**FSDP_YAML_ENVIRONMENT, "FSDP_VERSION": "1"}, fsdp=False).strategy == "data_parallel"  # not read, not refused
    with pytest.raises(ConfigError, match="fsdp_version: 1"):
        plan(2, {**FSDP_YAML_ENVIRONMENT, "FSDP_VERSION": "1"})
    assert plan(2, {}, fsdp=True).strategy == "fsdp"  # e.g. torchrun
    launched = plan(2, {**FSDP_YAML_ENVIRONMENT, "FSDP_RESHARD_AFTER_FORWARD": "false"})
    assert (launched.strategy, launched.reshard_after_forward, launched.layer_classes) == ("fsdp", False, ("LlamaDecoderLayer",))
    with pytest.raises(ConfigError, match="loss_type grpo is not supported under FSDP"):
        plan_distribution(
            tiny_run_config(tmp_path, tmp_path, method={"loss_type": "grpo"}, training={"fsdp": True}),
            processes=2, device=torch.device("cpu"), environ={},
        )


@pytest.mark.parametrize(
    ("name", "fsdp", "machines", "per_machine"),
    [("fsdp", True, 1, 8), ("fsdp_multi_node", True, 2, 8), ("multi_node", False, 2, 8), ("multi_gpu_ddp", False, 1, 8)],
)
def test_the_example_launcher_configs_give_the_layout_they_describe(name, fsdp, machines, per_machine):
    """Each shipped accelerate config, read the way `accelerate launch` reads it, sets the process layout it
    documents and passes preftune's FSDP checks (or asks for no FSDP)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(REPO_ROOT / "examples" / "accelerate" / f"{name}.yaml"), "x.py"])
    args, _, _ = _validate_launch_command(args)
    environment = prepare_multi_gpu_env(args)
    assert (launcher_fsdp(environment) is not None) == fsdp
    assert int(args.nproc_per_node) == per_machine
    if machines > 1:
        # accelerate hands torchrun the main process's address as master_addr/port or, as here, a rendezvous endpoint.
        address = getattr(args, "rdzv_endpoint", None) or f"{args.master_addr}:{args.master_port}"
        assert (int(args.nnodes), args.node_rank, address) == (machines, 0, "10.0.0.1:29500")
