"""Dual-encoder backbones behind one interface (see base.Backbone)."""

from __future__ import annotations

from feddtl.backbones.base import Backbone, BackboneInfo, TextFeatures

__all__ = ["Backbone", "BackboneInfo", "TextFeatures", "build_backbone", "min_image_size"]


def min_image_size(spec: str) -> int | None:
    """The smallest image side the backbone ``spec`` encodes to a non-empty feature map or patch grid,
    known without building it (lite: its downsampling factor; hf-clip: the patch size in its config);
    None if it cannot be known before the model loads (the constructor checks it then)."""
    if spec == "lite":
        from feddtl.backbones.lite import LITE_DOWNSAMPLING

        return LITE_DOWNSAMPLING
    if spec.startswith("hf-clip:"):
        from feddtl.backbones.hf_clip import clip_patch_size

        return clip_patch_size(spec[len("hf-clip:") :])
    return None


def build_backbone(
    spec: str,
    image_size: int,
    options: "BackboneConfig",  # noqa: F821
    derived: dict | None = None,
    text_tower: bool = True,
) -> Backbone:
    """Build a backbone from its config name: "lite" or "hf-clip:<hub id or local path>".

    ``derived``: the ``derived_tensors()`` of an earlier build with the same arguments, so the build skips
    computing them. ``text_tower=False``: leave the text tower out where the backbone can (lite, given
    ``derived``); the others build it anyway."""
    if spec == "lite":
        from feddtl.backbones.lite import LiteBackbone

        return LiteBackbone(
            image_size=image_size,
            bridge_top_k=options.bridge_top_k,
            bridge_temperature=options.bridge_temperature,
            template=options.template,
            logit_scale=100.0 if options.logit_scale is None else options.logit_scale,
            derived=derived or None,
            text_tower=text_tower or not derived,
        )
    if spec.startswith("hf-clip:"):
        from feddtl.backbones.hf_clip import HFClipBackbone

        backbone = HFClipBackbone(spec[len("hf-clip:") :], image_size=image_size)
        if options.logit_scale is not None:
            backbone.logit_scale = float(options.logit_scale)
        return backbone
    raise ValueError(f"unknown backbone {spec!r}; allowed: lite, hf-clip:<hub id or local path>")
