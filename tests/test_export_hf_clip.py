"""`feddtl export` of tiny-CLIP runs: transformers / peft load the folder and reproduce feddtl's numbers;
`feddtl predict` on the run and on its export; the errors at the boundary."""

from __future__ import annotations

import csv
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from feddtl.algorithm.encoding import image_embeddings
from feddtl.algorithm.server import class_embeddings
from feddtl.backbones.tiny_clip import build_tiny_clip
from feddtl.cli import main
from feddtl.config import load_config
from feddtl.data import cap_per_class, load_dataset
from feddtl.data.transforms import images_to_tensor
from feddtl.export import load_tuned_model
from feddtl.export.hf import bake_position_embeddings
from feddtl.export.source import open_run, run_backbone
from feddtl.federation import class_split, prompt_features
from feddtl.server.experiment import run_experiment

CLASSES = ["cat", "dog", "golden retriever", "747 jet"]


def _features(out) -> torch.Tensor:
    """get_*_features returns a tensor in older transformers, an output with pooler_output in 5.x."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def _tiny_clip_run(clip, out, method: str = "feddtl", image_size: int = 32):
    config = load_config(
        "tiny",
        [f'backbone="hf-clip:{clip}"', f'method="{method}"', "rounds=1", "client.switch_round=1", "eval.every=1",
         f"data.image_size={image_size}"],
    )
    run_experiment(config, out, progress=False, log_fn=lambda s: None)
    return out


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0, image_size=32)


@pytest.fixture(scope="module")
def run_dir(clip_dir, tmp_path_factory):
    return _tiny_clip_run(clip_dir, tmp_path_factory.mktemp("runs") / "feddtl")


@pytest.fixture(scope="module")
def export_dir(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports") / "feddtl"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    return out


def _raw_images() -> list[Image.Image]:
    """Sizes and modes that exercise the resize (up, down, non-square, exact) and the RGB conversion."""
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8), "RGB"),
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L"),
        Image.fromarray(rng.integers(0, 256, (70, 20, 3), dtype=np.uint8), "RGB"),
        Image.fromarray(rng.integers(0, 256, (9, 13, 3), dtype=np.uint8), "RGB"),
    ]


def _feddtl_logits(backbone, pixels: torch.Tensor, template: str) -> torch.Tensor:
    """Evaluation's path (evaluation.evaluate): image embeddings from trunk features, class embeddings
    from the prompts' text-trunk features, times the logit scale."""
    with torch.no_grad():
        z = image_embeddings(backbone, backbone.image_trunk(pixels), batch_size=len(pixels))
        text = class_embeddings(backbone, prompt_features(backbone, CLASSES, template))
    return backbone.logit_scale * z @ text.T


def test_merged_clip_logits_equal_feddtls_evaluation(run_dir, export_dir, clip_dir):
    # prepare
    from transformers import CLIPModel, CLIPProcessor

    backbone = run_backbone(open_run(run_dir))
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = _feddtl_logits(backbone, pixels, "a photo of a {}.")
    # execute
    model = CLIPModel.from_pretrained(str(export_dir)).eval()
    tokenizer = CLIPProcessor.from_pretrained(str(export_dir)).tokenizer
    tokens = tokenizer([f"a photo of a {c}." for c in CLASSES], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**tokens, pixel_values=pixels).logits_per_image
        base = CLIPModel.from_pretrained(str(clip_dir)).eval()(**tokens, pixel_values=pixels).logits_per_image
    # assert: equal to feddtl, and the tuned LoRA really moved the model
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert (logits - base).abs().max() > 1e-4


def test_processor_reproduces_feddtl_preprocessing_from_raw_images(run_dir, export_dir):
    # prepare
    from transformers import CLIPModel, CLIPProcessor

    backbone = run_backbone(open_run(run_dir))
    images = _raw_images()
    manifest = json.loads((export_dir / "feddtl_export.json").read_text())
    ours = images_to_tensor(images, 32, backbone.image_mean, backbone.image_std)
    expected = _feddtl_logits(backbone, ours, manifest["template"])
    # execute: what a user of the folder does, with only the manifest's template
    processor = CLIPProcessor.from_pretrained(str(export_dir))
    prompts = [manifest["template"].format(c) for c in CLASSES]
    inputs = processor(text=prompts, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = CLIPModel.from_pretrained(str(export_dir)).eval()(**inputs).logits_per_image
    # assert
    torch.testing.assert_close(inputs["pixel_values"], ours, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft on transformers 5
def test_peft_adapters_on_the_base_clip_equal_the_merged_towers(export_dir, clip_dir):
    # prepare
    from peft import PeftModel
    from transformers import CLIPModel, CLIPTokenizer

    merged = CLIPModel.from_pretrained(str(export_dir)).eval()
    tokens = CLIPTokenizer.from_pretrained(str(export_dir))(CLASSES, padding=True, return_tensors="pt")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    # execute
    image_model = PeftModel.from_pretrained(CLIPModel.from_pretrained(str(clip_dir)), str(export_dir / "adapters/image"))
    text_model = PeftModel.from_pretrained(CLIPModel.from_pretrained(str(clip_dir)), str(export_dir / "adapters/text"))
    with torch.no_grad():
        image = _features(image_model.eval().get_image_features(pixel_values=pixels))
        text = _features(text_model.eval().get_text_features(**tokens))
        merged_image = _features(merged.get_image_features(pixel_values=pixels))
        merged_text = _features(merged.get_text_features(**tokens))
    # assert
    for name in ("image", "text"):
        config = json.loads((export_dir / f"adapters/{name}/adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str(clip_dir.resolve())
    torch.testing.assert_close(image, merged_image, rtol=0, atol=1e-5)
    torch.testing.assert_close(text, merged_text, rtol=0, atol=1e-5)


def test_manifest_says_how_feddtl_scored(run_dir, export_dir, clip_dir):
    # execute
    manifest = json.loads((export_dir / "feddtl_export.json").read_text())
    # assert
    backbone = run_backbone(open_run(run_dir))
    assert manifest["kind"] == "hf-clip" and manifest["method"] == "feddtl"
    assert manifest["template"] == "a photo of a {}." and manifest["image_size"] == 32
    assert manifest["logit_scale"] == pytest.approx(backbone.logit_scale) and manifest["invert"] is False
    assert manifest["resample"] == "bilinear" and manifest["source_run"] == str(run_dir.resolve())
    assert manifest["adapters"] == {"image": "adapters/image", "text": "adapters/text", "base_model": str(clip_dir.resolve())}


def test_zeroshot_run_exports_the_base_model_without_adapters(clip_dir, tmp_path):
    # prepare
    from transformers import CLIPModel

    run = _tiny_clip_run(clip_dir, tmp_path / "zeroshot", method="zeroshot")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    # execute
    code = main(["export", str(run), "--out", str(tmp_path / "export")])
    # assert
    assert code == 0
    manifest = json.loads((tmp_path / "export" / "feddtl_export.json").read_text())
    assert manifest["method"] == "zeroshot" and manifest["adapters"] is None
    assert not (tmp_path / "export" / "adapters").exists()
    with torch.no_grad():
        exported = _features(CLIPModel.from_pretrained(str(tmp_path / "export")).get_image_features(pixel_values=pixels))
        base = _features(CLIPModel.from_pretrained(str(clip_dir)).get_image_features(pixel_values=pixels))
    torch.testing.assert_close(exported, base, rtol=0, atol=1e-6)


def test_run_at_another_image_size_exports_a_model_of_that_size(clip_dir, tmp_path):
    # prepare: feddtl interpolates the 32 px CLIP's position embeddings to 48 px on every call
    from transformers import CLIPModel, CLIPTokenizer

    run = _tiny_clip_run(clip_dir, tmp_path / "run48", image_size=48)
    backbone = run_backbone(open_run(run))
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    expected = _feddtl_logits(backbone, pixels, "a photo of a {}.")
    # execute
    assert main(["export", str(run), "--out", str(tmp_path / "export")]) == 0
    model = CLIPModel.from_pretrained(str(tmp_path / "export")).eval()
    tokens = CLIPTokenizer.from_pretrained(str(tmp_path / "export"))([f"a photo of a {c}." for c in CLASSES], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**tokens, pixel_values=pixels).logits_per_image  # no interpolate_pos_encoding
    # assert
    assert model.config.vision_config.image_size == 48
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_baked_position_table_equals_interpolation(clip_dir):
    # prepare: a run at 48 px on a 32 px CLIP interpolates the position embeddings on every call
    from transformers import CLIPModel

    model = CLIPModel.from_pretrained(str(clip_dir)).eval()
    pixels = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = _features(model.get_image_features(pixel_values=pixels, interpolate_pos_encoding=True))
    # execute
    bake_position_embeddings(model, 48)
    with torch.no_grad():
        baked = _features(model.get_image_features(pixel_values=pixels))
    # assert
    assert model.config.vision_config.image_size == 48
    torch.testing.assert_close(baked, expected, rtol=0, atol=1e-6)


def test_exported_model_reproduces_the_runs_base_and_novel_accuracy(run_dir, export_dir):
    # prepare: the run's own test images (build_eval_set's selection), as files would give them
    config = load_config(str(run_dir / "config.toml"))
    results = json.loads((run_dir / "results.json").read_text())
    splits = load_dataset(config.dataset, config.data, seed=config.seed)
    classes = class_split(config, splits)
    model = load_tuned_model(export_dir)
    labels = splits.test.labels
    # execute
    accuracy = {}
    for name, group, names in (("base", classes.base, classes.base_names), ("novel", classes.novel, classes.novel_names)):
        idx = cap_per_class(labels, np.flatnonzero(np.isin(labels, group)), config.data.test_per_class, seed=config.seed + 3000)
        predicted = model.probabilities(splits.test.load_images(idx), model.text_embeddings(names)).argmax(-1)
        truth = torch.tensor([group.index(int(y)) for y in labels[idx]])
        accuracy[name] = 100 * (predicted == truth).float().mean().item()
    # assert
    assert accuracy == {"base": pytest.approx(results["base_acc"]), "novel": pytest.approx(results["novel_acc"])}


# ----- predict -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for k, image in enumerate(_raw_images()):
        image.save(folder / f"img{k}.png")
    (folder / "sub").mkdir()
    _raw_images()[0].save(folder / "sub" / "deep.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (folder / "notes.txt").write_text("not an image, not a candidate")
    return folder


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_predict_on_run_and_export_top_k_csv(run_dir, export_dir, image_dir, tmp_path, capsys):
    # execute
    codes = [
        main(["predict", str(src), "--images", str(image_dir), "--classes", ",".join(CLASSES), "--top-k", "3",
              "--out", str(tmp_path / f"{name}.csv")])
        for name, src in (("run", run_dir), ("export", export_dir))
    ]
    # assert
    err = capsys.readouterr().err
    assert codes == [0, 0]
    assert err.count("skipping") == 2 and "broken.png" in err and "notes.txt" not in err  # once per command
    run_rows, export_rows = _read_csv(tmp_path / "run.csv"), _read_csv(tmp_path / "export.csv")
    assert run_rows[0] == ["file", "top1", "p1", "top2", "p2", "top3", "p3"]
    assert [r[0] for r in run_rows[1:]] == [str(image_dir / f"img{k}.png") for k in range(4)] + [str(image_dir / "sub/deep.jpg")]
    for row_run, row_export in zip(run_rows[1:], export_rows[1:], strict=True):
        probs = [float(p) for p in row_run[2::2]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-5
        assert set(row_run[1::2]) <= set(CLASSES) and len(set(row_run[1::2])) == 3
        assert row_export[1::2] == row_run[1::2]
        np.testing.assert_allclose([float(p) for p in row_export[2::2]], probs, atol=2e-6)


def test_predict_top_k_is_capped_and_classes_file_read(export_dir, image_dir, tmp_path, capsys):
    # prepare
    names = tmp_path / "classes.txt"
    names.write_text("cat\n\n dog \n")
    # execute
    code = main(["predict", str(export_dir), "--images", str(image_dir / "img0.png"), "--classes-file", str(names), "--quiet"])
    # assert: CSV on stdout, top-5 capped at the two classes, probabilities of all classes sum to one
    out = capsys.readouterr().out.splitlines()
    assert code == 0
    assert out[0] == "file,top1,p1,top2,p2"
    row = out[1].split(",")
    assert sorted(row[1::2]) == ["cat", "dog"] and float(row[2]) + float(row[4]) == pytest.approx(1, abs=1e-5)


def test_predict_without_a_readable_image_exits_2(export_dir, image_dir, tmp_path, capsys):
    # execute: to a file, and to stdout
    to_file = main(["predict", str(export_dir), "--images", str(image_dir / "broken.png"), str(tmp_path / "missing.jpg"),
                    "--classes", "a,b", "--out", str(tmp_path / "p.csv"), "--quiet"])
    err = capsys.readouterr().err
    to_stdout = main(["predict", str(export_dir), "--images", str(image_dir / "broken.png"), "--classes", "a,b", "--quiet"])
    # assert
    assert (to_file, to_stdout) == (2, 2)
    assert "missing.jpg: no such file or folder" in err and "skipping " + str(image_dir / "broken.png") in err
    assert "none of the 1 files could be read" in err and not (tmp_path / "p.csv").exists()
    assert capsys.readouterr().out == ""  # not even the CSV header


# ----- errors at the boundary --------------------------------------------------------------------------
def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_export_rejects_what_is_not_a_finished_run(run_dir, tmp_path, capsys):
    # prepare: an empty folder; a run without results.json; a prompt-learning run
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.toml").write_text((run_dir / "config.toml").read_text())
    prompt = tmp_path / "promptfl"
    prompt.mkdir()
    (prompt / "config.toml").write_text((run_dir / "config.toml").read_text().replace('method = "feddtl"', 'method = "promptfl"'))
    (prompt / "results.json").write_text("{}")
    save_file({"prompt.context": torch.zeros(4, 32)}, str(prompt / "final_lora.safetensors"))
    # execute / assert
    assert main(["export", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "is not a feddtl run folder" in _one_line_error(capsys)
    assert main(["export", str(unfinished), "--out", str(tmp_path / "x")]) == 2
    assert "unfinished run (no results.json)" in _one_line_error(capsys)
    assert main(["export", str(prompt), "--out", str(tmp_path / "x")]) == 2
    err = _one_line_error(capsys)
    assert "'promptfl' run cannot be exported" in err and "feddtl, feddtl-decoupled" in err
    assert main(["predict", str(prompt), "--images", str(tmp_path), "--classes", "a,b"]) == 2
    assert not (tmp_path / "x").exists()


def test_export_out_must_be_new_or_empty_unless_force(run_dir, tmp_path, capsys):
    # prepare
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("earlier content")
    # execute
    refused = main(["export", str(run_dir), "--out", str(out)])
    err = _one_line_error(capsys)
    forced = main(["export", str(run_dir), "--out", str(out), "--force"])
    # assert
    assert refused == 2 and "not empty (--force replaces it)" in err
    assert forced == 0 and not (out / "old.txt").exists() and (out / "feddtl_export.json").is_file()
    assert main(["export", str(run_dir), "--out", str(run_dir.parent), "--force"]) == 2
    assert "--force would delete it" in _one_line_error(capsys)
