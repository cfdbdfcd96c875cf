"""FedPGP on a tiny random CLIP: what stays personal, what is averaged, the contrastive loss, Local accuracy
with the personal prompts, validation of the uploaded prompt tensors, accounting, determinism and resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network

import pytest
import torch

from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.algorithm.validation import validate_update
from feddtl.backbones.tiny_clip import build_tiny_clip
from feddtl.config import ConfigError, load_config
from feddtl.evaluation import evaluate, local_accuracy
from feddtl.federation import build_federation
from feddtl.flower import records
from feddtl.methods.fedpgp import contrastive_loss, personal_init
from feddtl.server.rundir import RunDir, result_fields
from feddtl.server.accounting import round_communication, tensor_bytes
from feddtl.methods.text_side import with_base_text
from feddtl.server.experiment import build_method, run_experiment
from feddtl.server.faults import corrupt_update
from feddtl.server.robust import RoundFailed, update_spec

ROUNDS = 2


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0, image_size=32, num_layers=4)


def _overrides(clip_dir: Path, *extra: str) -> list[str]:
    return ["method=fedpgp", f"backbone=hf-clip:{clip_dir}", f"rounds={ROUNDS}", "eval.every=1",
            "data.image_size=32", "data.test_per_class=5", "shots=4", *extra]


@pytest.fixture(scope="module")
def fed(clip_dir):
    return build_federation(load_config("tiny", _overrides(clip_dir)), log_fn=lambda s: None)


@pytest.fixture(scope="module")
def reference(clip_dir, tmp_path_factory) -> Path:
    """An uninterrupted 2-round fedpgp run."""
    out = tmp_path_factory.mktemp("fedpgp_reference")
    run_experiment(load_config("tiny", _overrides(clip_dir)), out, progress=False, log_fn=lambda s: None)
    return out


def _round(fed, method, clients: list[int], round_num: int = 1) -> tuple[dict[int, ClientTask], list[ClientUpdate]]:
    """One round of ``method`` on ``clients`` the way the loop runs it: per-client tasks, then the server."""
    task = method.make_task(round_num)
    tasks = {k: method.client_task(task, k) for k in clients}
    updates = [method.client_step(fed.backbone, with_base_text(fed.clients[k], fed.base_text), tasks[k], fed.config, 100 + k) for k in clients]
    return tasks, updates


def _same_run(a: Path, b: Path) -> None:
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (a, b))
    assert result_fields(ra) == result_fields(rb)
    assert [result_fields(r) for r in RunDir(a).read_metrics()] == [result_fields(r) for r in RunDir(b).read_metrics()]
    assert (a / "final_lora.safetensors").read_bytes() == (b / "final_lora.safetensors").read_bytes()


# ----- the loss -----------------------------------------------------------------------------------


def test_contrastive_loss_is_the_two_way_cross_entropy_per_class():
    # prepare: two classes in 2-D; class 0's anchor is nearer the positive, class 1's nearer the negative
    anchor = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    positive = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    negative = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    cos_p = torch.tensor([1 / math.sqrt(2), 0.0])
    cos_n = torch.tensor([0.0, 1.0])
    for tau in (1.0, 0.5):
        # execute
        loss = contrastive_loss(anchor, positive, negative, tau)
        # assert: CE with target 0 of [pos, neg] / tau is log(1 + exp((neg - pos) / tau)), averaged over classes
        expected = torch.log1p(torch.exp((cos_n - cos_p) / tau)).mean()
        torch.testing.assert_close(loss, expected)


def test_personal_initialisation_is_seeded_by_run_and_client():
    u0, v0 = personal_init(0, 0, 4, 8, 16)
    assert u0.shape == (4, 8) and v0.shape == (8, 16)
    assert torch.equal(u0, personal_init(0, 0, 4, 8, 16)[0])
    assert not torch.equal(u0, personal_init(0, 1, 4, 8, 16)[0])
    assert not torch.equal(u0, personal_init(1, 0, 4, 8, 16)[0])
    assert 0.01 < float(torch.cat([u0.flatten(), v0.flatten()]).std()) < 0.03  # N(0, 0.02^2)


# ----- what is personal, what is averaged ---------------------------------------------------------


def test_personal_factors_stay_personal_and_only_sigma_is_averaged(fed):
    # prepare
    method = build_method(fed)
    init = [tuple(t.clone() for t in method.personal[k]) for k in range(2)]
    # execute
    tasks, updates = _round(fed, method, [0, 1])
    method.server_update(updates, 1)
    # assert: each client was sent its own U, V and the same sigma
    assert all(torch.equal(tasks[k].extra["U"], init[k][0]) for k in (0, 1))
    assert torch.equal(tasks[0].extra["sigma"], tasks[1].extra["sigma"])
    # the server keeps each client's trained U, V as uploaded (not averaged); they moved and differ
    for k, update in enumerate(updates):
        assert torch.equal(method.personal[k][0], update.extra["U"])
        assert torch.equal(method.personal[k][1], update.extra["V"])
        assert not torch.equal(update.extra["U"], init[k][0]) and not torch.equal(update.extra["V"], init[k][1])
    assert not torch.allclose(method.personal[0][1], method.personal[1][1])
    # sigma is the sample-weighted average of the uploaded sigmas
    n = torch.tensor([u.num_samples for u in updates], dtype=torch.float64)
    sigmas = torch.stack([u.extra["sigma"].double() for u in updates])
    torch.testing.assert_close(method.sigma.double(), (sigmas * (n / n.sum())[:, None, None]).sum(0))
    # a client that was not in the round keeps its initial U, V
    assert torch.equal(method.personal[2][0], personal_init(fed.config.seed, 2, *init[0][0].shape, init[0][1].shape[1])[0])


def test_contrastive_weight_zero_trains_with_cross_entropy_only(fed, clip_dir):
    # prepare
    config = load_config("tiny", _overrides(clip_dir, "fedpgp.contrastive_weight=0"))
    method = build_method(type(fed)(**{**vars(fed), "config": config}))
    task = method.client_task(method.make_task(1), 0)
    # execute
    with_con = build_method(fed).client_step(fed.backbone, with_base_text(fed.clients[0], fed.base_text), task, fed.config, 7)
    without = method.client_step(fed.backbone, with_base_text(fed.clients[0], fed.base_text), task, config, 7)
    # assert: the contrastive term is reported and changes the training; without it, it is absent
    assert "loss_extra" in with_con.metrics and "loss_extra" not in without.metrics
    assert not torch.equal(with_con.extra["sigma"], without.extra["sigma"])


# ----- evaluation ---------------------------------------------------------------------------------


def test_local_accuracy_scores_each_client_with_its_own_logits():
    # prepare: 4 test images of classes 0..3; shared logits right everywhere, client 1's own logits wrong
    labels = torch.tensor([0, 1, 2, 3])
    right = torch.eye(4)
    wrong = torch.eye(4)[[1, 0, 3, 2]]
    classes = [[0, 1], [2, 3]]
    # execute / assert
    assert local_accuracy(right, labels, classes) == [100.0, 100.0]
    assert local_accuracy(right, labels, classes, [right, wrong]) == [100.0, 0.0]


def test_local_accuracy_uses_the_personal_prompts_and_base_novel_the_global_one(fed):
    # prepare: one trained round
    method = build_method(fed)
    _, updates = _round(fed, method, [0, 1, 2])
    method.server_update(updates, 1)
    # execute
    base_T, novel_T = method.prepare_eval()
    client_T = method.prepare_local_eval()
    shared = evaluate(fed.backbone, fed.eval_set, base_T, novel_T, 64)
    personal = evaluate(fed.backbone, fed.eval_set, base_T, novel_T, 64, client_base_T=client_T)
    same = evaluate(fed.backbone, fed.eval_set, base_T, novel_T, 64, client_base_T=[base_T] * len(client_T))
    # assert: one embedding set per client, each its own and none the global one
    assert len(client_T) == fed.config.num_clients
    assert all(T.shape == base_T.shape and not torch.allclose(T, base_T) for T in client_T)
    assert not torch.allclose(client_T[0], client_T[1])
    # Base / Novel never depend on the personal prompts; the shared embeddings reproduce the default Local
    assert (personal["base_acc"], personal["novel_acc"]) == (shared["base_acc"], shared["novel_acc"])
    assert same == shared
    # and Local is computed from each client's own logits
    from feddtl.algorithm.encoding import image_embeddings

    zb = image_embeddings(fed.backbone, fed.eval_set.base_features, 64)
    expected = local_accuracy(zb @ base_T.T, fed.eval_set.base_labels, fed.eval_set.client_classes,
                              [zb @ T.T for T in client_T])
    assert personal["local_acc_per_client"] == expected


# ----- validation, accounting, Flower records -----------------------------------------------------


@pytest.mark.parametrize(
    "mode,reason",
    [
        ("nan_lora", "extra[sigma] holds non-finite values"),
        ("bad_shape", "extra[sigma] has shape"),
        ("bad_keys", "extra keys differ"),
        ("huge_norm", "above the bound"),
    ],
)
def test_corrupt_prompt_updates_are_rejected_with_the_reason(fed, mode, reason):
    # prepare: an honest update and what the server expects of it
    method = build_method(fed)
    tasks, (update,) = _round(fed, method, [1])
    spec = update_spec(fed, tasks[1], 1, extra_reference=method.update_extra_reference(tasks[1]))
    assert validate_update(update, spec) is None
    # execute
    why = validate_update(corrupt_update(update, mode, spec), spec)
    # assert
    assert why is not None and reason in why


def test_an_update_without_its_personal_factors_is_rejected(fed):
    method = build_method(fed)
    tasks, (update,) = _round(fed, method, [0])
    spec = update_spec(fed, tasks[0], 0, extra_reference=method.update_extra_reference(tasks[0]))
    update.extra.pop("U")
    assert "missing ['U']" in validate_update(update, spec)


def test_round_communication_counts_each_clients_own_task():
    # prepare: two asks of client 0 (a retry) and one of client 1, whose personal tensors are larger
    shared = ClientTask(round=1, stage="sft", image_lora={}, class_embeddings=torch.zeros(0, 4),
                        extra={"sigma": torch.zeros(2, 4)})
    t0 = ClientTask(**{**vars(shared), "extra": {**shared.extra, "U": torch.zeros(2, 1)}})
    t1 = ClientTask(**{**vars(shared), "extra": {**shared.extra, "U": torch.zeros(2, 3)}})
    # execute
    row = round_communication(shared, [], asks=3, sent=[t0, t0, t1])
    # assert
    assert row["bytes_down"] == 2 * (32 + 8) + (32 + 24)
    assert row["bytes_down_per_client"] == pytest.approx(row["bytes_down"] / 3)
    assert row["bytes_down_parts"] == {"extra": row["bytes_down"]}


def test_run_writes_finite_results_and_counts_personal_downloads(reference, fed):
    # prepare
    results = json.loads((reference / "results.json").read_text())
    rows = RunDir(reference).read_metrics()
    method = build_method(fed)
    task = method.make_task(1)
    per_client = [tensor_bytes(method.client_task(task, k)) for k in range(fed.config.num_clients)]
    # assert: the run completed with finite accuracies
    assert results["method"] == "fedpgp" and [r["round"] for r in rows] == list(range(1, ROUNDS + 1))
    for key in ("base_acc", "novel_acc", "hm", "local_acc"):
        assert math.isfinite(results[key]), key
    # every client downloaded sigma, the prompt tokens and its own U, V; uploaded sigma, U, V
    assert rows[0]["bytes_down"] == sum(per_client)
    assert per_client[0] > tensor_bytes(task)
    u, v = method.personal[0]
    assert rows[0]["bytes_up"] == fed.config.num_clients * tensor_bytes({"s": method.sigma, "u": u, "v": v})


def test_personal_task_and_update_survive_flower_records(fed):
    # prepare: a personalised task (no image LoRA, no class embeddings) and its update
    method = build_method(fed)
    tasks, (update,) = _round(fed, method, [2])
    backbone = fed.backbone
    # execute
    task_back = records.task_from_records(
        records.task_to_records(tasks[2], ""), backbone.image_lora_state(),
        num_classes=len(fed.classes.base), embed_dim=backbone.info.embed_dim,
    )
    update_back = records.update_from_records(
        records.update_to_records(update), {}, num_classes=len(fed.classes.base),
        embed_dim=backbone.info.embed_dim,
    )
    # assert
    assert task_back.image_lora == {} and list(task_back.extra) == list(tasks[2].extra)
    assert all(torch.equal(task_back.extra[k], v) for k, v in tasks[2].extra.items())
    assert all(torch.equal(update_back.extra[k], v) for k, v in update.extra.items())
    # a NaN in an uploaded prompt tensor is refused at the boundary
    update.extra["U"] = update.extra["U"].clone()
    update.extra["U"][0, 0] = float("nan")
    with pytest.raises(records.RecordError, match="NaN"):
        records.update_from_records(records.update_to_records(update), {}, num_classes=len(fed.classes.base),
                                    embed_dim=backbone.info.embed_dim)


# ----- whole runs ---------------------------------------------------------------------------------


def test_same_seed_same_run(clip_dir, reference, tmp_path):
    run_experiment(load_config("tiny", _overrides(clip_dir)), tmp_path, progress=False, log_fn=lambda s: None)
    _same_run(tmp_path, reference)


def test_stopped_run_resumes_to_the_uninterrupted_results(clip_dir, reference, tmp_path):
    # prepare: every client fails round 2, so the run stops with a checkpoint after round 1
    config = load_config("tiny", _overrides(clip_dir, "faults.mode=raise", "faults.rounds=[2]"))
    with pytest.raises(RoundFailed):
        run_experiment(config, tmp_path, progress=False, log_fn=lambda s: None)
    # execute: resume with the faults switched off
    resumed = load_config("tiny", _overrides(clip_dir, "faults.mode=none", "faults.rounds=[2]"))
    run_experiment(resumed, tmp_path, progress=False, log_fn=lambda s: None, resume=True)
    # assert
    _same_run(tmp_path, reference)


def test_injected_corruption_excludes_only_that_clients_update(clip_dir, tmp_path):
    config = load_config("tiny", _overrides(clip_dir, "faults.mode=nan_lora", "faults.clients=[1]", "faults.rounds=[2]"))
    run_experiment(config, tmp_path, progress=False, log_fn=lambda s: None)
    rows = RunDir(tmp_path).read_metrics()
    assert rows[1]["accepted"] == [0, 2]
    assert rows[1]["rejected"][0]["client"] == 1 and "non-finite" in rows[1]["rejected"][0]["reason"]


@pytest.mark.parametrize(
    "key,value,message",
    [("rank", "0", "fedpgp.rank must be an integer >= 1"), ("temperature", "0", "fedpgp.temperature must be > 0"),
     ("contrastive_weight", "-1", "fedpgp.contrastive_weight must be >= 0"), ("rank", "1.5", "fedpgp.rank")],
)
def test_bad_fedpgp_config_names_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", [f"fedpgp.{key}={value}"])


@pytest.mark.slow
def test_flower_simulation_engine_matches_inprocess(tmp_path):
    """Each SuperNode gets its own U, V (``SuperNodeClients.dispatch`` with per-client tasks): same run."""
    clip = build_tiny_clip(tmp_path / "clip", seed=0, image_size=32)
    overrides = ["method=fedpgp", "num_clients=2", "rounds=2", "classes_per_client=3", f"backbone='hf-clip:{clip}'"]
    run_experiment(load_config("tiny", overrides), tmp_path / "inprocess", progress=False, log_fn=lambda s: None)
    args = [sys.executable, "-m", "feddtl", "run", "--config", "tiny", "--engine", "flower-sim", "--quiet",
            "--out", str(tmp_path / "sim")]
    for item in overrides:
        args += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"), "OMP_NUM_THREADS": "1",
           "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, start_new_session=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    def comparable(row: dict) -> dict:
        return {k: v for k, v in result_fields(row).items() if k not in ("engine", "cache")}

    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("inprocess", "sim"))
    assert comparable(a) == comparable(b)
    rows = [[comparable(r) for r in RunDir(tmp_path / d).read_metrics()] for d in ("inprocess", "sim")]
    assert rows[0] == rows[1]
