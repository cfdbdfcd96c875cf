"""Local stand-ins for the `paper-clip` suite's inputs, to run the real suite file on any machine, offline:

- ``DIR/clip``: the tiny random CLIP (4 blocks of width 32) with ViT-B/16's patch geometry (patch 16, 224 px:
  196 patches), for ``FEDDTL_CLIP_DIR``;
- ``DIR/data/eurosat``: scikit-learn's 8x8 digits saved with save_to_disk as EuroSAT's hub copy is laid out
  (columns image, label, image_id; label names AnnualCrop ... SeaLake; splits train and test), for
  ``FEDDTL_DATA_ROOT``, so the suite's EuroSAT scenarios read it with CoOp's class-name file.

    python benchmarks/paper_clip_local.py DIR
    FEDDTL_CLIP_DIR=DIR/clip FEDDTL_DATA_ROOT=DIR/data feddtl bench --suite paper-clip --scenarios eurosat-fs-path ...

The numbers such a run gives mean nothing (random weights, 8x8 digits); it checks the path, the sizes and the speed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np

EUROSAT = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture", "PermanentCrop",
           "Residential", "River", "SeaLake"]


def build(folder: Path, test_per_class: int = 30) -> tuple[Path, Path]:
    import datasets
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
    from sklearn.datasets import load_digits
    from transformers.utils import logging as hf_logging

    from feddtl.backbones.tiny_clip import build_tiny_clip

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    clip = build_tiny_clip(folder / "clip", image_size=224, patch_size=16)
    bunch = load_digits()
    images = np.clip(np.rint(bunch.images * (255 / 16)), 0, 255).astype(np.uint8)
    features = Features({"image": Image(), "label": ClassLabel(names=EUROSAT), "image_id": Value("string")})
    splits: dict[str, dict[str, list]] = {s: {"image": [], "label": [], "image_id": []} for s in ("train", "test")}
    for c in range(10):
        idx = np.flatnonzero(bunch.target == c)
        for i, row in enumerate(idx):
            split = "test" if i < test_per_class else "train"
            splits[split]["image"].append(images[row])
            splits[split]["label"].append(c)
            splits[split]["image_id"].append(f"{EUROSAT[c]}_{row}")
    data = folder / "data" / "eurosat"
    DatasetDict({k: Dataset.from_dict(v, features=features) for k, v in splits.items()}).save_to_disk(str(data))
    return clip, data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    clip, data = build(args.dir)
    print(f"FEDDTL_CLIP_DIR={clip}\nFEDDTL_DATA_ROOT={data.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
