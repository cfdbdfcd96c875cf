"""A finished run folder as the source of a tuned model: validation, and the backbone with its final LoRA.

The model a run evaluated is the configured backbone with the method's final image and text LoRA
loaded (``Method.prepare_eval``); the run folder keeps both in ``final_lora.safetensors`` (``image.*``,
``text.*``) for the LoRA methods, and nothing for zero-shot (the backbone as shipped).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from feddtl.backbones.base import Backbone
from feddtl.config import ConfigError, ExperimentConfig, load_config
from feddtl.export.manifest import ExportError
from feddtl.federation import make_backbone
from feddtl.methods import get_method

WEIGHTS_NAME = "final_lora.safetensors"
LORA_PREFIXES = ("image.", "text.")
EXPORTABLE_METHODS = ("feddtl", "feddtl-decoupled", "feddtl-twostage", "fedlora", "zeroshot")
"""For the messages: the methods whose final model is the backbone with an image and a text LoRA (or,
zeroshot, none). Whether a run exports is decided on its saved tensors (``open_run``), not on this list."""


@dataclass
class RunSource:
    """A finished run: its folder, resolved config, results and final LoRA tensors."""

    path: Path
    config: ExperimentConfig
    results: dict[str, Any]
    image_lora: dict[str, torch.Tensor] | None
    """The global image LoRA keyed by backbone parameter name; None: the method trains none (zeroshot)."""
    text_lora: dict[str, torch.Tensor] | None

    @property
    def trained(self) -> bool:
        return self.image_lora is not None


def open_run(path: str | Path) -> RunSource:
    """Check that ``path`` is a finished run of a LoRA method (or zeroshot) and read it."""
    folder = Path(path)
    if not folder.is_dir():
        raise ExportError(f"{path}: no such folder")
    if not (folder / "config.toml").is_file():
        raise ExportError(f"{path} is not a feddtl run folder (no config.toml) nor an export (no feddtl_export.json)")
    if not (folder / "results.json").is_file():
        raise ExportError(f"{path}: unfinished run (no results.json); finish it with `feddtl run --resume {path}`")
    try:
        config = load_config(str(folder / "config.toml"))
        results = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    except (ConfigError, OSError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: cannot read the run ({exc})") from None
    if not get_method(config.method).trains:
        return RunSource(folder, config, results, None, None)
    weights_path = folder / WEIGHTS_NAME
    if not weights_path.is_file():
        raise ExportError(f"{path}: unfinished run (results.json but no {WEIGHTS_NAME})")
    tensors = load_file(str(weights_path))
    other = sorted(k for k in tensors if not k.startswith(LORA_PREFIXES))
    if other:
        raise ExportError(
            f"{path}: a {config.method!r} run cannot be exported or used by predict: its final model is "
            f"not an image + text LoRA (it saves {other[0]}{', ...' if len(other) > 1 else ''}: a learned prompt "
            f"context a plain CLIP text tower cannot take); runs of {', '.join(EXPORTABLE_METHODS)} can"
        )
    image = {k[len("image.") :]: v for k, v in tensors.items() if k.startswith("image.")}
    text = {k[len("text.") :]: v for k, v in tensors.items() if k.startswith("text.")}
    return RunSource(folder, config, results, image, text)


def run_backbone(run: RunSource, device: str = "cpu") -> Backbone:
    """The run's backbone with its final LoRA loaded: the model its last evaluation scored."""
    config = dataclasses.replace(run.config, device=device)
    backbone = make_backbone(config)  # zero-initialised LoRA (B = 0): zeroshot's model as it is
    if run.image_lora is not None and run.text_lora is not None:
        try:
            backbone.load_image_lora(run.image_lora)
            backbone.load_text_lora(run.text_lora)
        except ValueError as exc:
            raise ExportError(f"{run.path}: {WEIGHTS_NAME} does not fit the configured backbone ({exc})") from None
    return backbone.eval()
