"""The fault table: one row per kind of fault or bad input, each with the error or the excluded update,
and, where rounds ran, a check that no completed round's results were lost or changed.

Round faults run the real in-process loop on a tiny random CLIP (2 rounds, 3 clients; the fault hits
client 1 in round 2). Load-time faults build the bad input (files, configs, checkpoints) for real.
"""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import re
import struct
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from feddtl.backbones.tiny_clip import build_tiny_clip
from feddtl.server.checkpoint import CheckpointError, load_checkpoint, load_run_config, save_checkpoint
from feddtl.cli import main as cli_main
from feddtl.config import ConfigError, load_config
from feddtl.data import DataConfig, DatasetError, load_dataset
from feddtl.federation import build_federation, class_split, client_indices
from feddtl.server.rundir import RunDir, result_fields
from feddtl.server.experiment import build_method, client_runner, run_experiment
from feddtl.server.loop import run_rounds
from feddtl.server.robust import RoundFailed



pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)


@pytest.fixture(scope="module")
def base_overrides(clip_dir) -> list[str]:
    return [f"backbone=hf-clip:{clip_dir}", "rounds=2", "client.switch_round=1", "eval.every=1"]


@pytest.fixture(scope="module")
def bundle(base_overrides):
    """One federation for every row; each run starts from the same initial LoRA."""
    fed = build_federation(load_config("tiny", base_overrides), log_fn=lambda s: None)
    return fed, fed.backbone.image_lora_state(), fed.backbone.text_lora_state()


def run_with(bundle, base_overrides, out: Path, overrides: list[str]):
    """Run the rounds with extra config overrides into ``out``; returns (rows, method)."""
    fed, image0, text0 = bundle
    fed.backbone.load_image_lora(image0)
    fed.backbone.load_text_lora(text0)
    fed = dataclasses.replace(fed, config=load_config("tiny", base_overrides + overrides))
    method = build_method(fed)
    run = RunDir(out)
    run.write_config(fed.config)
    run.reset_metrics()
    clients = client_runner(fed, method)  # in-process clients, inside the fault harness when [faults] asks
    return run_rounds(fed, method, clients, run, progress=False, log_fn=lambda s: None), method


@pytest.fixture(scope="module")
def baseline(bundle, base_overrides, tmp_path_factory) -> list[dict]:
    """The fault-free run's metrics rows, as written to metrics.jsonl."""
    out = tmp_path_factory.mktemp("baseline")
    run_with(bundle, base_overrides, out, [])
    return RunDir(out).read_metrics()


# ----- round faults: the round completes without the faulty client ------------------------------

HIT = ["faults.clients=[1]", "faults.rounds=[2]"]
ROUND_FAULTS = [
    # (fault mode, extra overrides, where it is recorded, the reason)
    ("raise", [], "failed", "raised InjectedFault"),
    ("timeout", ["robustness.client_timeout_s=3", "robustness.min_fit_fraction=0.3"], "failed", "timed out after 3 s"),
    ("slow", ["faults.delay_s=4", "robustness.client_timeout_s=3", "robustness.min_fit_fraction=0.3"], "failed", "timed out"),
    ("drop", [], "failed", "no reply"),
    ("nan_lora", [], "rejected", "holds non-finite values"),
    ("inf_embeddings", [], "rejected", "embeddings hold non-finite values"),
    ("bad_shape", [], "rejected", "has shape"),
    ("bad_keys", [], "rejected", "keys differ from the global model"),
    ("huge_norm", [], "rejected", "above the bound"),
    ("bad_embed_dim", [], "rejected", "wrong dimension"),
    ("bad_labels", [], "rejected", "are not classes of this client"),
    ("too_many_embeddings", [], "rejected", "more than the cap"),
    ("unnormalised", [], "rejected", "not L2-normalised"),
    ("bad_num_samples", [], "rejected", "exceeds the client's"),
    ("wrong_client_id", [], "rejected", "claims client id"),
]


@pytest.mark.parametrize("mode,extra,kind,reason", ROUND_FAULTS, ids=[r[0] for r in ROUND_FAULTS])
def test_round_fault_excludes_the_client_and_keeps_every_round(
    bundle, base_overrides, baseline, tmp_path, mode, extra, kind, reason
):
    # prepare / execute
    rows, method = run_with(bundle, base_overrides, tmp_path, [f"faults.mode={mode}", *HIT, *extra])
    # assert: the fault is recorded with its reason and client 1's update is not aggregated
    last = rows[-1]
    entries = last.get(kind, [])
    assert [e["client"] for e in entries] == [1]
    assert reason in entries[0]["reason"]
    assert 1 not in last["accepted"] and {0, 2} <= set(last["accepted"])
    assert all(torch.isfinite(v).all() for v in method.state_dict().values())
    # assert: both rounds completed and are on disk; round 1 is exactly the fault-free round 1
    on_disk = RunDir(tmp_path).read_metrics()
    assert [r["round"] for r in on_disk] == [1, 2]
    assert on_disk[-1]["base_acc"] is not None
    assert result_fields(on_disk[0]) == result_fields(baseline[0])


def test_retry_recovers_the_round_exactly(bundle, base_overrides, baseline, tmp_path):
    # prepare: two of three clients fail the first attempt of round 2 only (min_fit_fraction 0.5 needs 2)
    overrides = ["faults.mode=raise", "faults.clients=[0, 1]", "faults.rounds=[2]", "faults.attempts=1"]
    # execute
    run_with(bundle, base_overrides, tmp_path, overrides)
    # assert: the round was retried once, every client ended up in it, and it equals the fault-free round
    last = RunDir(tmp_path).read_metrics()[-1]
    assert last["retries"] == 1
    assert [(e["client"], e["attempt"]) for e in last["failed"]] == [(0, 0), (1, 0)]
    assert last["accepted"] == [0, 1, 2]
    ignore = {"failed", "retries", "bytes_down", "bytes_down_parts"}  # the retry downloads the task again
    assert {k: v for k, v in result_fields(last).items() if k not in ignore} == {
        k: v for k, v in result_fields(baseline[-1]).items() if k not in ignore
    }


def test_too_few_clients_stop_the_run_with_a_resumable_checkpoint(bundle, base_overrides, baseline, tmp_path):
    # prepare: every client fails round 2, on the first attempt and on the retry
    overrides = ["faults.mode=raise", "faults.rounds=[2]", "robustness.max_round_retries=1"]
    # execute
    with pytest.raises(RoundFailed, match=r"round 2: 0 of 3 clients answered with a valid update, 2 needed") as info:
        run_with(bundle, base_overrides, tmp_path, overrides)
    # assert: the message names each failure; round 1 is on disk, intact, and in the checkpoint
    assert "client 2: raised InjectedFault" in str(info.value) and info.value.round == 2
    on_disk = RunDir(tmp_path).read_metrics()
    assert [result_fields(r) for r in on_disk] == [result_fields(baseline[0])]
    checkpoint = load_checkpoint(tmp_path, load_run_config(tmp_path))
    assert checkpoint is not None and checkpoint.round == 1 and len(checkpoint.rows) == 1


# ----- attacks: well-formed updates that pass validation; robust aggregation is what meets them -------

ATTACKS = [
    # (fault mode, hit clients, extra overrides, what the row shows)
    ("sign_flip", [1], ["server.aggregation=krum"], "krum picks an honest client"),
    ("scaled", [1], [], "accepted at 0.99 of the bound"),
    ("label_flip", [1], [], "accepted: the labels are its own classes"),
    ("collude", [0, 1], ["server.aggregation=median"], "both accepted at 0.99 of the bound"),
]


@pytest.mark.parametrize("mode,hit,extra,shows", ATTACKS, ids=[r[0] for r in ATTACKS])
def test_attack_passes_validation_inside_the_norm_bound(bundle, base_overrides, baseline, tmp_path, mode, hit, extra, shows):
    # prepare: a bound twice the largest honest norm of the fault-free round 2, and an attack 100x a client's
    # change, so every weight attack must be shrunk to just inside the bound
    bound = 2 * baseline[-1]["update_norm_max"]
    overrides = [f"faults.mode={mode}", f"faults.clients={hit}", "faults.rounds=[2]", "faults.attack_scale=100",
                 f"robustness.max_update_norm={bound}", *extra]
    # execute
    rows, method = run_with(bundle, base_overrides, tmp_path, overrides)
    # assert: nothing failed or was rejected, every client was aggregated; with FedAvg, round 1 is the fault-free one
    last = rows[-1]
    assert last["accepted"] == [0, 1, 2] and "rejected" not in last and "failed" not in last
    assert all(torch.isfinite(v).all() for v in method.state_dict().values())
    if not extra:
        assert result_fields(RunDir(tmp_path).read_metrics()[0]) == result_fields(baseline[0])
    if mode == "label_flip":
        assert last["update_norm_max"] == baseline[-1]["update_norm_max"]  # the weights are the honest ones
    else:
        assert last["update_norm_max"] == pytest.approx(0.99 * bound, rel=1e-5)
    if mode == "sign_flip":
        assert len(last["aggregation_selected"]) == 1 and last["aggregation_selected"] != [1]


@pytest.fixture(scope="module")
def bundle7(base_overrides):
    """Seven IID clients: the fewest for Bulyan with one assumed attacker (4f + 3)."""
    fed = build_federation(load_config("tiny", [*base_overrides, "num_clients=7", "partition=iid"]), log_fn=lambda s: None)
    return fed, fed.backbone.image_lora_state(), fed.backbone.text_lora_state()


def _image_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return float(sum((a[k].double() - b[k].double()).square().sum() for k in a if k.startswith("image.")) ** 0.5)


SEVEN = ["num_clients=7", "partition=iid"]
SIGN_FLIP_1 = ["faults.mode=sign_flip", "faults.clients=[1]", "server.assumed_attackers=1"]


@pytest.fixture(scope="module")
def seven_references(bundle7, base_overrides, tmp_path_factory):
    """(fault-free FedAvg, FedAvg under the attack) state dicts of the seven-client runs."""
    clean = run_with(bundle7, [*base_overrides, *SEVEN], tmp_path_factory.mktemp("clean"), [])[1].state_dict()
    attacked = run_with(bundle7, [*base_overrides, *SEVEN], tmp_path_factory.mktemp("fedavg"), SIGN_FLIP_1)[1].state_dict()
    return clean, attacked


@pytest.mark.parametrize("rule", ["median", "trimmed-mean", "krum", "multi-krum", "bulyan"])
def test_robust_rule_resists_a_sign_flipping_client(bundle7, base_overrides, seven_references, tmp_path, rule):
    # prepare: client 1 of 7 sends its change negated x 10 in both rounds; f = 1
    clean, fedavg = seven_references
    # execute
    rows, robust = run_with(bundle7, [*base_overrides, *SEVEN], tmp_path, [*SIGN_FLIP_1, f"server.aggregation={rule}"])
    # assert: the attack moves FedAvg's image LoRA; the robust rule ends nearer the fault-free model, and the
    # selecting rules never picked client 1
    assert _image_distance(robust.state_dict(), clean) < 0.5 * _image_distance(fedavg, clean)
    assert all(r["accepted"] == list(range(7)) for r in rows)
    if rule in ("krum", "multi-krum"):
        assert all(1 not in r["aggregation_selected"] for r in rows)


# ----- load-time faults: a clear error (or a warning and a skipped file) before any training -----


def _png(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), color=value).save(path)
    return path


def _imagefolder(root: Path, per_class: int = 3) -> Path:
    for name in ("cat", "dog"):
        for i in range(per_class):
            _png(root / name / f"{i}.png", 40 * i)
    return root


def _idx(path: Path, array: np.ndarray) -> None:
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


def _fashion_files(folder: Path, train_labels: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, labels in (("train", train_labels), ("t10k", np.arange(10, dtype=np.uint8))):
        _idx(folder / f"{split}-images-idx3-ubyte.gz", np.zeros((len(labels), 28, 28), np.uint8))
        _idx(folder / f"{split}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return folder


def _load_imagefolder(root: Path):
    return load_dataset(f"imagefolder:{root}", DataConfig(), seed=0)


def corrupt_image(tmp: Path):
    root = _imagefolder(tmp / "data")
    (root / "cat" / "9.png").write_bytes(b"this is not a png")
    splits = _load_imagefolder(root)
    return len(splits.train) + len(splits.test)  # 6 readable images


def truncated_image(tmp: Path):
    root = _imagefolder(tmp / "data")
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)
    Image.fromarray(noise).save(tmp / "noise.png")
    (root / "dog" / "9.png").write_bytes((tmp / "noise.png").read_bytes()[:200])  # cut mid-data
    splits = _load_imagefolder(root)
    return len(splits.train) + len(splits.test)


def unreadable_class(tmp: Path):
    root = _imagefolder(tmp / "data")
    for f in (root / "dog").iterdir():
        f.write_bytes(b"garbage")
    _load_imagefolder(root)


def missing_dataset_files(tmp: Path):
    load_dataset("fashion-mnist", DataConfig(fashion_mnist_dir=str(tmp / "nowhere")), seed=0)


def labels_outside_class_list(tmp: Path):
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 12] * 2, dtype=np.uint8)
    load_dataset("fashion-mnist", DataConfig(fashion_mnist_dir=str(_fashion_files(tmp, labels))), seed=0)


def class_without_images(tmp: Path):
    labels = np.array(list(range(9)) * 2, dtype=np.uint8)  # "ankle boot" (9) has no training image
    load_dataset("fashion-mnist", DataConfig(fashion_mnist_dir=str(_fashion_files(tmp, labels))), seed=0)


def empty_client_partition(tmp: Path):
    config = load_config("tiny", ["partition=dirichlet", "alpha=0.001", "num_clients=60", "shots=none"])
    splits = load_dataset(config.dataset, config.data, seed=config.seed)
    client_indices(config, splits, class_split(config, splits))


def bad_config_value(tmp: Path):
    load_config("tiny", ["robustness.min_fit_fraction=1.5"])


def fault_for_missing_client(tmp: Path):
    load_config("tiny", ["faults.mode=raise", "faults.clients=[7]"])


def _stopped_run(tmp: Path, bundle, base_overrides) -> Path:
    """A run directory as a run that stopped after round 0 leaves it."""
    fed, image0, text0 = bundle
    fed.backbone.load_image_lora(image0)
    fed.backbone.load_text_lora(text0)
    run = RunDir(tmp / "run")
    run.write_config(fed.config)
    run.write_metrics([])
    save_checkpoint(run.path, 0, build_method(fed), [], fed.config)
    return run.path


def corrupt_checkpoint(tmp: Path, bundle, base_overrides):
    run = _stopped_run(tmp, bundle, base_overrides)
    tensors = next((run / "checkpoint").glob("state-*.safetensors"))
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    run_experiment(load_run_config(run), run, progress=False, log_fn=lambda s: None, resume=True)


def config_changed_since_checkpoint(tmp: Path, bundle, base_overrides):
    run = _stopped_run(tmp, bundle, base_overrides)
    path = run / "config.toml"
    path.write_text(path.read_text().replace("seed = 0", "seed = 1"))
    run_experiment(load_run_config(run), run, progress=False, log_fn=lambda s: None, resume=True)


def model_override_on_resume(tmp: Path, bundle, base_overrides):
    run = _stopped_run(tmp, bundle, base_overrides)
    load_run_config(run, ["client.lr=0.1"])


LOAD_FAULTS = [
    # (what is wrong, the action, the expected error type or "warning", the message)
    ("corrupt image file", corrupt_image, "warning", r"skipped 1 unreadable image\(s\) of 4 in .*cat"),
    ("truncated image file", truncated_image, "warning", r"skipped 1 unreadable image\(s\) of 4 in .*dog"),
    ("class of unreadable images", unreadable_class, DatasetError, r"class folder .*dog: none of its 3 image\(s\) can be read"),
    ("missing dataset files", missing_dataset_files, DatasetError, r"fashion-mnist: missing file .*train-images"),
    ("labels outside the class list", labels_outside_class_list, DatasetError, r"labels must lie in \[0, 10\)"),
    ("class list does not match labels", class_without_images, DatasetError, r"class list does not match the labels.*'ankle boot'"),
    ("empty client partition", empty_client_partition, ConfigError, r"cannot partition .* among 60 clients"),
    ("bad config value", bad_config_value, ConfigError, r"robustness\.min_fit_fraction must be in \(0, 1\], got 1\.5"),
    ("fault config names a missing client", fault_for_missing_client, ConfigError, r"faults\.clients \[7\] are not client ids"),
    ("corrupt checkpoint", corrupt_checkpoint, CheckpointError, r"checkpoint tensors .* are corrupt \(SHA-256 mismatch\)"),
    ("config changed since checkpoint", config_changed_since_checkpoint, CheckpointError, r"config\.toml changed since the checkpoint"),
    ("model key changed on resume", model_override_on_resume, ConfigError, r"--set client\.lr=0\.1 with --resume: only keys of"),
]


@pytest.mark.parametrize("name,action,expected,message", LOAD_FAULTS, ids=[r[0] for r in LOAD_FAULTS])
def test_bad_input_is_a_clear_error_or_a_skipped_file(
    tmp_path, caplog, bundle, base_overrides, name, action, expected, message
):
    # prepare / execute
    args = (tmp_path, bundle, base_overrides) if "checkpoint" in name or "resume" in name else (tmp_path,)
    if expected == "warning":
        with caplog.at_level(logging.WARNING, logger="feddtl.data"):
            kept = action(*args)
        # assert: one warning names the file, the rest of the data loads
        assert kept == 6
        assert any(re.search(message, r.getMessage()) for r in caplog.records), caplog.text
        return
    with pytest.raises(expected, match=message):
        action(*args)
    # assert: a failed resume leaves the stopped run as it was (nothing lost)
    if "checkpoint" in name or "resume" in name:
        run = tmp_path / "run"
        assert (run / "checkpoint" / "state.json").exists() and (run / "metrics.jsonl").read_text() == ""


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--config", "tiny", "--set", "dataset=imagefolder:/no/such/folder"], "imagefolder: /no/such/folder is not a folder"),
        (["--config", "tiny", "--set", "robustness.max_round_retries=-1"], "robustness.max_round_retries must be >= 0"),
        (["--resume", "/no/such/run"], "no config.toml there"),
    ],
    ids=["missing data folder", "bad config value", "resume of a non-run"],
)
def test_cli_prints_bad_input_as_one_line_and_exits_2(tmp_path, capsys, argv, message):
    # prepare / execute
    out = ["--out", str(tmp_path / "run")] if "--resume" not in argv else []
    code = cli_main(["run", *argv, *out, "--quiet"])
    # assert
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def _out_at_a_file(tmp: Path, clip: Path) -> list[str]:
    (tmp / "taken").write_text("")
    return ["--config", "tiny", "--out", str(tmp / "taken")]


def _out_below_a_file(tmp: Path, clip: Path) -> list[str]:
    (tmp / "taken").write_text("")
    return ["--config", "tiny", "--out", str(tmp / "taken" / "run")]


def _out_unwritable(tmp: Path, clip: Path) -> list[str]:
    if os.geteuid() == 0:  # root writes through permissions; /proc takes no new files from anyone
        return ["--config", "tiny", "--out", "/proc"]
    locked = tmp / "locked"
    locked.mkdir(mode=0o500)
    return ["--config", "tiny", "--out", str(locked)]


def _config_not_utf8(tmp: Path, clip: Path) -> list[str]:
    (tmp / "latin1.toml").write_bytes('method = "feddtl"\n# réglage\n'.encode("latin-1"))
    return ["--config", str(tmp / "latin1.toml"), "--out", str(tmp / "run")]


def _image_size_below_lite(tmp: Path, clip: Path) -> list[str]:
    return ["--config", "tiny", "--set", "data.image_size=1", "--out", str(tmp / "run")]


def _image_size_below_patch(tmp: Path, clip: Path) -> list[str]:
    return ["--config", "tiny", "--set", f"backbone=hf-clip:{clip}", "--set", "data.image_size=7", "--out", str(tmp / "run")]


@pytest.mark.parametrize(
    "make_argv,message",
    [
        (_out_at_a_file, "taken is a file, not a directory"),
        (_out_below_a_file, "taken/run is below"),
        (_out_unwritable, "cannot be written"),
        (_config_not_utf8, "latin1.toml: not a TOML file (not UTF-8 text"),
        (_image_size_below_lite, "data.image_size=1 is too small for backbone lite: the minimum is 32"),
        (_image_size_below_patch, "data.image_size=7 is too small for backbone hf-clip:"),
    ],
    ids=["--out at a file", "--out below a file", "--out unwritable", "config not UTF-8",
         "image_size below lite's 32", "image_size below the CLIP patch"],
)
def test_cli_rejects_a_bad_run_target_in_one_line_before_any_work(tmp_path, capsys, clip_dir, make_argv, message):
    # prepare
    argv = make_argv(tmp_path, clip_dir)
    # execute
    code = cli_main(["run", *argv, "--quiet"])
    # assert: one line, exit 2, and no run directory written
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    if "image_size=7" in message:
        assert "the minimum is 8" in err  # the tiny CLIP's patches are 8 px


def test_prototype_uploads_are_one_vector_per_class_and_pass_validation(bundle, base_overrides, tmp_path):
    # prepare / execute: tiny has 3 clients x 2 classes each
    rows, _ = run_with(bundle, base_overrides, tmp_path, ["client.upload=prototypes"])
    # assert: 6 vectors per round reach the server, none rejected
    assert [r["uploaded_embeddings"] for r in rows] == [6.0, 6.0]
    assert all(r["accepted"] == [0, 1, 2] and "rejected" not in r for r in rows)
