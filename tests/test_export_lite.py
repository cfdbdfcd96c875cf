"""`feddtl export` and `feddtl predict` on a `lite` run: the export folder holds LoRA + bridge tensors and a
JSON manifest, and feddtl loads it without the run folder into the model the run evaluated."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from feddtl.cli import main
from feddtl.config import load_config
from feddtl.export import load_tuned_model
from feddtl.server.experiment import run_experiment

# A lite run, its export and two lite backbones built (each a pass of the text tower over 1000 prompts,
# except the export's, which loads its saved bridge): about 50 s on a busy 2-core machine.
pytestmark = pytest.mark.slow

DIGITS = "zero,one,two,three,four,five,six,seven,eight,nine"


@pytest.fixture(scope="module")
def lite_run(tmp_path_factory):
    config = load_config("tiny", ["rounds=1", "client.switch_round=1", "eval.every=1"])
    out = tmp_path_factory.mktemp("lite") / "run"
    run_experiment(config, out, progress=False, log_fn=lambda s: None)
    return out


@pytest.fixture(scope="module")
def lite_export(lite_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("lite-export") / "export"
    assert main(["export", str(lite_run), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("digits")
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 256, (8 + 4 * k, 8, 3), dtype=np.uint8)).save(folder / f"d{k}.png")
    (folder / "empty.jpg").write_bytes(b"")
    return folder


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_lite_export_predicts_like_the_run_without_the_run_folder(lite_run, lite_export, images, tmp_path, capsys):
    # prepare: predictions straight from the run folder, then from its export with the run folder gone
    export = lite_export
    assert main(["predict", str(lite_run), "--images", str(images), "--classes", DIGITS,
                 "--out", str(tmp_path / "run.csv"), "--quiet"]) == 0
    run_weights = load_file(str(lite_run / "final_lora.safetensors"))
    moved = shutil.move(str(lite_run), str(tmp_path / "elsewhere"))
    # execute
    code = main(["predict", str(export), "--images", str(images), "--classes", DIGITS, "--out", str(tmp_path / "export.csv")])
    # assert: the folder's content, and the same top-5 with the same probabilities
    err = capsys.readouterr().err
    shutil.move(moved, str(lite_run))  # the module fixture stays usable
    assert code == 0
    assert sorted(p.name for p in export.iterdir()) == ["bridge.safetensors", "feddtl_export.json", "lora.safetensors"]
    manifest = json.loads((export / "feddtl_export.json").read_text())
    assert manifest["kind"] == "lite" and manifest["image_size"] == 32 and manifest["logit_scale"] == 100.0
    assert manifest["lora"]["image_start_block"] == 14 and manifest["backbone_options"]["bridge_top_k"] == 10
    lora = load_file(str(export / "lora.safetensors"))
    assert set(lora) == set(run_weights) and all(torch.equal(lora[k], run_weights[k]) for k in lora)
    assert load_file(str(export / "bridge.safetensors"))["bridge"].shape == (1000, 384)
    assert "skipping" in err and "empty.jpg" in err and "predict: 100%" in err  # the progress bar, on stderr
    from_run, from_export = _rows(tmp_path / "run.csv"), _rows(tmp_path / "export.csv")
    assert from_run[0] == ["file"] + [c for i in range(1, 6) for c in (f"top{i}", f"p{i}")]
    assert len(from_export) == 4
    for a, b in zip(from_run[1:], from_export[1:], strict=True):
        assert a[0] == b[0] and a[1::2] == b[1::2]
        np.testing.assert_allclose([float(p) for p in a[2::2]], [float(p) for p in b[2::2]], atol=2e-6)


def test_lite_export_loads_into_the_tuned_backbone(lite_run, lite_export):
    # execute
    model = load_tuned_model(lite_export)
    # assert: the run's final LoRA is in place, and the text tower takes any class name
    run_weights = load_file(str(lite_run / "final_lora.safetensors"))
    image = {k[len("image."):]: v for k, v in run_weights.items() if k.startswith("image.")}
    assert all(torch.equal(v, image[k]) for k, v in model.backbone.image_lora_state().items())
    assert torch.equal(model.backbone.bridge, load_file(str(lite_export / "bridge.safetensors"))["bridge"])
    text = model.text_embeddings(["sneaker", "a class nobody trained on"])
    assert text.shape == (2, 384) and torch.allclose(text.norm(dim=-1), torch.ones(2))
