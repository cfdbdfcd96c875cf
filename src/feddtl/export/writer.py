"""``feddtl export RUN --out DIR``: the tuned model of a finished run, in a folder of its own.

The export is written into a temporary folder beside ``DIR`` and renamed into place at the end, so a
failed export leaves nothing half-written, and ``--force`` replaces an earlier folder only once the new
one is complete.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import feddtl
from feddtl.backbones.base import Backbone
from feddtl.config.lora_config import LoraConfig
from feddtl.export.hf import HF_PREFIX, write_hf_export
from feddtl.export.lite import lite_manifest_fields, write_lite_export
from feddtl.export.manifest import ExportError, write_manifest
from feddtl.export.source import RunSource, open_run, run_backbone

RESULT_FIELDS = ("dataset", "partition", "rounds", "seed", "base_acc", "novel_acc", "hm", "local_acc")


def check_out_dir(out: Path, run: Path, force: bool) -> None:
    """``out`` may be new or empty; an existing non-empty folder needs ``force`` and must not hold the run."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ExportError(f"--out {out}: folder exists and is not empty (--force replaces it)")
        resolved_out, resolved_run = out.resolve(), run.resolve()
        if resolved_out == resolved_run or resolved_out in resolved_run.parents:
            raise ExportError(f"--out {out}: holds the run folder {run}; --force would delete it")


def _manifest(run: RunSource, backbone: Backbone, lora: LoraConfig, kind: str) -> dict[str, Any]:
    config = run.config
    return {
        "kind": kind,
        "method": config.method,
        "backbone": config.backbone,
        "template": config.backbone_options.template,
        "logit_scale": float(backbone.logit_scale),
        "image_size": config.data.image_size,
        "invert": config.data.invert,
        "image_mean": list(backbone.image_mean),
        "image_std": list(backbone.image_std),
        "resample": "bilinear",
        **lite_manifest_fields(config.backbone_options, lora),
        "source_run": str(run.path.resolve()),
        "results": {k: run.results.get(k) for k in RESULT_FIELDS},
        "feddtl_version": feddtl.__version__,
    }


def export_run(
    run_path: str | Path, out: str | Path, force: bool = False, log_fn: Callable[[str], None] = print
) -> dict[str, Any]:
    """Export the finished run in ``run_path`` to ``out``; returns the manifest written."""
    out = Path(out)
    run = open_run(run_path)
    check_out_dir(out, run.path, force)
    if run.config.backbone.startswith(HF_PREFIX):
        kind = "hf-clip"
    elif run.config.backbone == "lite":
        kind = "lite"
    else:
        raise ExportError(f"{run_path}: backbone {run.config.backbone!r} has no export format (hf-clip:..., lite)")
    backbone = run_backbone(run, device="cpu")
    # the start blocks resolved (None in the config means the backbone's default)
    lora = dataclasses.replace(
        run.config.lora, image_start_block=backbone.image_start_block, text_start_block=backbone.text_start_block
    )
    manifest = _manifest(run, backbone, lora, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"  # mkdir, not mkdtemp: the umask's permissions
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if kind == "hf-clip":
            base_name = run.config.backbone[len(HF_PREFIX) :]
            if Path(base_name).expanduser().is_dir():  # a local CLIP: the adapters name it absolutely
                base_name = str(Path(base_name).expanduser().resolve())
            manifest.update(write_hf_export(backbone, run.image_lora, run.text_lora, lora, base_name, tmp))
        else:
            manifest.update(write_lite_export(backbone, tmp))
        if manifest["invert"]:
            log_fn(
                "note: the run inverts images (data.invert = true); feddtl predict does too, other users of the "
                "export must invert images before preprocessing (feddtl_export.json says so)"
            )
        write_manifest(tmp, manifest)
        _readable_as_umask(tmp)
        if out.exists():
            shutil.rmtree(out)  # empty, or replaced under --force (check_out_dir)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _readable_as_umask(folder: Path) -> None:
    """Give the files the permissions the umask allows: safetensors creates its files 0600, and an
    export is meant to be handed on."""
    umask = os.umask(0)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)
