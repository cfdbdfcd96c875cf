"""``feddtl predict``: open-vocabulary classification of image files with a tuned model, to CSV.

Any class names work: each is embedded as ``template.format(name)`` by the tuned text tower, each
image by feddtl's preprocessing and the tuned image tower, and p(class | image) = softmax(s * cos), as
evaluation scores. Files that do not decode are reported and skipped.
"""

from __future__ import annotations

import csv
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from PIL import Image
from tqdm import tqdm

from feddtl.export.manifest import ExportError
from feddtl.export.model import TunedModel

READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
"""What PIL raises for a file that is missing, not an image, truncated or corrupt (some plugins raise
SyntaxError or EOFError on malformed headers)."""


def image_extensions() -> set[str]:
    """The file extensions PIL can open (".png", ".jpg", ...)."""
    return {ext.lower() for ext in Image.registered_extensions()}


def collect_images(paths: list[str], warn: Callable[[str], None]) -> list[Path]:
    """Image files of ``paths``: folders are searched recursively for files with an image extension
    (sorted); files named on the command line are kept whatever their extension (read errors tell);
    paths that do not exist are reported and left out."""
    extensions = image_extensions()
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in extensions)
            if not found:
                warn(f"{item}: no image files in this folder")
            files += found
        elif not path.exists():
            warn(f"skipping {item}: no such file or folder")
        else:
            files.append(path)
    return files


def parse_classes(classes: str | None, classes_file: str | None) -> list[str]:
    """Class names from ``--classes "a,b,c"`` or ``--classes-file`` (one per line); blanks dropped."""
    if classes_file is not None:
        try:
            names = Path(classes_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ExportError(f"--classes-file {classes_file}: {exc.strerror or exc}") from None
    else:
        names = (classes or "").split(",")
    names = [n.strip() for n in names if n.strip()]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ExportError(f"class names given twice: {', '.join(duplicates)}")
    if len(names) < 2:
        raise ExportError(f"need at least 2 class names to choose between, got {len(names)}")
    return names


def read_image(path: Path) -> Image.Image:
    """Decode ``path`` fully now (a truncated file fails here, not in the batch), as RGB."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")  # images_to_tensor's first step; the file can close


@dataclass
class PredictSummary:
    predicted: int
    skipped: int


def predict_csv(
    model: TunedModel,
    files: list[Path],
    classes: list[str],
    stream: TextIO,
    top_k: int = 5,
    batch_size: int = 32,
    progress: bool = True,
    warn: Callable[[str], None] = print,
) -> PredictSummary:
    """Classify ``files`` among ``classes`` and write one CSV row per readable file to ``stream``:
    ``file, top1, p1, ..., topK, pK`` (K = min(top_k, number of classes)), most probable first. The
    header comes with the first row: without a readable image nothing is written."""
    if top_k < 1:
        raise ExportError(f"--top-k must be >= 1, got {top_k}")
    if batch_size < 1:
        raise ExportError(f"--batch-size must be >= 1, got {batch_size}")
    k = min(top_k, len(classes))
    text = model.text_embeddings(classes)
    writer = csv.writer(stream)
    header = ["file"] + [col for i in range(1, k + 1) for col in (f"top{i}", f"p{i}")]
    summary = PredictSummary(0, 0)
    with tqdm(total=len(files), unit="img", desc="predict", disable=not progress, file=sys.stderr) as bar:
        for start in range(0, len(files), batch_size):
            batch, images = [], []
            for path in files[start : start + batch_size]:
                try:
                    images.append(read_image(path))
                    batch.append(path)
                except READ_ERRORS as exc:
                    summary.skipped += 1
                    reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                    warn(f"skipping {path}: cannot read it as an image ({reason})")
            if images:
                if summary.predicted == 0:  # the header with the first row: no readable image, no CSV at all
                    writer.writerow(header)
                probs, index = model.probabilities(images, text).topk(k, dim=-1)
                for path, p_row, i_row in zip(batch, probs.tolist(), index.tolist()):
                    writer.writerow([str(path)] + [v for c, p in zip(i_row, p_row) for v in (classes[c], f"{p:.6f}")])
                summary.predicted += len(images)
            bar.update(len(files[start : start + batch_size]))
    return summary


def predict_to_file(
    model: TunedModel,
    files: list[Path],
    classes: list[str],
    out: Path | None,
    top_k: int = 5,
    batch_size: int = 32,
    progress: bool = True,
    warn: Callable[[str], None] = print,
) -> PredictSummary:
    """``predict_csv`` into ``out`` (None: stdout). The file appears only when an image was read, and
    whole: rows go to a temporary file renamed at the end."""
    options = dict(top_k=top_k, batch_size=batch_size, progress=progress, warn=warn)
    if out is None:
        return predict_csv(model, files, classes, sys.stdout, **options)  # type: ignore[arg-type]
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", newline="", encoding="utf-8") as stream:
            summary = predict_csv(model, files, classes, stream, **options)  # type: ignore[arg-type]
        if summary.predicted:
            os.replace(tmp, out)
        return summary
    finally:
        tmp.unlink(missing_ok=True)
