"""``lite`` exports: the LoRA and bridge tensors (safetensors) plus the manifest; base weights come from pip.

Folder layout::

    lora.safetensors      image.* / text.* LoRA, keyed by LiteBackbone parameter name (as final_lora)
    bridge.safetensors    "bridge": the (1000, D) ImageNet-prompt text embeddings the image tower mixes
    feddtl_export.json    manifest.py's fields plus backbone_options and lora (how to rebuild the backbone)

Loading rebuilds ``LiteBackbone`` from the pip packages with the saved options and the saved bridge (the
run's bridge, and no pass of the text tower over 1000 prompts), wraps the same modules with LoRA and
loads the tensors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from feddtl.backbones.base import Backbone
from feddtl.backbones.lite import LiteBackbone
from feddtl.config.backbone_config import BackboneConfig
from feddtl.config.lora_config import LoraConfig
from feddtl.export.manifest import ExportError

LORA_FILE = "lora.safetensors"
BRIDGE_FILE = "bridge.safetensors"


def write_lite_export(backbone: Backbone, folder: Path) -> dict[str, Any]:
    """Write ``backbone``'s LoRA (the run's final one, or zeros for zeroshot) and bridge into ``folder``."""
    tensors = {
        **{f"image.{k}": v for k, v in backbone.image_lora_state().items()},
        **{f"text.{k}": v for k, v in backbone.text_lora_state().items()},
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / LORA_FILE))
    save_file({"bridge": backbone.bridge.detach().cpu().contiguous()}, str(folder / BRIDGE_FILE))
    return {"files": {"lora": LORA_FILE, "bridge": BRIDGE_FILE}}


def load_lite_export(folder: Path, manifest: dict[str, Any]) -> Backbone:
    """The tuned ``lite`` backbone from an export folder alone (and the pip packages)."""
    try:
        options = BackboneConfig(**manifest["backbone_options"])
        lora = LoraConfig(**manifest["lora"])
        tensors = load_file(str(folder / LORA_FILE))
        bridge = load_file(str(folder / BRIDGE_FILE))["bridge"]
    except (KeyError, TypeError, OSError) as exc:
        raise ExportError(f"{folder}: incomplete lite export ({type(exc).__name__}: {exc})") from None
    try:
        backbone = LiteBackbone(
            image_size=int(manifest["image_size"]),
            bridge_top_k=options.bridge_top_k,
            bridge_temperature=options.bridge_temperature,
            template=options.template,
            logit_scale=float(manifest["logit_scale"]),
            bridge=bridge,
        )
    except ValueError as exc:  # a bridge of another shape
        raise ExportError(f"{folder}: {BRIDGE_FILE} does not fit the lite backbone ({exc})") from None
    backbone.add_lora(lora)
    try:
        backbone.load_image_lora({k[len("image.") :]: v for k, v in tensors.items() if k.startswith("image.")})
        backbone.load_text_lora({k[len("text.") :]: v for k, v in tensors.items() if k.startswith("text.")})
    except ValueError as exc:
        raise ExportError(f"{folder}: {LORA_FILE} does not fit the lite backbone ({exc})") from None
    return backbone


def lite_manifest_fields(options: BackboneConfig, lora: LoraConfig) -> dict[str, Any]:
    return {"backbone_options": dataclasses.asdict(options), "lora": dataclasses.asdict(lora)}
