"""Checkpoints and resume: a run killed at any round and resumed ends exactly like the uninterrupted run.

"Exactly": results.json and every metrics.jsonl row are equal field by field except the timing fields
and memory measurements (wall_s, setup_s, time_*, *rss*), and final_lora.safetensors is byte-identical.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from feddtl.backbones.tiny_clip import build_tiny_clip
from feddtl.server.checkpoint import checkpoint_due, load_checkpoint, load_run_config
from feddtl.config import load_config
from feddtl.methods.state import load_optimizer_state, optimizer_state
from feddtl.server.rundir import RunDir, result_fields
from feddtl.server.experiment import run_experiment
from feddtl.server.robust import RoundFailed

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _feddtl(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "feddtl", "run", *args, "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen, timeout: float = 600) -> None:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"feddtl exited {proc.returncode}: {err[-2000:]}"


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Same results, same metrics rows and the same final weights, timing fields aside."""
    a = json.loads((reference / "results.json").read_text())
    b = json.loads((resumed / "results.json").read_text())
    assert result_fields(b) == result_fields(a)
    assert [result_fields(r) for r in RunDir(resumed).read_metrics()] == [result_fields(r) for r in RunDir(reference).read_metrics()]
    assert (resumed / "final_lora.safetensors").read_bytes() == (reference / "final_lora.safetensors").read_bytes()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def run_args(tmp_path_factory) -> list[str]:
    clip = build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)
    return ["--config", "tiny", "--set", f"backbone=hf-clip:{clip}"]


@pytest.fixture(scope="module")
def reference(run_args, tmp_path_factory) -> Path:
    """The uninterrupted run (in process: the arithmetic is the same as in a subprocess)."""
    out = tmp_path_factory.mktemp("reference")
    run_experiment(load_config("tiny", run_args[3::2]), out, progress=False, log_fn=lambda s: None)
    return out


@pytest.mark.slow
def test_killed_run_resumes_to_identical_results(run_args, reference, tmp_path):
    # prepare: start the run and SIGKILL it once two of its four rounds are in metrics.jsonl. Client 0 is
    # slow in rounds 3-4 (it sleeps, then answers normally: the results do not change), so the kill
    # lands mid-run however fast the machine; the resumed run keeps the config and is slow there too.
    slow = ["--set", "faults.mode=slow", "--set", "faults.clients=[0]", "--set", "faults.rounds=[3, 4]",
            "--set", "faults.delay_s=1.5"]
    victim = _feddtl(*run_args, *slow, "--out", str(tmp_path))
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        assert victim.poll() is None, f"the run ended before it was killed: {victim.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "the run did not reach round 2 in time"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "results.json").exists()
    # execute
    _finish(_feddtl("--resume", str(tmp_path)))
    # assert
    assert_same_run(tmp_path, reference)
    assert load_checkpoint(tmp_path, load_run_config(tmp_path)).round == 4


def test_stopped_run_resumes_without_duplicate_rows(run_args, reference, tmp_path):
    # prepare: every client fails round 3, so the run stops with a checkpoint after round 2; then a
    # stray row for round 3 is appended, as if a crash had come between a row and its checkpoint
    overrides = run_args[3::2] + ["faults.mode=raise", "faults.rounds=[3]"]
    config = load_config("tiny", overrides)
    with pytest.raises(RoundFailed):
        run_experiment(config, tmp_path, progress=False, log_fn=lambda s: None)
    RunDir(tmp_path).append_metrics({"round": 3, "stage": "rl", "stray": True})
    # execute: resume with the faults switched off
    run_experiment(load_run_config(tmp_path, ["faults.mode=none"]), tmp_path, progress=False,
                   log_fn=lambda s: None, resume=True)
    # assert
    assert [r["round"] for r in RunDir(tmp_path).read_metrics()] == [1, 2, 3, 4]
    assert_same_run(tmp_path, reference)


def test_fresh_run_into_an_old_directory_does_not_resume_from_its_checkpoint(run_args, tmp_path):
    # prepare: a checkpoint left by an earlier run with another seed
    stale = tmp_path / "checkpoint"
    stale.mkdir()
    (stale / "state.json").write_text("{}")
    config = load_config("tiny", run_args[3::2] + ["rounds=1", "client.switch_round=1", "eval.every=1"])
    # execute
    run_experiment(config, tmp_path, progress=False, log_fn=lambda s: None)
    # assert: the new run wrote its own checkpoint after its only round
    assert load_checkpoint(tmp_path, config).round == 1


def test_adam_state_survives_a_checkpoint_round_trip():
    # prepare: an Adam optimiser with a few steps of history
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = torch.optim.Adam(params, lr=0.01)
    for _ in range(3):
        opt.zero_grad()
        sum((p**2).sum() for p in params).backward()
        opt.step()
    tensors, meta = optimizer_state(opt)
    json.dumps(meta)  # the metadata must be JSON
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    restored = torch.optim.Adam(copies, lr=0.01)
    # execute
    load_optimizer_state(restored, tensors, meta)
    for o, ps in ((opt, params), (restored, copies)):
        o.zero_grad()
        sum((p**2).sum() for p in ps).backward()
        o.step()
    # assert: the next step is bit-identical
    assert all(torch.equal(a, b) for a, b in zip(params, copies))


@pytest.mark.parametrize(
    "every,due", [(1, [1, 2, 3, 4, 5]), (2, [2, 4, 5]), (0, [5])], ids=["every round", "every 2", "only the last"]
)
def test_checkpoint_schedule(every, due):
    assert [t for t in range(1, 6) if checkpoint_due(t, 5, every)] == due


def test_cli_stop_on_failing_clients_exits_3_and_says_how_to_resume(run_args, tmp_path, capsys):
    # prepare / execute: every client fails round 1
    from feddtl.cli import main as cli_main

    code = cli_main(["run", *run_args, "--set", "rounds=1", "--set", "client.switch_round=1", "--set",
                     "faults.mode=drop", "--out", str(tmp_path), "--quiet"])
    # assert
    err = capsys.readouterr().err
    assert code == 3
    assert "round 1: 0 of 3 clients answered" in err and f"feddtl run --resume {tmp_path}" in err
    assert "Traceback" not in err
    assert load_checkpoint(tmp_path, load_run_config(tmp_path)).round == 0
