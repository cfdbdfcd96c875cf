"""Update validation (pure functions), class prototypes, fault selection and the config's list values."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from feddtl.algorithm.messages import ClientUpdate
from feddtl.algorithm.prototypes import class_prototypes
from feddtl.algorithm.validation import UpdateSpec, update_norm, validate_update
from feddtl.config import ConfigError, load_config, to_toml
from feddtl.server.faults import fault_hits
from feddtl.server.robust import call_client
from feddtl.config.faults_config import FaultConfig

D = 8


def _reference() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"b.lora_A": torch.randn(2, 6, generator=g), "b.lora_B": torch.zeros(6, 2)}


def _update(reference, labels=(0, 0, 2), delta=0.01) -> ClientUpdate:
    g = torch.Generator().manual_seed(1)
    lab = torch.tensor(labels, dtype=torch.long)
    return ClientUpdate(
        client_id=3,
        num_samples=10,
        image_lora={k: v + delta for k, v in reference.items()},
        embeddings=F.normalize(torch.randn(len(lab), D, generator=g), dim=-1),
        labels=lab,
    )


def _spec(reference, **kw) -> UpdateSpec:
    base = dict(reference=reference, embed_dim=D, num_classes=4, client_classes=[0, 2], cap_per_class=2,
                max_norm=1.0, client_id=3, max_samples=10)
    return UpdateSpec(**{**base, **kw})


def test_an_honest_update_passes():
    ref = _reference()
    assert validate_update(_update(ref), _spec(ref)) is None


def test_update_norm_is_the_distance_to_the_global_weights():
    ref = _reference()
    update = _update(ref, delta=0.5)
    # 24 entries, each moved by 0.5: sqrt(24 * 0.25)
    assert update_norm(update.image_lora, ref) == pytest.approx((24 * 0.25) ** 0.5)


@pytest.mark.parametrize(
    "change,spec_kw,reason",
    [
        (dict(num_samples=0), {}, "num_samples must be an integer >= 1"),
        (dict(labels=torch.tensor([0, 0, 0], dtype=torch.long)), dict(cap_per_class=2), "more than the cap of 2"),
        (dict(labels=torch.tensor([0, 0, 9], dtype=torch.long)), {}, r"labels outside [0, 4)"),
        (dict(labels=torch.tensor([0, 1, 2], dtype=torch.long)), {}, "labels [1] are not classes of this client"),
        (dict(labels=torch.tensor([0, 2], dtype=torch.long)), {}, "3 embeddings but 2 labels"),
        (dict(labels=torch.tensor([0.0, 0.0, 2.0])), {}, "labels have dtype"),
        (dict(num_samples=2), dict(cap_per_class=None), "3 embeddings uploaded from 2 images"),
        (dict(extra={"t": torch.zeros(1)}), {}, "unexpected extra tensors"),
    ],
    ids=["no samples", "over the cap", "label out of range", "foreign label", "length mismatch", "float labels",
         "more embeddings than images", "unexpected extra tensors"],
)
def test_bad_updates_are_rejected_with_their_reason(change, spec_kw, reason):
    ref = _reference()
    update = dataclasses.replace(_update(ref), **change)
    assert reason in (validate_update(update, _spec(ref, **spec_kw)) or "")


def test_a_norm_at_the_bound_passes_and_above_it_is_rejected():
    ref = _reference()
    update = _update(ref, delta=0.5)  # norm sqrt(6) ~ 2.449
    assert validate_update(update, _spec(ref, max_norm=2.45)) is None
    assert "above the bound" in validate_update(update, _spec(ref, max_norm=2.44))


def test_dtype_mismatch_is_rejected():
    ref = _reference()
    update = _update(ref)
    update.image_lora["b.lora_A"] = update.image_lora["b.lora_A"].double()
    assert "dtype torch.float64, expected torch.float32" in validate_update(update, _spec(ref))


def test_prototypes_are_unit_class_means_and_pass_validation_with_cap_1():
    # prepare
    emb = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0], [0, 0, 2.0]]), dim=-1)
    labels = torch.tensor([2, 2, 0, 0])
    # execute
    protos, classes = class_prototypes(emb, labels)
    # assert
    assert classes.tolist() == [0, 2]
    assert torch.allclose(protos[0], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(protos[1], torch.tensor([2**-0.5, 2**-0.5, 0.0]))
    ref = {"w": torch.zeros(2)}
    update = ClientUpdate(client_id=0, num_samples=4, image_lora={"w": torch.zeros(2)}, embeddings=protos, labels=classes)
    spec = UpdateSpec(reference=ref, embed_dim=3, num_classes=3, client_classes=[0, 2], cap_per_class=1)
    assert validate_update(update, spec) is None


def test_fault_selection_respects_clients_rounds_attempts_and_probability():
    faults = FaultConfig(mode="raise", clients=[1], rounds=[2], attempts=1)
    assert fault_hits(faults, 2, 1, 0)
    assert not fault_hits(faults, 2, 1, 1)  # the retry is spared
    assert not fault_hits(faults, 1, 1, 0) and not fault_hits(faults, 2, 0, 0)
    half = FaultConfig(mode="raise", probability=0.5, seed=3)
    hits = [fault_hits(half, t, k, 0) for t in range(1, 41) for k in range(5)]
    assert 70 < sum(hits) < 130  # about half of 200
    assert hits == [fault_hits(half, t, k, 0) for t in range(1, 41) for k in range(5)]  # reproducible


def test_call_client_turns_exceptions_and_missing_replies_into_reasons():
    def boom():
        raise KeyError("x")

    assert call_client(boom, None) == (None, "raised KeyError: 'x'")
    assert call_client(lambda: None, None) == (None, "no reply")
    assert call_client(boom, 5.0) == (None, "raised KeyError: 'x'")


def test_list_config_values_round_trip_through_toml(tmp_path):
    # prepare
    config = load_config("tiny", ["faults.mode=raise", "faults.clients=[0, 2]", "faults.rounds=[1]"])
    path = tmp_path / "c.toml"
    path.write_text(to_toml(config))
    # execute / assert
    assert load_config(str(path)) == config
    with pytest.raises(ConfigError, match=r"faults\.clients: expected list of int or none, got \[0, 'x'\]"):
        load_config("tiny", ['faults.clients=[0, "x"]'])
    with pytest.raises(ConfigError, match=r"faults\.mode = \"timeout\" needs robustness\.client_timeout_s"):
        load_config("tiny", ["faults.mode=timeout"])


def test_validation_never_raises_on_garbage():
    ref = _reference()
    garbage = dataclasses.replace(_update(ref), embeddings="not a tensor", labels=None)
    assert "must be tensors" in validate_update(garbage, _spec(ref))
    odd = dataclasses.replace(_update(ref), image_lora={k: object() for k in ref})
    assert "is not a tensor" in validate_update(odd, _spec(ref))
    assert validate_update("hello", _spec(ref)).startswith("not a client update")
