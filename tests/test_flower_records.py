"""The Flower App's boundaries: records round trips and validation, node/run config, the dev PKI."""

from __future__ import annotations

import io
import os
import stat

import numpy as np
import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.config import ConfigError, load_config, loads_config, to_toml
from feddtl.flower import records
from feddtl.flower.certs import write_dev_pki
from feddtl.flower.client_app import node_partition
from feddtl.flower.server_app import settings_from_run_config

C, D = 5, 8
LORA = {"blocks.0.lora_A": torch.zeros(4, 16), "blocks.0.lora_B": torch.zeros(16, 4)}
TEXT_LORA = {"text.0.lora_A": torch.zeros(4, 8)}


def _random_state(spec: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in spec.items()}


def _task(stage: str = "rl") -> ClientTask:
    return ClientTask(
        round=3,
        stage=stage,  # type: ignore[arg-type]
        image_lora=_random_state(LORA, 0),
        class_embeddings=torch.randn(C, D),
        sft_reference_lora=_random_state(LORA, 1) if stage == "rl" else None,
        extra=_random_state(TEXT_LORA, 2),  # another method's own tensors (here: a text LoRA) travel in extra
    )


def _update() -> ClientUpdate:
    return ClientUpdate(
        client_id=1,
        num_samples=24,
        image_lora=_random_state(LORA, 3),
        embeddings=torch.randn(6, D),
        labels=torch.tensor([0, 1, 2, 2, 4, 0]),
        metrics={"loss": 0.25, "train_acc": 0.5},
    )


def _task_back(content: RecordDict) -> ClientTask:
    return records.task_from_records(content, LORA, num_classes=C, embed_dim=D)


def _update_back(content: RecordDict) -> ClientUpdate:
    return records.update_from_records(content, LORA, num_classes=C, embed_dim=D)


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_task_round_trip_is_exact(stage: str) -> None:
    task = _task(stage)
    content = records.task_to_records(task, "seed = 3\n")
    back = _task_back(content)
    assert (back.round, back.stage) == (task.round, task.stage)
    assert _same_state(back.image_lora, task.image_lora)
    assert torch.equal(back.class_embeddings, task.class_embeddings)
    assert (back.sft_reference_lora is None) == (task.sft_reference_lora is None)
    if task.sft_reference_lora is not None:
        assert _same_state(back.sft_reference_lora, task.sft_reference_lora)
    assert _same_state(back.extra, task.extra)
    assert records.experiment_of(content) == "seed = 3\n"


def test_update_round_trip_is_exact_and_uses_flower_record_types() -> None:
    update = _update()
    content = records.update_to_records(update)
    assert isinstance(content[records.UPDATE_IMAGE_LORA], ArrayRecord)
    assert set(content.metric_records) == {records.UPDATE_INFO, records.UPDATE_METRICS}
    back = _update_back(content)
    assert (back.client_id, back.num_samples, back.metrics) == (1, 24, update.metrics)
    assert _same_state(back.image_lora, update.image_lora)
    assert torch.equal(back.embeddings, update.embeddings) and torch.equal(back.labels, update.labels)
    assert back.labels.dtype == torch.int64 and back.extra == {}


def test_lora_with_a_wrong_shape_is_refused_with_its_name() -> None:
    update = _update()
    update.image_lora["blocks.0.lora_A"] = torch.zeros(4, 15)
    with pytest.raises(records.RecordError, match=r"blocks\.0\.lora_A.*\(4, 15\).*expected \(4, 16\)"):
        _update_back(records.update_to_records(update))


def test_lora_with_other_names_is_refused() -> None:
    task = _task()
    task.image_lora = {"other": torch.zeros(2)}
    with pytest.raises(records.RecordError, match="tensor names differ"):
        _task_back(records.task_to_records(task, ""))


def test_labels_out_of_range_are_refused() -> None:
    update = _update()
    update.labels = torch.tensor([0, 1, 2, 3, 4, 5])
    with pytest.raises(records.RecordError, match=r"labels.*\[0, 5\)"):
        _update_back(records.update_to_records(update))


def test_non_finite_values_are_refused() -> None:
    update = _update()
    update.embeddings[2, 3] = float("nan")
    with pytest.raises(records.RecordError, match="NaN"):
        _update_back(records.update_to_records(update))


def test_class_embeddings_must_match_the_clients_classes() -> None:
    task = _task()
    task.class_embeddings = torch.randn(C + 1, D)
    with pytest.raises(records.RecordError, match=r"\(5, 8\)"):
        _task_back(records.task_to_records(task, ""))


def test_unknown_stage_and_missing_records_are_refused() -> None:
    content = records.task_to_records(_task(), "")
    content[records.TASK] = ConfigRecord({"round": 1, "stage": "ppo", "experiment": ""})
    with pytest.raises(records.RecordError, match="stage"):
        _task_back(content)
    content = records.update_to_records(_update())
    del content[records.UPDATE_EMBEDDINGS]
    with pytest.raises(records.RecordError, match="lacks the ArrayRecord"):
        _update_back(content)


def test_hello_reply_round_trip_and_class_range() -> None:
    assert records.parse_hello_reply(records.hello_reply(1, 2, [3, 0], 24), num_classes=5) == (1, 2, [0, 3], 24)
    with pytest.raises(records.RecordError, match="classes"):
        records.parse_hello_reply(records.hello_reply(1, 2, [7], 24), num_classes=5)


def test_node_partition_is_checked_with_a_hint() -> None:
    assert node_partition({"partition-id": 1, "num-partitions": 2}) == (1, 2)
    with pytest.raises(ConfigError, match="--node-config"):
        node_partition({"num-partitions": 2})
    with pytest.raises(ConfigError, match=r"\[0, num-partitions=2\)"):
        node_partition({"partition-id": 2, "num-partitions": 2})


def test_run_config_carries_preset_and_overrides() -> None:
    settings = settings_from_run_config(
        {"config": "tiny", "overrides": "rounds=2 'backbone_options.template=a picture of {}'", "out": ""}, run_id=7
    )
    config = settings.config
    assert config.rounds == 2 and config.dataset == "digits"
    assert config.backbone_options.template == "a picture of {}"
    assert settings.out == "runs/flower-7" and not settings.resume
    with pytest.raises(ConfigError, match="unknown Flower run-config keys"):
        settings_from_run_config({"config": "tiny", "num-server-rounds": 3}, run_id=7)
    with pytest.raises(ConfigError, match="rounds"):
        settings_from_run_config({"config": "tiny", "overrides": "rounds=0"}, run_id=7)


def test_config_travels_as_toml_unchanged() -> None:
    config = load_config("tiny", ["shots=none", "flower.round_timeout=60"])
    assert loads_config(to_toml(config)) == config
    with pytest.raises(ConfigError, match="flower.node_wait_timeout"):
        load_config("tiny", ["flower.node_wait_timeout=0"])


def test_dev_pki_certificate_chain_and_node_keys(tmp_path) -> None:
    paths = write_dev_pki(tmp_path, nodes=2, hosts=["10.0.0.5", "superlink.lan"])
    ca = x509.load_pem_x509_certificate(paths["ca.crt"].read_bytes())
    server = x509.load_pem_x509_certificate(paths["server.crt"].read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"10.0.0.5", "127.0.0.1"}
    assert set(san.get_values_for_type(x509.DNSName)) == {"superlink.lan", "localhost"}
    for k in range(2):
        key = serialization.load_ssh_private_key(paths[f"node{k}"].read_bytes(), password=None)
        pub = serialization.load_ssh_public_key(paths[f"node{k}.pub"].read_bytes())
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert key.public_key().public_numbers() == pub.public_numbers()
        assert stat.S_IMODE(os.stat(paths[f"node{k}"]).st_mode) == 0o600
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        write_dev_pki(tmp_path, nodes=1)


def test_records_hold_numpy_arrays_not_pickles() -> None:
    record = records.tensors_to_record({"x": torch.arange(6, dtype=torch.float32).reshape(2, 3)})
    array = record["x"]
    assert array.stype == "numpy.ndarray" and array.shape == (2, 3)
    # numpy's own format, readable with pickle disabled
    assert np.load(io.BytesIO(array.data), allow_pickle=False).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_flower_certs_command_writes_and_refuses_to_overwrite(tmp_path, capsys) -> None:
    from feddtl.cli import main

    assert main(["flower-certs", str(tmp_path), "--nodes", "1", "--host", "10.1.2.3"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ca.crt", "ca.key", "node0", "node0.pub", "server.crt", "server.key",
    ]
    assert main(["flower-certs", str(tmp_path), "--nodes", "1"]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
