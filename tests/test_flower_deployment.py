"""FedDTL on Flower across OS processes: the Deployment Engine on loopback (TLS + SuperNode
authentication) and the Simulation Engine, each against the in-process run of the same config.

Every Flower process is started in its own session and ended in fixture teardown, also on failure.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import feddtl
from feddtl.backbones.tiny_clip import build_tiny_clip
from feddtl.config import load_config
from feddtl.flower.certs import write_dev_pki
from feddtl.flower.deploy import COMPLETED, LocalDeployment, flower_bin_dir
from feddtl.flower.warm_protocol import running_workers
from feddtl.flower.versions import TEST_FEDDTL_VERSION
from feddtl.server.rundir import result_fields
from feddtl.server.experiment import run_experiment

from image_folders import write_digit_folder

REPO = Path(__file__).resolve().parents[1]
# tiny with two clients (pathological needs 2 x 3 classes to cover the 5 base classes), two rounds.
OVERRIDES = ["num_clients=2", "rounds=2", "classes_per_client=3"]
# Besides the machine's measurements (rundir.result_fields drops wall time and memory): the engine's
# name, and the trunk-cache summary, which describes where features live (the Flower server caches only
# the test sets; each client's features are cached on its own node), not what the run computed.
PLACEMENT = ("engine", "cache")


def comparable(row: dict) -> dict:
    return {k: v for k, v in result_fields(row).items() if k not in PLACEMENT}
RUN_TIMEOUT_S = 600.0

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny CLIP loads from a local folder; never the network


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The in-process run of the config both engines run."""
    out = tmp_path_factory.mktemp("inprocess")
    run_experiment(load_config("tiny", OVERRIDES), out, progress=False, log_fn=lambda s: None)
    return out


@pytest.fixture(scope="module")
def tiny_clip_overrides(tmp_path_factory) -> list[str]:
    """The same config on a tiny random CLIP: a backbone built in a second, not the lite one's ~15 s
    text bridge, which every Simulation Engine actor would pay again."""
    path = build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0, image_size=32)
    return [*OVERRIDES, f"backbone='hf-clip:{path}'"]


@pytest.fixture(scope="module")
def tiny_clip_reference(tmp_path_factory, tiny_clip_overrides) -> Path:
    out = tmp_path_factory.mktemp("inprocess_tiny_clip")
    run_experiment(load_config("tiny", tiny_clip_overrides), out, progress=False, log_fn=lambda s: None)
    return out


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """node0, node1 and node2: the third key restarts a SuperNode under a new node id."""
    folder = tmp_path_factory.mktemp("certs")
    write_dev_pki(folder, nodes=3)
    return folder


@pytest.fixture(scope="module")
def stranger(tmp_path_factory) -> Path:
    """Another CA and a node key that the SuperLink never registered."""
    folder = tmp_path_factory.mktemp("stranger")
    write_dev_pki(folder, nodes=1)
    return folder


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, certs):
    """A SuperLink with TLS and SuperNode authentication on, node0 and node1 registered."""
    dep = LocalDeployment(tmp_path_factory.mktemp("deployment"), certs)
    try:
        dep.start_superlink()
        for k in range(2):
            dep.register(certs / f"node{k}.pub")
        yield dep
    finally:
        dep.stop()
    leftovers = [name for name, proc in dep.procs.items() if proc.poll() is None]
    assert not leftovers, f"processes left running: {leftovers}"
    _assert_warm_workers_follow_their_supernodes(dep)


def _assert_warm_workers_follow_their_supernodes(dep: LocalDeployment) -> None:
    """The SuperNodes' warm workers (detached: dep.stop() does not signal them) exit once their SuperNode is gone."""
    _wait_for("the warm workers to exit", lambda: not running_workers(dep.folder), timeout=15, poll=0.2)


@pytest.fixture
def own_deployment(tmp_path, certs):
    """A SuperLink of the test's own, node0..node2 registered: a test that kills processes or leaves
    nodes running shares nothing with the next one."""
    dep = LocalDeployment(tmp_path / "deployment", certs)
    try:
        dep.start_superlink()
        for k in range(3):
            dep.register(certs / f"node{k}.pub")
        yield dep
    finally:
        dep.stop()
    _assert_warm_workers_follow_their_supernodes(dep)


@pytest.fixture(scope="module")
def tiny_clip_reference_of(tmp_path_factory, tiny_clip_overrides):
    """The in-process run of the tiny-CLIP config with more overrides, made once per list."""
    made: dict[tuple[str, ...], Path] = {}

    def reference(*more: str) -> Path:
        if more not in made:
            out = tmp_path_factory.mktemp("inprocess_tiny_clip_more")
            run_experiment(load_config("tiny", [*tiny_clip_overrides, *more]), out, progress=False, log_fn=lambda s: None)
            made[more] = out
        return made[more]

    return reference


def run_config(overrides: list[str], **keys: str) -> str:
    """`--run-config` text: ``overrides`` as one string (double-quoted: items may hold single quotes)."""
    return " ".join([f'overrides="{" ".join(overrides)}"', *(f"{k}='{v}'" for k, v in keys.items())])


def _values_match(a, b, path: str) -> list[str]:
    """Differences between two JSON values, numbers compared within floating-point tolerance."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}: keys {sorted(set(a) ^ set(b))} differ"] if set(a) != set(b) else []
        return out + [d for k in sorted(set(a) & set(b)) for d in _values_match(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _values_match(x, y, f"{path}[{i}]")]
    if isinstance(a, float) or isinstance(b, float):
        ok = isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6)
        return [] if ok else [f"{path}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def assert_same_run(
    run: Path, reference: Path, engine: str, rounds: int = 2, ignore: tuple[str, ...] = (), exact: bool = False
) -> None:
    """Same results, per-round metrics, config and final weights as the in-process run.

    The engines call the same functions on the same inputs in the same order (updates are aggregated
    in partition order), so exact equality holds when the client processes use the in-process run's
    torch thread count: the Deployment Engine's did, and its numbers came out bit-identical. The
    Simulation Engine's Ray actors run with OMP_NUM_THREADS = their num_cpus (1), and a different
    thread count splits the floating-point sums inside matrix products differently: with the tiny
    CLIP the client weights then differ in the last bits (~1e-7), which the server's text step carries
    on (checked: an in-process run with its client steps at one thread reproduces the simulation's
    numbers exactly). Hence the tolerances: 1e-5 relative on metrics, and on weights 1e-5 absolute,
    one percent of a single Adam step (lr 1e-3).
    ``ignore``: prefixes of result and metrics keys left out (what a run with failures adds: its
    failure lists, retries, and the traffic of the retried tasks). ``exact``: bit for bit, no tolerance
    (the Deployment Engine, whose clients use the in-process thread count).
    """
    def fields(row: dict) -> dict:
        return {k: v for k, v in comparable(row).items() if not any(k.startswith(p) for p in ignore)}

    results = json.loads((run / "results.json").read_text())
    expected = json.loads((reference / "results.json").read_text())
    assert results["engine"] == engine and expected["engine"] == "inprocess"
    assert results["rounds"] == rounds and results["num_clients"] == 2
    assert _values_match(fields(expected), fields(results), "results") == []
    rows = [fields(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]
    expected_rows = [fields(json.loads(line)) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert _values_match(expected_rows, rows, "metrics") == []
    assert (run / "config.toml").read_text() == (reference / "config.toml").read_text()
    weights, expected_weights = load_file(run / "final_lora.safetensors"), load_file(reference / "final_lora.safetensors")
    assert list(weights) == list(expected_weights)
    for name, tensor in expected_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    if exact:
        assert fields(results) == fields(expected) and rows == expected_rows
        assert all(torch.equal(weights[name], tensor) for name, tensor in expected_weights.items())


def _wait_exit(proc: subprocess.Popen, timeout: float) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    return proc.poll()


def test_unregistered_supernode_is_refused(deployment, stranger) -> None:
    proc = deployment.start_supernode(0, 2, stranger / "node0", name="unregistered")
    code = _wait_exit(proc, 60)
    log = deployment.log_tail("unregistered")
    assert code is not None and code != 0, f"an unregistered SuperNode was not refused:\n{log}"
    assert "Failed to activate SuperNode" in log


def test_supernode_that_does_not_trust_the_superlink_certificate_is_refused(deployment, certs, stranger) -> None:
    proc = deployment.start_supernode(0, 2, certs / "node0", name="wrong-ca", root_certificates=stranger / "ca.crt")
    code = _wait_exit(proc, 60)
    log = deployment.log_tail("wrong-ca")
    assert code is not None and code != 0, f"a SuperNode connected without trusting the CA:\n{log}"
    assert "CERTIFICATE_VERIFY_FAILED" in log


@pytest.mark.slow
def test_deployment_engine_matches_inprocess(deployment, certs, reference, tmp_path) -> None:
    """Two SuperNodes compute what the in-process run computes, to the last bit, whichever way a node serves
    its messages: node 0 in its flwr-clientapp processes (warm-worker=false), node 1 through its warm worker
    (the default), which is killed once round 1 is checkpointed, so round 2's message finds it dead (a new
    worker is started) or dying (the message is served in process)."""
    # prepare: two SuperNodes, separate OS processes, each holding one partition
    deployment.start_supernode(0, 2, certs / "node0", node_config="warm-worker=false")
    deployment.start_supernode(1, 2, certs / "node1")
    out = tmp_path / "run"
    overrides = " ".join(OVERRIDES)
    # execute: submit with `flwr run` from the repository root (the Flower App in pyproject.toml), kill
    # node 1's warm worker between rounds
    run_id = deployment.submit(REPO, f"overrides='{overrides}' out='{out}'")
    _wait_for("round 1's checkpoint", lambda: _checkpoint_round(out) >= 1)
    (killed,) = running_workers(deployment.folder)
    os.kill(killed, signal.SIGKILL)
    row = deployment.wait_run(run_id, RUN_TIMEOUT_S)
    # assert: the run's final status (`flwr run` exits 0 for failed runs too), then the numbers
    assert row["status"] == COMPLETED, f"run {run_id}: {row['status']} {row['status-details']}\n{deployment.run_log(run_id)}"
    assert_same_run(out, reference, engine="flower-deployment", exact=True)
    # node 0 never used a worker; node 1's worker served its hello and round 1, then round 2 was served by a
    # new worker or, in process, after one line
    assert warm_pids(deployment.log_tail("supernode0", 1_000_000)) == []
    node1 = deployment.log_tail("supernode1", 1_000_000)
    pids = warm_pids(node1)
    assert pids[:2] == [killed, killed], node1
    assert (len(pids) == 3 and pids[2] != killed) or (len(pids) == 2 and "died mid-message" in node1), node1


def warm_pids(log: str) -> list[int]:
    """The warm worker pid of each message a SuperNode's log says a worker served."""
    return [int(line.split("warm worker pid ")[1].split()[0]) for line in log.splitlines() if " served the " in line]


def _wait_for(what: str, check, timeout: float = RUN_TIMEOUT_S, poll: float = 0.5) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(poll)


def _nodes_received(dep: LocalDeployment, run_id: int, server_round: int, nodes: int = 2) -> bool:
    """Whether every SuperNode's log says it received run ``run_id``'s train message of ``server_round``."""
    header = f"[RUN {run_id}, ROUND {server_round}]"
    for k in range(nodes):
        lines = dep.log_tail(f"supernode{k}", 1_000_000).splitlines()
        if not any(header in line and "Received successfully" in "".join(lines[i + 1 : i + 3])
                   for i, line in enumerate(lines)):
            return False
    return True


def _checkpoint_round(run: Path) -> int:
    """The round of the run's last checkpoint (-1: none yet)."""
    try:
        return int(json.loads((run / "checkpoint" / "state.json").read_text())["round"])
    except (OSError, ValueError, KeyError):
        return -1


@pytest.mark.slow
def test_supernode_with_another_version_is_refused(own_deployment, certs, tiny_clip_overrides, tmp_path) -> None:
    # prepare: node 1 reports another feddtl version (the node-config test hook; nothing reinstalled)
    dep = own_deployment
    dep.start_supernode(0, 2, certs / "node0")
    dep.start_supernode(1, 2, certs / "node1", node_config=f'{TEST_FEDDTL_VERSION}="9.9.9"')
    out = tmp_path / "run"
    # execute
    run_id = dep.submit(REPO, run_config(tiny_clip_overrides, out=str(out)))
    row = dep.wait_run(run_id, RUN_TIMEOUT_S)
    # assert: the run fails at the handshake, naming the node's partition and the difference; nothing trained
    log = dep.run_log(run_id)
    assert row["status"] != COMPLETED, log
    assert f"(partition 1) differs from the server: feddtl: {feddtl.__version__} on the server, 9.9.9 on the node" in log
    assert "flower.allow_version_mismatch" in log
    assert _checkpoint_round(out) == -1 and not (out / "results.json").exists()


@pytest.mark.slow
def test_resume_after_serverapp_and_superlink_crashes_matches_inprocess(
    own_deployment, certs, tiny_clip_overrides, tiny_clip_reference_of, tmp_path
) -> None:
    """Three rounds: the ServerApp is killed during round 2, the resumed run's SuperLink (with its
    ServerApp) during round 3; a new `flwr run` with ``resume`` each time, and the result is the
    uninterrupted in-process run's."""
    dep = own_deployment
    overrides = [*tiny_clip_overrides, "rounds=3"]
    for k in range(2):
        dep.start_supernode(k, 2, certs / f"node{k}")
    out = tmp_path / "run"
    # a ServerApp killed once both nodes hold round 2's message. Not earlier: killed while it still sends
    # that message, the nodes wait for its rest until the SuperLink declares the run dead (2 x 30 s after
    # the ServerApp's last heartbeat, flwr 1.42), which would only make this test a minute slower.
    first = dep.submit(REPO, run_config(overrides, out=str(out)))
    _wait_for("both nodes to receive round 2", lambda: _nodes_received(dep, first, 2), poll=0.1)
    dep.kill_serverapp()
    assert _checkpoint_round(out) >= 1
    # resumed; then the SuperLink and everything it started killed once both nodes hold round 3's message
    second = dep.submit(REPO, run_config([], resume=str(out)))
    _wait_for("both nodes to receive round 3", lambda: _nodes_received(dep, second, 3), poll=0.1)
    dep.kill("superlink")
    assert _checkpoint_round(out) >= 2 and not (out / "results.json").exists()
    # the SuperLink restarts on its database: the SuperNodes reconnect by themselves
    dep.start_superlink()
    _wait_for("both SuperNodes back online", lambda: dep.online_nodes() == 2, timeout=120, poll=2)
    third = dep.submit(REPO, run_config([], resume=str(out)))
    row = dep.wait_run(third, RUN_TIMEOUT_S)
    assert row["status"] == COMPLETED, f"{row['status']} {row['status-details']}\n{dep.run_log(third)}"
    assert "resuming" in dep.run_log(third)
    assert_same_run(out, tiny_clip_reference_of("rounds=3"), engine="flower-deployment", rounds=3, exact=True)
    # a finished run is left alone: reported, nothing asked, nothing changed
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    fourth = dep.submit(REPO, run_config([], resume=str(out)))
    assert dep.wait_run(fourth, RUN_TIMEOUT_S)["status"] == COMPLETED
    assert "is finished" in dep.run_log(fourth) and "nothing changed" in dep.run_log(fourth)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == before
    del first, second


@pytest.mark.slow
def test_supernode_restarted_mid_round_rejoins(
    own_deployment, certs, tiny_clip_overrides, tiny_clip_reference_of, tmp_path
) -> None:
    """SuperNode 1 is killed while it trains round 1 and restarted with another key (a new node id): the
    server greets it, hands it partition 1, and the round's retry asks it again. min_fit_fraction = 1
    makes the round wait for that retry, so the run still ends as the in-process one."""
    dep = own_deployment
    more = ["robustness.min_fit_fraction=1.0"]
    for k in range(2):
        dep.start_supernode(k, 2, certs / f"node{k}")
    out = tmp_path / "run"
    run_id = dep.submit(REPO, run_config([*tiny_clip_overrides, *more], out=str(out)))
    # execute: kill node 1 as soon as it takes round 1's task; restart it under key node2
    _wait_for("node 1 to take a train message", lambda: "Receiving: train message" in dep.log_tail("supernode1", 100_000))
    dep.kill("supernode1")
    dep.start_supernode(1, 2, certs / "node2", name="supernode1-restarted")
    row = dep.wait_run(run_id, RUN_TIMEOUT_S)
    # assert: completed; round 1 records client 1's failure and the retry; the numbers are the in-process ones
    log = dep.run_log(run_id)
    assert row["status"] == COMPLETED, f"{row['status']} {row['status-details']}\n{log}"
    first_round = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first_round["retries"] == 1 and first_round["accepted"] == [0, 1]
    assert [f["client"] for f in first_round["failed"]] == [1]
    assert "partition 1 rejoined" in log
    assert_same_run(out, tiny_clip_reference_of(*more), engine="flower-deployment",
                    ignore=("failed", "retries", "bytes_"), exact=True)


RUN_CLASSES = ["zero", "one", "two", "three", "four", "five"]
"""A node-local run's class list: base zero, one, two; novel three, four, five (base_novel = "half")."""


@pytest.mark.slow
def test_supernodes_with_their_own_data_train_and_evaluate_on_their_nodes(
    own_deployment, certs, tiny_clip_overrides, tmp_path
) -> None:
    # prepare: the server holds only the class list; each node an image folder of its own, other classes
    # (node 0 names one class otherwise, "One", and holds "zebra", which the run does not know)
    dep = own_deployment
    classes = tmp_path / "classes.txt"
    classes.write_text("\n".join(RUN_CLASSES) + "\n")
    folders = [
        write_digit_folder(tmp_path / "org0", {"zero": 0, "One": 1, "three": 3, "zebra": 9}, per_class=10),
        write_digit_folder(tmp_path / "org1", {"one": 1, "two": 2, "four": 4, "five": 5}, per_class=10, skip=10),
    ]
    for k, folder in enumerate(folders):
        dep.start_supernode(k, 2, certs / f"node{k}", node_config=f'data="imagefolder:{folder}"')
    out = tmp_path / "run"
    overrides = [*tiny_clip_overrides, "dataset='node-local'", f"data.class_names_file='{classes}'"]
    # execute
    run_id = dep.submit(REPO, run_config(overrides, out=str(out)))
    row = dep.wait_run(run_id, RUN_TIMEOUT_S)
    # assert: completed; the server warned about node 0's unknown class and wrote what each node reported
    log = dep.run_log(run_id)
    assert row["status"] == COMPLETED, f"{row['status']} {row['status-details']}\n{log}"
    assert "(partition 0): its classes ['zebra'] are not in the run's class list; excluded" in log
    nodes = json.loads((out / "nodes.json").read_text())["partitions"]
    assert nodes["0"]["excluded_classes"] == ["zebra"] and nodes["1"]["excluded_classes"] == []
    # 10 images a class: 2 held out (data.test_fraction 0.2), 8 trained on (shots = 8)
    assert nodes["0"]["train_per_class"] == {"zero": 8, "one": 8} and nodes["1"]["train_per_class"] == {"one": 8, "two": 8}
    assert nodes["0"]["test_per_class"]["novel"] == {"three": 2, "four": 0, "five": 0}
    # the nodes evaluated: counts per node and class, pooled by count
    results = json.loads((out / "results.json").read_text())
    assert results["evaluation"] == "nodes" and results["engine"] == "flower-deployment"
    counts = results["eval_counts"]
    assert counts["per_class"]["base"]["classes"] == RUN_CLASSES[:3]
    assert counts["per_class"]["base"]["total"] == [2, 4, 2] and counts["per_class"]["novel"]["total"] == [2, 2, 2]
    assert [counts["per_client"][k]["base"][1] for k in "01"] == [4, 4]
    assert [counts["per_client"][k]["novel"][1] for k in "01"] == [2, 4]
    for group, key in (("base", "base_acc"), ("novel", "novel_acc"), ("local", "local_acc")):
        pooled = counts["per_class"][group]
        assert math.isclose(results[key], 100 * sum(pooled["correct"]) / sum(pooled["total"]))
    assert len(results["local_acc_per_client"]) == 2


@pytest.mark.slow
def test_simulation_engine_cli_matches_inprocess(tiny_clip_overrides, tiny_clip_reference, tmp_path) -> None:
    out = tmp_path / "run"
    args = [sys.executable, "-m", "feddtl", "run", "--config", "tiny", "--engine", "flower-sim", "--quiet", "--out", str(out)]
    for item in tiny_clip_overrides:
        args += ["--set", item]
    # a process of its own: Ray's workers and state never outlive it inside the test session
    proc = subprocess.run(args, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, start_new_session=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_run(out, tiny_clip_reference, engine="flower-sim")


def test_flower_executables_come_with_the_environment() -> None:
    for name in ("flower-superlink", "flower-supernode", "flwr"):
        assert (flower_bin_dir() / name).exists(), f"{name} is not next to {sys.executable}"
