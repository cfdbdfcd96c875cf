"""FedDTL learns: a short, seeded Fashion-MNIST run ends well above zero-shot, its global image LoRA moves,
and its RL stage raises its own reward on the training images.

End accuracy alone would not catch every broken step: the server's text step can raise Base with the
image LoRA frozen, so the checks also look at the image LoRA and at the RL stage's reward directly. A
second test breaks the method twice (the GRPO loss with its sign flipped, an aggregation that returns the
old weights) and shows the checks fail for each.

Settings (chosen from a handful of measured runs): 3 IID clients, 16 shots, 48 px, 6 rounds (SFT 1-3,
RL 4-6), Adam 1e-3 as the paper. grpo.sigma = 0.03 instead of 0.1: at 0.1 the noise flips most actions on
this backbone (training reward about 0.34, flat over the RL rounds), at 0.03 the reward reflects the
policy's margins and rises. A higher client.lr (3e-3, 5e-3) learns faster for a round or two, then Base
jumps around; client.batch_size = 16 makes the RL rounds noisier. Measured at seed 0: Base 29.6 zero-shot,
52.0 after the run; the RL rounds' own reward gains +0.049, -0.003, +0.022 (sum +0.068; seeds 1 and 2:
+0.016, +0.023); with the sign flipped -0.043, -0.023, -0.079.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import feddtl.algorithm.client as client_module
from feddtl.algorithm.encoding import image_features
from feddtl.algorithm.grpo import sample_actions
from feddtl.config import ExperimentConfig, load_config
from feddtl.federation import Federation, build_federation
from feddtl.methods.feddtl import FedDTL
from feddtl.server.experiment import run_experiment

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = [
    "dataset=fashion-mnist", "partition=iid", "num_clients=3", "shots=16", "data.image_size=48",
    "data.test_per_class=50", "rounds=6", "client.switch_round=3", "grpo.sigma=0.03", "eval.every=6", "seed=0",
]
"""Overrides of the demo preset (Fashion-MNIST, lite backbone, the paper's schedule otherwise)."""

MIN_BASE_GAIN = 10.0
"""Points of Base accuracy above zero-shot the run must end with (measured: about +22)."""
MIN_LORA_CHANGE = 1e-4
"""Largest absolute change of an image LoRA weight, initial to final, that still counts as "did not move"
(measured: about 0.02)."""
REWARD_BAND = (0.05, 0.99)
"""A sane reward rate for the RL rounds: below, the noise drowns the policy (or it collapsed); above, every
group is silent and GRPO learns nothing."""
REWARD_SEED = 1234
"""Noise draws of the direct reward evaluation: the same draws for every model it compares."""
REWARD_DRAWS = 32
"""Noisy actions per image in the direct reward evaluation (the runs use G = 3): the same expected reward,
estimated with less sampling noise."""


def config(*extra: str) -> ExperimentConfig:
    return load_config("demo", [*SETTINGS, *extra])


@dataclasses.dataclass
class Federated:
    """A federation built once for the module, with its state right after the build (what a run starts from)."""

    fed: Federation
    image_lora: dict[str, torch.Tensor]
    text_lora: dict[str, torch.Tensor]
    rng: torch.Tensor
    zeroshot_base: float

    def run(self, cfg: ExperimentConfig, out: Path) -> dict[str, Any]:
        """``run_experiment`` on the shared federation, reset first (as the bench worker does)."""
        self.fed.backbone.load_image_lora(self.image_lora)
        self.fed.backbone.load_text_lora(self.text_lora)
        torch.set_rng_state(self.rng)
        return run_experiment(cfg, out, progress=False, log_fn=lambda _: None, fed=dataclasses.replace(self.fed, config=cfg))


@pytest.fixture(scope="module")
def federated(one_thread: None, tmp_path_factory: pytest.TempPathFactory) -> Federated:
    cfg = config("method=zeroshot")
    fed = build_federation(cfg, log_fn=lambda _: None)
    b = fed.backbone
    shared = Federated(fed, b.image_lora_state(), b.text_lora_state(), torch.get_rng_state(), float("nan"))
    shared.zeroshot_base = shared.run(cfg, tmp_path_factory.mktemp("zeroshot"))["base_acc"]
    return shared


@contextmanager
def recording_rounds() -> Iterator[list[tuple[int, dict[str, torch.Tensor], torch.Tensor]]]:
    """(round, global image LoRA, class text embeddings T) after each FedDTL server step: the model the
    next round's clients receive."""
    rounds: list[tuple[int, dict[str, torch.Tensor], torch.Tensor]] = []
    step = FedDTL.server_update

    def recorded(self: FedDTL, updates: Any, round_num: int) -> dict[str, float]:
        metrics = step(self, updates, round_num)
        rounds.append((round_num, {k: v.clone() for k, v in self.image_lora.items()}, self.base_T.clone()))
        return metrics

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FedDTL, "server_update", recorded)
        yield rounds


@torch.no_grad()
def reward_rate(federated: Federated, image_lora: dict[str, torch.Tensor], T: torch.Tensor, cfg: ExperimentConfig) -> float:
    """The RL stage's reward rate (noisy-latent actions, 1 when right) of a global model on every client's
    training images, with fixed noise draws."""
    backbone = federated.fed.backbone
    backbone.load_image_lora(image_lora)
    generator = torch.Generator().manual_seed(REWARD_SEED)
    grpo = dataclasses.replace(cfg.grpo, group_size=REWARD_DRAWS)
    hits, total = 0, 0
    for data in federated.fed.clients:
        u = image_features(backbone, data.features[torch.arange(len(data))])
        actions = sample_actions(u, T, backbone.logit_scale, grpo, generator)
        hits += int((actions == data.labels.unsqueeze(1)).sum())
        total += actions.numel()
    return hits / total


def learning_failures(federated: Federated, out: Path, *extra: str) -> tuple[list[str], dict[str, Any]]:
    """Run FedDTL with the module's settings (plus ``extra`` overrides) and check that it learned; returns
    the names of the checks that failed and the measured values."""
    cfg = config("method=feddtl", *extra)
    with recording_rounds() as rounds:
        results = federated.run(cfg, out)
    final_image = {k[len("image."):]: v for k, v in load_file(out / "final_lora.safetensors").items() if k.startswith("image.")}
    moved = max(float((final_image[k] - v).abs().max()) for k, v in federated.image_lora.items())
    # The RL stage's own effect, round by round: the clients' RL steps against the round's fixed T, as the
    # aggregate shows it (the received global LoRA against the next one, both under the T they trained
    # with); the server's text step, which can raise the reward alone, is left out.
    lora, T = {r: l for r, l, _ in rounds}, {r: t for r, _, t in rounds}
    gains = [
        reward_rate(federated, lora[r], T[r - 1], cfg) - reward_rate(federated, lora[r - 1], T[r - 1], cfg)
        for r in range(cfg.switch_round + 1, cfg.rounds + 1)
    ]
    # ... and the whole RL stage with the text steps: the model the first RL round receives against the final one
    before = reward_rate(federated, lora[cfg.switch_round], T[cfg.switch_round], cfg)
    after = reward_rate(federated, lora[cfg.rounds], T[cfg.rounds], cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rl_rewards = [row["client_reward"] for row in rows if row["round"] > cfg.switch_round]
    measured = {
        "base": results["base_acc"], "zeroshot_base": federated.zeroshot_base, "image_lora_max_change": moved,
        "rl_reward_gain_per_round": gains, "reward_before_rl": before, "reward_after_rl": after,
        "client_reward_per_rl_round": rl_rewards,
    }
    checks = {
        "base_above_zeroshot": results["base_acc"] >= federated.zeroshot_base + MIN_BASE_GAIN,
        "image_lora_moved": moved > MIN_LORA_CHANGE,
        "rl_raises_reward": sum(gains) > 0,
        "reward_in_band": bool(rl_rewards) and all(REWARD_BAND[0] <= r <= REWARD_BAND[1] for r in rl_rewards),
    }
    return [name for name, ok in checks.items() if not ok], measured


def test_feddtl_learns_on_fashion_mnist(federated: Federated, tmp_path: Path):
    # execute
    failures, measured = learning_failures(federated, tmp_path)
    # assert
    assert failures == [], measured


@contextmanager
def grpo_sign_flipped() -> Iterator[None]:
    """Mutation 1: the GRPO loss with its sign flipped (the RL stage descends its own objective)."""
    loss_fn = client_module.grpo_loss

    def flipped(*args: Any, **kwargs: Any) -> Any:
        loss, diag = loss_fn(*args, **kwargs)
        return -loss, diag

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(client_module, "grpo_loss", flipped)
        yield


@contextmanager
def aggregation_returns_old_weights() -> Iterator[None]:
    """Mutation 2: the server's aggregation returns the global image LoRA it sent out, not the clients' average."""

    def stale(self: FedDTL, updates: Any, states: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.image_lora, {}  # Method.aggregate, which FedDTL.server_update calls for its image LoRA

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FedDTL, "aggregate", stale)
        yield


def test_learning_checks_fail_on_broken_methods(federated: Federated, tmp_path: Path):
    # execute: the learning test's run, once per mutation (measured at seed 0: the flipped sign still ends
    # 12 points above zero-shot, the stale aggregation 14, on the text step alone: Base cannot tell)
    with grpo_sign_flipped():
        flipped, flipped_measured = learning_failures(federated, tmp_path / "flipped")
    with aggregation_returns_old_weights():
        stale, stale_measured = learning_failures(federated, tmp_path / "stale")
    # assert
    assert "rl_raises_reward" in flipped, flipped_measured
    assert "image_lora_moved" in stale, stale_measured
