"""The attack fault modes (sign_flip, scaled, label_flip, collude) and the embedding check that meets
label flipping (server.embedding_min_relative_agreement), piece by piece; the runs are in
tests/test_fault_table.py ("attacks")."""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.algorithm.server import embedding_agreement, screen_embeddings
from feddtl.algorithm.validation import UpdateSpec, update_norm, validate_update
from feddtl.backbones.tiny_clip import build_tiny_clip
from feddtl.config import ConfigError, load_config
from feddtl.config.faults_config import FaultConfig
from feddtl.federation import build_federation
from feddtl.server.experiment import build_method
from feddtl.server.faults import FaultyClients, corrupt_update, flipped_labels

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

D = 4
REFERENCE = {"w": torch.zeros(2, 3), "v": torch.ones(3)}


def update(client_id: int = 0, delta: float = 0.1, labels: list[int] | None = None) -> ClientUpdate:
    labels_t = torch.tensor(labels if labels is not None else [2, 2, 5, 5, 5], dtype=torch.long)
    emb = torch.nn.functional.normalize(torch.randn(len(labels_t), D, generator=torch.Generator().manual_seed(client_id)), dim=1)
    return ClientUpdate(
        client_id=client_id, num_samples=10, image_lora={k: v + delta * (client_id + 1) for k, v in REFERENCE.items()},
        embeddings=emb, labels=labels_t,
    )


def spec(client_id: int = 0, max_norm: float | None = 1000.0, **kw) -> UpdateSpec:
    return UpdateSpec(reference=REFERENCE, embed_dim=D, num_classes=6, client_classes=[2, 5], max_norm=max_norm,
                      client_id=client_id, **kw)


# ----- weight attacks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,factor", [("sign_flip", -10.0), ("scaled", 10.0)])
def test_weight_attack_is_the_change_times_the_factor_and_passes_validation(mode, factor):
    # prepare
    honest = update()
    # execute
    attacked = corrupt_update(honest, mode, spec(), attack_scale=10.0)
    # assert: reference + factor x (honest - reference), key by key; validation has nothing to object to
    for k, ref in REFERENCE.items():
        assert torch.allclose(attacked.image_lora[k], ref + factor * (honest.image_lora[k] - ref))
    assert validate_update(attacked, spec()) is None
    assert torch.equal(attacked.embeddings, honest.embeddings) and honest.image_lora["w"][0, 0] == pytest.approx(0.1)


def test_weight_attack_shrinks_to_just_inside_the_norm_bound():
    # prepare: the honest change has norm 0.1 * sqrt(9) = 0.3; x 10 would be 3, the bound is 1
    honest = update()
    # execute
    attacked = corrupt_update(honest, "sign_flip", spec(max_norm=1.0), attack_scale=10.0)
    # assert: 0.99 of the bound, still the negated direction
    assert update_norm(attacked.image_lora, REFERENCE) == pytest.approx(0.99, rel=1e-6)
    assert validate_update(attacked, spec(max_norm=1.0)) is None
    assert float((attacked.image_lora["v"] - 1).sum()) < 0


def test_weight_attack_moves_the_methods_own_tensors_too():
    # prepare: a FedLoRA-like update with a text LoRA in extra, checked against what the client was sent
    extra_ref = {"text.a": torch.zeros(2)}
    honest = dataclasses.replace(update(), extra={"text.a": torch.tensor([0.3, 0.4])})
    # execute
    attacked = corrupt_update(honest, "scaled", spec(max_norm=1.0, extra_reference=extra_ref), attack_scale=10.0)
    # assert: image and text change scaled together, the joint norm at 0.99 of the bound
    joint = (update_norm(attacked.image_lora, REFERENCE) ** 2 + update_norm(attacked.extra, extra_ref) ** 2) ** 0.5
    assert joint == pytest.approx(0.99, rel=1e-6)
    assert torch.allclose(attacked.extra["text.a"] / attacked.extra["text.a"].norm(), torch.tensor([0.6, 0.8]))


# ----- label flipping ----------------------------------------------------------------------------------


def test_label_flip_relabels_every_embedding_with_another_class_of_the_client():
    # prepare
    honest = update(labels=[2, 2, 5, 5, 5])
    # execute
    flipped = corrupt_update(honest, "label_flip", spec())
    # assert: 2 -> 5 and 5 -> 2, every label wrong, and validation cannot see it
    assert flipped.labels.tolist() == [5, 5, 2, 2, 2]
    assert validate_update(flipped, spec()) is None
    assert torch.equal(flipped.embeddings, honest.embeddings)


def test_label_flip_cycles_three_classes_and_leaves_one_class_alone():
    assert flipped_labels(torch.tensor([0, 3, 7, 3])).tolist() == [3, 7, 0, 7]
    assert flipped_labels(torch.tensor([4, 4])).tolist() == [4, 4]


# ----- collusion -----------------------------------------------------------------------------------------


class FixedClients:
    """A client runner whose client k always answers ``update(k)``."""

    def dispatch(self, tasks):
        pass

    def step(self, task, client_id):
        return update(client_id)

    def cancel(self, client_id):
        pass


def test_colluders_send_the_first_colluders_sign_flip_and_keep_their_own_identity():
    # prepare
    faults = FaultConfig(mode="collude", clients=[0, 2], attack_scale=3.0)
    clients = FaultyClients(FixedClients(), faults, lambda task, k: spec(k))
    task = ClientTask(round=1, stage="sft", image_lora=REFERENCE, class_embeddings=torch.zeros(0, D))
    # execute
    lead, honest, follower = (clients.step(task, k) for k in range(3))
    # assert: the follower's weights are the lead's attacked ones; id, count and embeddings stay its own
    assert torch.equal(lead.image_lora["w"], -3.0 * update(0).image_lora["w"])
    assert all(torch.equal(follower.image_lora[k], lead.image_lora[k]) for k in REFERENCE)
    assert follower.client_id == 2 and torch.equal(follower.embeddings, update(2).embeddings)
    assert torch.equal(honest.image_lora["w"], update(1).image_lora["w"])
    assert validate_update(follower, spec(2)) is None
    # a new round, a new collusion: the lead's update of that round
    next_lead = clients.step(dataclasses.replace(task, round=2), 0)
    next_follower = clients.step(dataclasses.replace(task, round=2), 2)
    assert next_follower.image_lora["w"] is next_lead.image_lora["w"] and next_lead.image_lora["w"] is not lead.image_lora["w"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["faults.mode=collude", "faults.clients=[1]"], r'faults\.mode = "collude" needs at least two faults\.clients \(or none: all\), got \[1\]'),
        (["faults.attack_scale=0"], r"faults\.attack_scale must be > 0, got 0"),
    ],
)
def test_bad_attack_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)


# ----- the embedding check ---------------------------------------------------------------------------


def test_agreement_counts_labels_that_are_the_nearest_class_among_the_uploaded_ones():
    # prepare: class 0 at e0, class 2 at e1, class 1 (not uploaded) exactly on the embeddings' direction
    T = torch.eye(3)
    T[1] = torch.nn.functional.normalize(torch.tensor([1.0, 1.0, 0.0]), dim=0)
    T[2] = torch.tensor([0.0, 1.0, 0.0])
    emb = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.8, 0.6, 0.0], [0.6, 0.8, 0.0]])
    # execute / assert: among classes {0, 2} only; the last embedding is nearer class 2 than its label 0
    assert embedding_agreement(emb, torch.tensor([0, 2, 0, 0]), T) == 0.75
    assert embedding_agreement(emb[:0], torch.zeros(0, dtype=torch.long), T) == 1.0


def _aligned_upload(client_id: int, T: torch.Tensor, flip: bool = False) -> ClientUpdate:
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    emb = torch.nn.functional.normalize(T[labels] + 0.05 * torch.randn(6, T.shape[1], generator=torch.Generator().manual_seed(client_id)), dim=1)
    return ClientUpdate(client_id=client_id, num_samples=6, image_lora={}, embeddings=emb,
                        labels=flipped_labels(labels) if flip else labels)


def test_screen_rejects_the_label_flipper_and_keeps_every_honest_upload():
    # prepare: four honest clients whose embeddings sit on their class's text embedding, one flipper
    T = torch.nn.functional.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    updates = [_aligned_upload(k, T, flip=(k == 3)) for k in range(5)]
    # execute
    kept, agreements, rejected = screen_embeddings(updates, T, 0.5)
    # assert
    assert [u.client_id for u in kept] == [0, 1, 2, 4]
    assert agreements == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert rejected == [{"client": 3, "reason": "embedding agreement 0.000 below 0.5 x the round's median 1.000 (server.embedding_min_relative_agreement)"}]


def test_screen_keeps_everyone_when_the_global_geometry_says_nothing():
    # prepare: every class text embedding the same: each upload agrees only by chance (its first class)
    T = torch.ones(3, 8) / 8**0.5
    updates = [_aligned_upload(k, torch.eye(3, 8), flip=(k == 3)) for k in range(5)]
    # execute
    kept, agreements, rejected = screen_embeddings(updates, T, 0.5)
    # assert: all at 1/3, nobody below half the median
    assert len(kept) == 5 and rejected == [] and agreements == pytest.approx([1 / 3] * 5)


@pytest.fixture(scope="module")
def fed(tmp_path_factory):
    clip = build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0)
    overrides = [f"backbone=hf-clip:{clip}", "rounds=2", "client.switch_round=1", "num_clients=5", "partition=iid"]
    return build_federation(load_config("tiny", overrides), log_fn=lambda s: None)


def test_feddtl_leaves_rejected_embeddings_out_of_the_text_step_and_aggregates_their_lora(fed):
    # prepare: the check on; five updates of the global LoRA + 0.01 k, client 3's labels flipped
    config = load_config("tiny", [f"backbone={fed.config.backbone}", "num_clients=5", "partition=iid",
                                  "server.embedding_min_relative_agreement=0.5"])
    method = build_method(dataclasses.replace(fed, config=config))
    T = method.base_T
    updates = [
        dataclasses.replace(_aligned_upload(k, T[:3], flip=(k == 3)), num_samples=10,
                            image_lora={n: v + 0.01 * k for n, v in method.image_lora.items()})
        for k in range(5)
    ]
    global_before = {n: v.clone() for n, v in method.image_lora.items()}
    # execute
    metrics = method.server_update(updates, 1)
    # assert: the row says who and why; 4 x 6 embeddings trained the text LoRA; all 5 LoRAs were averaged
    assert [e["client"] for e in metrics["embeddings_rejected"]] == [3]
    assert "server.embedding_min_relative_agreement" in metrics["embeddings_rejected"][0]["reason"]
    assert len(metrics["embedding_agreement"]) == 5 and metrics["uploaded_embeddings"] == 24.0
    name = next(iter(global_before))
    assert torch.allclose(method.image_lora[name], global_before[name] + 0.02, atol=1e-6)


def test_feddtl_without_the_check_records_nothing_new(fed):
    # prepare
    method = build_method(fed)
    updates = [dataclasses.replace(_aligned_upload(k, method.base_T[:3]), image_lora=method.image_lora) for k in range(5)]
    # execute
    metrics = method.server_update(updates, 1)
    # assert: the default row is the one the project always wrote
    assert set(metrics) == {"text_loss_before", "text_loss_after", "uploaded_embeddings"}
