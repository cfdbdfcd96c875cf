"""End-to-end runs through the in-process simulator and the CLI."""

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from feddtl.backbones.tiny_clip import build_tiny_clip
from feddtl.cli import main
from feddtl.config import load_config
from feddtl.server.rundir import result_fields
from feddtl.server.experiment import run_experiment

REQUIRED = {"method", "dataset", "backbone", "partition", "rounds", "seed", "base_acc", "novel_acc", "local_acc", "hm"}


def test_tiny_run_writes_the_run_directory(tmp_path):
    # execute
    code = main(["run", "--config", "tiny", "--out", str(tmp_path), "--quiet"])
    # assert
    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert REQUIRED <= set(results)
    assert results["rounds"] == 4 and results["method"] == "feddtl"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert [r["stage"] for r in rows] == ["sft", "sft", "rl", "rl"]
    # GRPO diagnostics are logged in RL rounds
    assert {"client_reward", "client_silent_groups", "client_kl", "client_clip_fraction"} <= set(rows[-1])
    assert load_config(str(tmp_path / "config.toml")) == load_config("tiny")
    weights = load_file(str(tmp_path / "final_lora.safetensors"))
    assert any(k.startswith("image.") for k in weights) and any(k.startswith("text.") for k in weights)
    assert (tmp_path / "accuracy.png").stat().st_size > 0
    assert (tmp_path / "partition.png").stat().st_size > 0


def test_same_seed_same_results(tmp_path):
    config = load_config("tiny", ["rounds=2", "client.switch_round=1", "eval.every=1"])
    a = run_experiment(config, tmp_path / "a", progress=False, log_fn=lambda s: None)
    b = run_experiment(config, tmp_path / "b", progress=False, log_fn=lambda s: None)
    ma = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    mb = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [result_fields(json.loads(x)) for x in ma] == [result_fields(json.loads(x)) for x in mb]
    assert a["hm"] == b["hm"]


def test_hf_clip_path_runs_a_federated_round(tmp_path):
    # prepare: a tiny randomly initialised CLIP saved locally (no network)
    clip = build_tiny_clip(tmp_path / "clip")
    config = load_config(
        "tiny", [f'backbone="hf-clip:{clip}"', "rounds=2", "client.switch_round=1", "eval.every=1"]
    )
    # execute
    results = run_experiment(config, tmp_path / "run", progress=False, log_fn=lambda s: None)
    # assert: both stages ran through the CLIP towers and the run directory is complete
    assert results["backbone"].startswith("hf-clip:")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["sft", "rl"]
    assert rows[-1]["bytes_up"] > 0 and 0 <= results["hm"] <= 100


def test_cli_config_error_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "feddtl", "run", "--config", "tiny", "--set", "alpha=-1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "alpha must be > 0" in proc.stderr and "Traceback" not in proc.stderr


def test_cli_unknown_dataset_says_how_to_get_it(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "feddtl", "run", "--config", "tiny", "--set", "dataset=cifar10", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "cifar10" in proc.stderr and "imagefolder:" in proc.stderr and "Traceback" not in proc.stderr


def test_pathological_more_clients_than_classes_is_rejected(tmp_path):
    config = load_config("tiny", ["num_clients=6"])
    with pytest.raises(ValueError, match="num_clients=6 is more than the 5 base classes"):
        run_experiment(config, tmp_path, progress=False, log_fn=lambda s: None)
