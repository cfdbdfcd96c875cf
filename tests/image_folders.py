"""Small image folders for tests: scikit-learn's 8x8 digits written as PNG files, one sub-folder per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digit_folder(root: Path, folders: dict[str, int], per_class: int, skip: int = 0) -> Path:
    """``root/<folder>/<i>.png``: ``per_class`` images of digit ``folders[folder]`` each (after the first
    ``skip`` of that digit, so two folders can hold different images of one digit)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.clip(np.rint(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    for folder, digit in folders.items():
        target = root / folder
        target.mkdir(parents=True, exist_ok=True)
        rows = np.flatnonzero(digits.target == digit)[skip : skip + per_class]
        assert len(rows) == per_class, f"only {len(rows)} images of digit {digit} after {skip}"
        for i, row in enumerate(rows):
            Image.fromarray(pixels[row]).save(target / f"{skip + i:03d}.png")
    return root
