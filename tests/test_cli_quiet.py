"""`feddtl run --quiet` prints its one-line summary and nothing else: no progress bar of ours, of
transformers ("Loading weights" when a backbone is built) or of huggingface_hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network

import pytest
from transformers.utils import logging as hf_logging

from feddtl.backbones.tiny_clip import build_tiny_clip
from feddtl.cli import main

BAR_MARKS = ("Loading weights", "%|", "it/s", "\r")
"""What any tqdm bar leaves in captured output."""


@pytest.fixture
def bars_on():
    """transformers' bars as in a fresh process (on), whatever earlier tests did; put back after."""
    before = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar()
    yield
    (hf_logging.enable_progress_bar if before else hf_logging.disable_progress_bar)()


def _bars(text: str) -> list[str]:
    return [mark for mark in BAR_MARKS if mark in text]


def test_quiet_run_prints_only_the_summary(tmp_path, capfd, bars_on):
    # execute
    code = main(["run", "--config", "tiny", "--out", str(tmp_path / "run"), "--quiet"])
    # assert
    out, err = capfd.readouterr()
    assert code == 0
    assert _bars(out) == [] and _bars(err) == []
    assert len(out.splitlines()) == 1 and out.startswith("feddtl on digits")
    assert hf_logging.is_progress_bar_enabled()  # switched off for the run only


def test_quiet_silences_the_loading_bar_that_a_plain_run_shows(tmp_path, capfd, bars_on):
    # prepare: hf-clip loads a CLIPModel through transformers, which shows "Loading weights"
    clip = build_tiny_clip(tmp_path / "clip", seed=0, image_size=32, num_layers=2)
    args = ["run", "--config", "tiny", "--set", f'backbone="hf-clip:{clip}"', "--set", "rounds=1",
            "--set", "client.switch_round=1", "--set", "data.image_size=32", "--set", "data.test_per_class=5"]
    capfd.readouterr()
    # execute
    plain_code = main(args + ["--out", str(tmp_path / "plain")])
    plain_err = capfd.readouterr().err
    quiet_code = main(args + ["--out", str(tmp_path / "quiet"), "--quiet"])
    quiet_out, quiet_err = capfd.readouterr()
    # assert
    assert plain_code == quiet_code == 0
    assert "Loading weights" in plain_err  # the bar is real, so its absence below means something
    assert _bars(quiet_out) == [] and _bars(quiet_err) == []
    assert len(quiet_out.splitlines()) == 1
