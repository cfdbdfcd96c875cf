"""Differential privacy of the uploads ([privacy]): the accountant, the mechanisms, the config, and runs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from feddtl.algorithm.messages import ClientUpdate
from feddtl.algorithm.privacy import (
    LORA_NOISE_TAG,
    UploadNoise,
    epsilon_spent,
    noise_generator,
    noise_multiplier,
    private_embeddings,
    private_prototypes,
)
from feddtl.algorithm.prototypes import class_prototypes
from feddtl.algorithm.validation import UpdateSpec, validate_update
from feddtl.config import ConfigError, load_config
from feddtl.methods.central_dp import CentralDP
from feddtl.server.checkpoint import load_run_config
from feddtl.server.experiment import run_experiment
from feddtl.server.robust import RoundFailed
from feddtl.server.rundir import RunDir, result_fields

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# --- the accountant -----------------------------------------------------------------------------------

def test_accountant_matches_dp_accountings_own_example_value():
    # dp-accounting's rdp_privacy_accountant_test.test_compute_epsilon_delta_gaussian: "noise multiplier is
    # chosen to obtain exactly (1, 1e-6)-DP" for one Gaussian release: 4.530877117 (their orders: 1.0 to 100
    # in steps of 0.001; the default orders we use land within 1e-6 of it, never below)
    spent = epsilon_spent(4.530877117, releases=1, delta=1e-6)
    z = noise_multiplier(1.0, 1e-6, 1)
    assert 1.0 <= spent < 1.0 + 1e-6
    assert z == pytest.approx(4.530877117, abs=1e-5)


def test_calibrated_noise_spends_the_target_over_all_rounds_and_less_before():
    z = noise_multiplier(4.0, 1e-5, 20)
    assert epsilon_spent(z, 20, 1e-5) == pytest.approx(4.0, abs=1e-4)
    assert epsilon_spent(z, 20, 1e-5) <= 4.0
    assert epsilon_spent(z, 0, 1e-5) == 0.0 < epsilon_spent(z, 1, 1e-5) < epsilon_spent(z, 10, 1e-5) < 4.0
    assert noise_multiplier(1.0, 1e-5, 20) > noise_multiplier(4.0, 1e-5, 20) > noise_multiplier(16.0, 1e-5, 20)


def test_accounting_agrees_with_flowers_fixed_clipping_accountant():
    # Flower's accounted fixed clipping composes one no-amplification Gaussian release per round
    from flwr.serverapp import NeighboringRelation, PrivacyConfig, SamplingMethod
    from flwr.supercore.privacy_accounting import GaussianPrivacyEvent
    from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

    z, rounds, clients, per_round = noise_multiplier(4.0, 1e-5, 5), 5, 50, 5
    flower = RdpAccountant(PrivacyConfig(1e-5, clients, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION))
    for _ in range(rounds):
        flower.compose(GaussianPrivacyEvent(z, per_round, clients))
    assert flower.get_privacy_spent().epsilon == pytest.approx(epsilon_spent(z, rounds, 1e-5), rel=1e-9)


# --- the mechanisms ----------------------------------------------------------------------------------

def _unit(n: int, d: int, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_private_embeddings_are_unit_norm_with_noise_of_std_two_z():
    # prepare
    emb, noise = _unit(64, 256), UploadNoise(multiplier=0.5)
    # execute
    out = private_embeddings(emb, noise, noise.generator(7))
    # assert: renormalised; the draw before renormalising is emb + N(0, (2 z)^2)
    assert torch.allclose(out.norm(dim=1), torch.ones(64), atol=1e-5)
    raw = emb + torch.randn(emb.shape, generator=noise.generator(7)) * 1.0
    assert torch.allclose(out, F.normalize(raw, dim=-1), atol=1e-6)
    assert (raw - emb).std().item() == pytest.approx(1.0, rel=0.02)


def test_private_prototypes_noise_shrinks_with_the_class_count():
    # prepare: class 0 has 2 images, class 3 has 50, each class's images near one direction
    direction = _unit(2, 512, seed=1)
    labels = torch.tensor([0] * 2 + [3] * 50)
    emb = F.normalize(direction[(labels > 0).long()] + 0.02 * torch.randn(52, 512, generator=torch.Generator().manual_seed(2)), dim=-1)
    exact, classes = class_prototypes(emb, labels)
    noise = UploadNoise(multiplier=0.2)
    # execute
    out, out_classes = private_prototypes(emb, labels, noise, noise.generator(0))
    # assert: same labels, unit norm, and the few-image class is moved far more (std 2 z / n_c)
    assert out_classes.tolist() == classes.tolist() == [0, 3]
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    cosines = (out * exact).sum(1)
    assert cosines[1] > 0.9 > cosines[0]


def test_a_noisy_upload_still_passes_validation():
    ref = {"a": torch.zeros(2, 3)}
    noise = UploadNoise(multiplier=3.0)
    emb = private_embeddings(_unit(4, 8), noise, noise.generator(1))
    update = ClientUpdate(client_id=0, num_samples=4, image_lora={"a": torch.ones(2, 3)}, embeddings=emb,
                          labels=torch.tensor([0, 0, 1, 1]))
    assert validate_update(update, UpdateSpec(reference=ref, embed_dim=8, num_classes=2, cap_per_class=2)) is None


def test_central_dp_clips_each_update_averages_equally_and_adds_noise_of_std_z_c_over_m():
    # prepare: two clients, one far outside the clip norm C = 1 (norm 10), one inside (norm 0.5)
    config = load_config("tiny", ["privacy.lora_epsilon=8", "privacy.lora_clip_norm=1.0"])
    dp = CentralDP(config.privacy, rounds=4, seed=3)
    sent = {"w": torch.zeros(100, 50)}
    big, small = torch.zeros(100, 50), torch.zeros(100, 50)
    big[0, 0], small[1, 1] = 10.0, 0.5
    # execute
    noisy, metrics = dp.aggregate([{"w": big}, {"w": small}], sent, round_num=2)
    # assert: the exact draw of the server's own generator on top of mean(clipped) = ((1, 0), (0, 0.5)) / 2
    std = dp.multiplier * 1.0 / 2
    expected = torch.zeros(100, 50)
    expected[0, 0], expected[1, 1] = 0.5, 0.25
    noise = torch.randn(100, 50, generator=noise_generator(3, LORA_NOISE_TAG)) * std
    assert torch.allclose(noisy["w"], expected + noise, atol=1e-5)
    assert metrics["dp_lora_noise_std"] == pytest.approx(std)
    assert metrics["dp_lora_clipped_fraction"] == 0.5
    assert metrics["dp_lora_epsilon"] == pytest.approx(epsilon_spent(dp.multiplier, 2, 1e-5))


# --- the config --------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "overrides, message",
    [
        (["privacy.upload_epsilon=0"], "privacy.upload_epsilon must be > 0"),
        (["privacy.upload_epsilon=-1"], "privacy.upload_epsilon must be > 0"),
        (["privacy.upload_epsilon=1", "privacy.upload_delta=1"], "privacy.upload_delta must be in (0, 1)"),
        (["privacy.lora_epsilon=1", "privacy.lora_clip_norm=1", "privacy.lora_delta=0"], "privacy.lora_delta must be in (0, 1)"),
        (["privacy.lora_epsilon=1"], "privacy.lora_epsilon needs privacy.lora_clip_norm"),
        (["privacy.lora_epsilon=1", "privacy.lora_clip_norm=0"], "privacy.lora_clip_norm must be > 0"),
        (["privacy.lora_clip_norm=1"], "privacy.lora_clip_norm is set but privacy.lora_epsilon is none"),
        (["method=fedlora", "privacy.upload_epsilon=1"], "privacy.upload_epsilon / privacy.lora_epsilon apply to method feddtl, feddtl-decoupled; got method='fedlora'"),
    ],
)
def test_bad_privacy_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny", overrides)


def test_privacy_is_off_by_default():
    assert not load_config("demo").privacy.enabled


# --- runs --------------------------------------------------------------------------------------------

RUN = ["rounds=2", "client.switch_round=1", "eval.every=2"]
DP = ["privacy.upload_epsilon=4", "privacy.lora_epsilon=4", "privacy.lora_clip_norm=0.05"]


def _run(tmp_path_factory, name: str, overrides: list[str]):
    out = tmp_path_factory.mktemp(name)
    results = run_experiment(load_config("tiny", RUN + overrides), out, progress=False, log_fn=lambda s: None)
    return out, results


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    return _run(tmp_path_factory, "plain", [])


@pytest.fixture(scope="module")
def dp_run(tmp_path_factory):
    return _run(tmp_path_factory, "dp", DP)


def test_dp_run_reports_spent_epsilon_each_round_and_in_results(dp_run):
    out, results = dp_run
    rows = RunDir(out).read_metrics()
    # assert: every update passed validation; spent grows to the target, never above it
    assert all("rejected" not in r for r in rows)
    for channel in ("upload", "lora"):
        spent = [r[f"dp_{channel}_epsilon"] for r in rows]
        assert 0 < spent[0] < spent[1] <= 4.0 and spent[1] == pytest.approx(4.0, abs=1e-3)
        assert results[f"dp_{channel}_epsilon"] == spent[1] and results[f"dp_{channel}_delta"] == 1e-5


def test_dp_noise_does_not_shift_the_clients_training(plain_run, dp_run):
    # Round 1 starts from the same global model with DP on or off, and the noise has generators of its own:
    # the clients' training metrics of round 1 are the same numbers.
    plain, noisy = (RunDir(out).read_metrics()[0] for out, _ in (plain_run, dp_run))
    client = sorted(k for k in plain if k.startswith("client_"))
    assert client and {k: noisy[k] for k in client} == {k: plain[k] for k in client}
    assert not any(k.startswith("dp_") for k in plain) and not any(k.startswith("dp_") for k in plain_run[1])


@pytest.mark.slow
def test_dp_run_stopped_and_resumed_ends_like_the_uninterrupted_one(dp_run, tmp_path):
    # prepare: every client fails round 2, the run stops with a checkpoint after round 1
    config = load_config("tiny", RUN + DP + ["faults.mode=raise", "faults.rounds=[2]"])
    with pytest.raises(RoundFailed):
        run_experiment(config, tmp_path, progress=False, log_fn=lambda s: None)
    # execute
    run_experiment(load_run_config(tmp_path, ["faults.mode=none"]), tmp_path, progress=False,
                   log_fn=lambda s: None, resume=True)
    # assert: the server's noise generator was restored, so the noisy global model is the same
    reference = dp_run[0]
    assert [result_fields(r) for r in RunDir(tmp_path).read_metrics()] == [result_fields(r) for r in RunDir(reference).read_metrics()]
    assert (tmp_path / "final_lora.safetensors").read_bytes() == (reference / "final_lora.safetensors").read_bytes()
    assert result_fields(json.loads((tmp_path / "results.json").read_text())) == result_fields(dp_run[1])
