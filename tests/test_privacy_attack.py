"""benchmarks/privacy_attack.py: the rates it computes, and a run of it on a finished tiny run."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from feddtl.config import load_config
from feddtl.server.experiment import run_experiment

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "privacy_attack.py"

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def attack():
    spec = importlib.util.spec_from_file_location("privacy_attack", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reid_rank_of_an_exact_upload_is_zero_and_ties_count_against_the_attacker(attack):
    pool = F.normalize(torch.randn(20, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    pool[5] = pool[3]  # a duplicate of row 3
    ranks = attack.reid_ranks(pool[[0, 3]], pool, torch.tensor([0, 3]))
    assert ranks.tolist() == [0, 1]


def test_chance_levels_and_auc(attack):
    assert attack.chance_hit_at_k(10, 1, 5) == pytest.approx(0.5)
    assert attack.chance_hit_at_k(10, 2, 1) == pytest.approx(0.2)
    assert attack.roc_auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert attack.roc_auc(torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])) == 0.5
    assert attack.best_accuracy(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    rng = np.random.default_rng(0)
    assert 0.5 <= attack.permuted_best_accuracy(torch.randn(40, generator=torch.Generator().manual_seed(1)), 20, rng) < 0.8


def test_prototype_hit_counts_any_image_of_the_class(attack):
    pool = torch.eye(4)
    prototype = F.normalize(torch.tensor([[1.0, 0.9, 0.0, 0.0]]), dim=-1)
    assert attack.hit_at_k(prototype, pool, [torch.tensor([1, 2])], 1).tolist() == [False]
    assert attack.hit_at_k(prototype, pool, [torch.tensor([1, 2])], 2).tolist() == [True]


@pytest.mark.slow  # a tiny run and the attack on it: ~40 s on a busy 2-core machine
def test_attack_on_a_tiny_run_finds_uploaded_images_far_above_chance(attack, tmp_path, capsys):
    # prepare: a finished tiny run with embedding uploads (no privacy)
    config = load_config("tiny", ["rounds=2", "client.switch_round=1", "eval.every=2"])
    run_experiment(config, tmp_path / "run", progress=False, log_fn=lambda s: None)
    # execute
    code = attack.main([str(tmp_path / "run"), "--others", "200", "--json", str(tmp_path / "rates.json")])
    # assert
    assert code == 0
    rates = json.loads((tmp_path / "rates.json").read_text())[str(tmp_path / "run")]
    assert rates["upload"] == "embeddings" and rates["uploads"] == 3 * 2 * 8  # 3 clients, 2 classes, 8 shots
    assert rates["reid_top5"] >= rates["reid_top1"] > 10 * rates["chance_top1"]
    assert 0 <= rates["membership_auc"] <= 1 and 0.5 <= rates["chance_membership_acc"] <= 1
    assert "| re-id top-1 |" in capsys.readouterr().out
