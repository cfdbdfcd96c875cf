"""Checkpoints and resume: a run of any method killed at any round and resumed ends exactly like the
uninterrupted run; a run stopped by SIGTERM / SIGINT stops cleanly between rounds and resumes the same way.

"Exactly": results.json and every metrics.jsonl row are equal field by field except the timing fields
and memory measurements (wall_s, setup_s, time_*, *rss*), and final_lora.safetensors is byte-identical.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from feddtl.backbones.tiny_clip import build_tiny_clip
from feddtl.cli import main as cli_main
from feddtl.config import load_config, to_toml
from feddtl.methods import available_methods
from feddtl.methods.base import Method
from feddtl.methods.fedlora import FedLoRA
from feddtl.methods.state import load_optimizer_state, optimizer_state
from feddtl.server.checkpoint import CheckpointError, checkpoint_due, config_fingerprint, load_checkpoint, load_run_config
from feddtl.server.experiment import run_experiment
from feddtl.server.robust import RoundFailed
from feddtl.server.rundir import RunDir, result_fields
from feddtl.server.stop import RunStopped, StopRequest, stop_on_signals

METHODS = available_methods()
TRAINING = [m for m in METHODS if m != "zeroshot"]

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


def _wait_for_rows(proc: subprocess.Popen, run_dir: Path, rows: int) -> None:
    """Wait until ``rows`` rounds are in run_dir's metrics.jsonl (0: until its config.toml is written)."""
    metrics, config = run_dir / "metrics.jsonl", run_dir / "config.toml"
    deadline = time.monotonic() + 300
    while not (
        (metrics.exists() and len(metrics.read_text().splitlines()) >= rows) if rows else config.exists()
    ):
        assert proc.poll() is None, f"the run ended before the signal: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, f"the run did not reach {rows} rounds in time"
        time.sleep(0.05)


def assert_same_run(resumed: Path, reference: Path) -> None:
    """Same results, same metrics rows and the same final weights, timing fields aside."""
    a = json.loads((reference / "results.json").read_text())
    b = json.loads((resumed / "results.json").read_text())
    assert result_fields(b) == result_fields(a)
    assert [result_fields(r) for r in RunDir(resumed).read_metrics()] == [result_fields(r) for r in RunDir(reference).read_metrics()]
    weights = [d / "final_lora.safetensors" for d in (resumed, reference)]
    assert weights[0].exists() == weights[1].exists()  # zeroshot writes none
    if weights[1].exists():
        assert weights[0].read_bytes() == weights[1].read_bytes()


def _snapshot(run_dir: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``run_dir`` with its bytes and modification time."""
    return {str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run_dir.rglob("*")) if p.is_file()}


class SimulatedKill(BaseException):
    """Ends a run where it stands, like SIGKILL: nothing in feddtl catches a BaseException."""


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def run_args(tmp_path_factory) -> list[str]:
    clip = build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)
    return ["--config", "tiny", "--set", f"backbone=hf-clip:{clip}"]


@pytest.fixture(scope="module")
def reference_of(run_args, tmp_path_factory) -> Callable[[str], Path]:
    """The uninterrupted run of a method (in process: the arithmetic is the same as in a subprocess)."""
    done: dict[str, Path] = {}

    def reference(method: str) -> Path:
        if method not in done:
            out = tmp_path_factory.mktemp(f"reference-{method}")
            config = load_config("tiny", run_args[3::2] + [f"method={method}"])
            run_experiment(config, out, progress=False, log_fn=lambda s: None)
            done[method] = out
        return done[method]

    return reference


@pytest.fixture(scope="module")
def reference(reference_of) -> Path:
    return reference_of("feddtl")


@pytest.mark.parametrize("method", METHODS)
def test_crashed_run_of_every_method_resumes_to_identical_results(run_args, reference_of, tmp_path, monkeypatch, method):
    # prepare: the run dies right after round 3's metrics row is on disk, before its checkpoint: the
    # worst moment (the row must be dropped and the round recomputed from the checkpoint of round 2).
    # zeroshot runs no rounds: it dies after its one evaluation row, before results.json.
    crash_round = 0 if method == "zeroshot" else 3
    append = RunDir.append_metrics

    def append_then_die(self: RunDir, row: dict) -> None:
        append(self, row)
        if row["round"] == crash_round:
            raise SimulatedKill

    config = load_config("tiny", run_args[3::2] + [f"method={method}"])
    with monkeypatch.context() as patch:
        patch.setattr(RunDir, "append_metrics", append_then_die)
        with pytest.raises(SimulatedKill):
            run_experiment(config, tmp_path, progress=False, log_fn=lambda s: None)
    assert not (tmp_path / "results.json").exists()
    # execute: resume in a fresh federation, as a new process would
    run_experiment(load_run_config(tmp_path), tmp_path, progress=False, log_fn=lambda s: None, resume=True)
    # assert
    assert_same_run(tmp_path, reference_of(method))


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_killed_run_resumes_to_identical_results(run_args, reference_of, tmp_path, method):
    # prepare: start the run and SIGKILL it once two of its four rounds are in metrics.jsonl. Client 0 is
    # slow in rounds 3-4 (it sleeps, then answers normally: the results do not change), so the kill
    # lands mid-run however fast the machine; the resumed run keeps the config and is slow there too.
    # zeroshot trains no rounds: it is killed during its setup, once its config.toml is written.
    slow = ["--set", "faults.mode=slow", "--set", "faults.clients=[0]", "--set", "faults.rounds=[3, 4]",
            "--set", "faults.delay_s=1"]
    victim = _feddtl(*run_args, "--set", f"method={method}", *slow, "--out", str(tmp_path))
    _wait_for_rows(victim, tmp_path, 0 if method == "zeroshot" else 2)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "results.json").exists()
    # execute: resume through the CLI, in this process (a second subprocess would only add its start-up time)
    assert cli_main(["run", "--resume", str(tmp_path), "--quiet"]) == 0
    # assert
    assert_same_run(tmp_path, reference_of(method))
    if method != "zeroshot":
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


def test_fresh_run_into_a_finished_directory_drops_its_results(run_args, tmp_path):
    # prepare: an earlier run's results and weights; the new run into the same directory stops in round 1
    (tmp_path / "results.json").write_text('{"method": "feddtl"}')
    (tmp_path / "final_lora.safetensors").write_bytes(b"old")
    config = load_config("tiny", run_args[3::2] + ["faults.mode=drop", "faults.rounds=[1]"])
    # execute
    with pytest.raises(RoundFailed):
        run_experiment(config, tmp_path, progress=False, log_fn=lambda s: None)
    # assert: nothing says "finished" any more, so --resume continues the new run
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "final_lora.safetensors").exists()
    assert load_checkpoint(tmp_path, config).round == 0


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


# ----- stopping on a signal -------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_stops_between_rounds_and_resumes_to_identical_results(run_args, reference, tmp_path):
    # prepare: a run whose client 0 is slow in rounds 2-4 (results unchanged), so SIGTERM lands mid-round
    slow = ["--set", "faults.mode=slow", "--set", "faults.clients=[0]", "--set", "faults.rounds=[2, 3, 4]",
            "--set", "faults.delay_s=1"]
    victim = _feddtl(*run_args, *slow, "--out", str(tmp_path))
    _wait_for_rows(victim, tmp_path, 1)
    # execute
    victim.send_signal(signal.SIGTERM)
    _, err = victim.communicate(timeout=300)
    # assert: exit 3, the round it stopped at is complete on disk and in the checkpoint, no temporary file
    assert victim.returncode == 3, err[-2000:]
    match = re.search(rf"SIGTERM received: stopped at round (\d); resume with `feddtl run --resume {re.escape(str(tmp_path))}`", err)
    assert match, err[-2000:]
    stopped = int(match.group(1))
    assert 1 <= stopped < 4 and "Traceback" not in err
    assert list(tmp_path.rglob("*.tmp")) == [] and not (tmp_path / "results.json").exists()
    assert load_checkpoint(tmp_path, load_run_config(tmp_path)).round == stopped
    assert [r["round"] for r in RunDir(tmp_path).read_metrics()] == list(range(1, stopped + 1))
    # assert: resuming finishes it exactly like the uninterrupted run
    run_experiment(load_run_config(tmp_path), tmp_path, progress=False, log_fn=lambda s: None, resume=True)
    assert_same_run(tmp_path, reference)


def test_stop_request_checkpoints_the_last_completed_round(run_args, reference, tmp_path):
    # prepare: checkpoints only at the end (checkpoint.every = 0); a stop is requested during round 2
    config = load_config("tiny", run_args[3::2] + ["checkpoint.every=0"])
    stop = StopRequest()

    def log(line: str) -> None:  # tiny evaluates (and logs) in rounds 2 and 4
        if line.startswith("round   2/"):
            stop.request("SIGINT")

    # execute
    with pytest.raises(RunStopped) as stopped:
        run_experiment(config, tmp_path, progress=False, log_fn=log, stop=stop)
    # assert: it stopped after round 2, which it checkpointed although none was due
    assert (stopped.value.round, stopped.value.reason) == (2, "SIGINT")
    assert load_checkpoint(tmp_path, config).round == 2
    run_experiment(load_run_config(tmp_path), tmp_path, progress=False, log_fn=lambda s: None, resume=True)
    assert_same_run(tmp_path, reference)


def test_a_stop_during_the_last_round_lets_the_run_finish(run_args, reference, tmp_path):
    # prepare: the stop comes during round 4 of 4: finishing is as quick as stopping
    stop = StopRequest()

    def log(line: str) -> None:
        if line.startswith("round   4/"):
            stop.request("SIGTERM")

    # execute
    run_experiment(load_config("tiny", run_args[3::2]), tmp_path, progress=False, log_fn=log, stop=stop)
    # assert
    assert_same_run(tmp_path, reference)


@pytest.mark.parametrize(
    "started_with",
    # Python's own handler, and SIGINT ignored (as bash leaves it for a script's background job)
    [signal.default_int_handler, signal.SIG_IGN],
    ids=["python-handler", "ignored"],
)
def test_signals_set_the_stop_request_and_a_second_one_stops_at_once(started_with):
    # prepare: the SIGINT handler the process started with, whatever the shell that started pytest left
    outer = signal.signal(signal.SIGINT, started_with)
    try:
        stop = StopRequest()
        # execute / assert: the first SIGINT only asks for a stop; the second stops at once (KeyboardInterrupt)
        with stop_on_signals(stop):
            signal.raise_signal(signal.SIGINT)
            assert stop.reason == "SIGINT"
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
        # assert: the handlers are put back on the way out
        assert signal.getsignal(signal.SIGINT) is started_with
    finally:
        signal.signal(signal.SIGINT, outer)


# ----- what --resume refuses or leaves alone ------------------------------------------------------


def test_resume_of_a_finished_run_says_so_and_changes_nothing(reference, tmp_path, capsys):
    # prepare: a finished run written by another engine (the Flower simulation)
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    results = json.loads((run / "results.json").read_text())
    (run / "results.json").write_text(json.dumps({**results, "engine": "flower-sim"}))
    before = _snapshot(run)
    # execute
    code = cli_main(["run", "--resume", str(run), "--quiet"])
    # assert
    out = capsys.readouterr().out
    assert code == 0
    assert f"{run} is finished" in out and "engine flower-sim" in out and "nothing changed" in out
    assert _snapshot(run) == before


@pytest.fixture
def stopped_run(run_args, tmp_path) -> Path:
    """A run that stopped after round 2 of 4 (every client fails round 3)."""
    config = load_config("tiny", run_args[3::2] + ["faults.mode=drop", "faults.rounds=[3]"])
    with pytest.raises(RoundFailed):
        run_experiment(config, tmp_path, progress=False, log_fn=lambda s: None)
    return tmp_path


@pytest.mark.parametrize("lost", ["state.json", "the checkpoint folder"])
def test_lost_checkpoint_is_an_error_unless_restart(stopped_run, reference, capsys, lost):
    # prepare: the state.json (or the whole checkpoint) of a run with completed rounds is gone
    folder = stopped_run / "checkpoint"
    if lost == "state.json":
        (folder / "state.json").unlink()
    else:
        shutil.rmtree(folder)
    before = _snapshot(stopped_run)
    # execute
    code = cli_main(["run", "--resume", str(stopped_run), "--quiet"])
    # assert: exit 2 with one line that says what is missing and how to start again; nothing changed
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "state.json is missing" in err and f"--resume {stopped_run} --restart" in err
    assert _snapshot(stopped_run) == before
    # execute / assert: --restart runs it again from round 1, with its config.toml (faults off now)
    assert cli_main(["run", "--resume", str(stopped_run), "--restart", "--set", "faults.mode=none", "--quiet"]) == 0
    assert_same_run(stopped_run, reference)


def test_restart_needs_resume(tmp_path, capsys):
    code = cli_main(["run", "--config", "tiny", "--out", str(tmp_path), "--restart", "--quiet"])
    assert code == 2 and "--restart goes with --resume" in capsys.readouterr().err


def test_method_that_cannot_resume_is_refused_before_the_build(run_args, tmp_path, monkeypatch):
    # prepare: a stopped fedlora run, then fedlora loses its load_checkpoint_state
    config = load_config("tiny", run_args[3::2] + ["method=fedlora", "faults.mode=drop", "faults.rounds=[2]"])
    with pytest.raises(RoundFailed):
        run_experiment(config, tmp_path, progress=False, log_fn=lambda s: None)
    monkeypatch.setattr(FedLoRA, "load_checkpoint_state", Method.load_checkpoint_state)
    built = []
    # execute / assert
    with pytest.raises(CheckpointError, match=r"method 'fedlora' cannot resume from a checkpoint; .*--restart"):
        run_experiment(load_run_config(tmp_path), tmp_path, progress=False, log_fn=lambda s: None, resume=True,
                       build=lambda *a, **k: built.append(1))
    assert built == []
    assert load_checkpoint(tmp_path, load_run_config(tmp_path)).round == 1  # the stopped run is intact


def test_every_training_method_can_resume():
    from feddtl.methods import get_method

    assert [m for m in TRAINING if not get_method(m).resumable()] == []


def test_a_key_added_later_at_its_default_does_not_block_a_resume(tmp_path):
    # prepare: a run's config.toml as an older feddtl wrote it, without a key this version added
    config = load_config("tiny")
    old_text = "\n".join(line for line in to_toml(config).splitlines() if not line.startswith("base_novel_seed"))
    (tmp_path / "old.toml").write_text(old_text)
    # execute
    old = load_config(str(tmp_path / "old.toml"))
    # assert: same fingerprint; a value that changed, or an operational section, behave as before
    assert config_fingerprint(old) == config_fingerprint(config)
    assert config_fingerprint(load_config("tiny", ["client.lr=0.01"])) != config_fingerprint(config)
    assert config_fingerprint(load_config("tiny", ["robustness.max_round_retries=3"])) == config_fingerprint(config)
