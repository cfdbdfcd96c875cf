"""``feddtl_export.json``: what an export folder holds and how to use it outside feddtl.

The merged CLIPModel / LoRA tensors alone do not give feddtl's numbers: the prompt template, the logit
scale, the resize (size, filter, no crop) and the optional inversion are part of the model as feddtl
evaluates it. The manifest carries them beside the weights, and marks the folder as an export.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST_NAME = "feddtl_export.json"
FORMAT = "feddtl-export"
FORMAT_VERSION = 1
KINDS = ("hf-clip", "lite")


class ExportError(ValueError):
    """A run or export folder cannot be used (not one, unfinished, unsupported method, bad options)."""


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    body = {"format": FORMAT, "format_version": FORMAT_VERSION, **manifest}
    (folder / MANIFEST_NAME).write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of an export folder, checked for the fields every loader reads."""
    path = folder / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: cannot read the export manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: not a feddtl export manifest (format != {FORMAT!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{path}: export format version {manifest.get('format_version')!r}; this feddtl reads version "
            f"{FORMAT_VERSION} (export the run again with this feddtl)"
        )
    if manifest.get("kind") not in KINDS:
        raise ExportError(f"{path}: unknown export kind {manifest.get('kind')!r}; allowed: {', '.join(KINDS)}")
    missing = [k for k in ("template", "logit_scale", "image_size", "invert", "image_mean", "image_std") if k not in manifest]
    if missing:
        raise ExportError(f"{path}: manifest lacks {', '.join(missing)}")
    return manifest


def is_export(folder: Path) -> bool:
    return (folder / MANIFEST_NAME).is_file()
