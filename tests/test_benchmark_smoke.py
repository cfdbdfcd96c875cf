"""benchmarks/cache_speed.py measures what it says on a tiny CLIP (a smoke test of the script's code path)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network

from feddtl.backbones.hf_clip import HFClipBackbone
from feddtl.config.lora_config import LoraConfig
from feddtl.backbones.tiny_clip import build_tiny_clip

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "cache_speed.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("cache_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_measure_times_both_paths_and_cleans_up(tmp_path):
    # prepare
    bench = _load_script()
    backbone = HFClipBackbone(str(build_tiny_clip(tmp_path / "clip", image_size=32)))
    backbone.add_lora(LoraConfig())
    # execute
    row = bench.measure(backbone, 32, batch_size=8, workdir=tmp_path / "work", min_time=0.0, max_steps=2, repeats=2)
    # assert
    # min_time 0: one timed step after the warm-up, per turn
    assert row["cached_steps"] == row["uncached_steps"] == 2
    assert row["cached_img_s"] > 0 and row["uncached_img_s"] > 0 and row["fill_img_s"] > 0
    assert row["ratio"] == row["cached_img_s"] / row["uncached_img_s"]
    assert not (tmp_path / "work" / "cache").exists()


@pytest.mark.slow  # two full runs on the lite backbone: 55 s on a busy 2-core machine
def test_novel_split_reproduces_the_runs_own_accuracy_with_both_towers(tmp_path, capsys):
    # prepare: a finished fedlora run (it trains both towers' LoRA)
    from feddtl.cli import main as cli_main

    run_dir = tmp_path / "run"
    assert cli_main(["run", "--config", "tiny", "--set", "method=fedlora", "--set", "rounds=2", "--out", str(run_dir), "--quiet"]) == 0
    spec = importlib.util.spec_from_file_location("novel_split", SCRIPT.parent / "novel_split.py")
    novel_split = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(novel_split)
    # execute
    assert novel_split.main([str(run_dir), "--csv", str(tmp_path / "split.csv")]) == 0
    # assert: both trained towers reproduce results.json; the shipped towers are the zero-shot model
    import csv
    import json

    rows = {r["variant"]: r for r in csv.DictReader((tmp_path / "split.csv").open())}
    assert set(rows) == {"shipped", "image LoRA only", "text LoRA only", "both"}
    own = json.loads((run_dir / "results.json").read_text())
    assert abs(float(rows["both"]["hm"]) - own["hm"]) < 1e-6
    zeroshot_dir = tmp_path / "zeroshot"
    assert cli_main(["run", "--config", "tiny", "--set", "method=zeroshot", "--out", str(zeroshot_dir), "--quiet"]) == 0
    zeroshot = json.loads((zeroshot_dir / "results.json").read_text())
    assert abs(float(rows["shipped"]["hm"]) - zeroshot["hm"]) < 1e-6
    assert "| both |" in capsys.readouterr().out
