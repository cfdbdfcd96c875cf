"""The tuned model as feddtl evaluates it, loaded from an export folder or a finished run folder.

Text and images go through feddtl's own code (``prompt_features`` + ``text_embeddings``,
``images_to_tensor`` + the image tower), so any class names get the embeddings a run's Novel
evaluation would give them, and ``probabilities`` is softmax(s * cos) exactly as evaluation scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from feddtl.algorithm.encoding import text_embeddings
from feddtl.backbones.base import Backbone
from feddtl.data.transforms import images_to_tensor
from feddtl.export.hf import load_hf_export
from feddtl.export.lite import load_lite_export
from feddtl.export.manifest import is_export, read_manifest
from feddtl.export.source import open_run, run_backbone
from feddtl.federation import prompt_features, resolve_device


@dataclass
class TunedModel:
    """A backbone with its tuned weights plus what scoring needs beside them."""

    backbone: Backbone
    template: str
    logit_scale: float
    image_size: int
    invert: bool
    source: str
    """What was loaded, for messages: "export DIR" or "run DIR"."""

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @torch.no_grad()
    def text_embeddings(self, classnames: list[str]) -> torch.Tensor:
        """L2-normalised (C, D) embeddings of ``template.format(c)`` from the tuned text tower, on the CPU."""
        return text_embeddings(self.backbone, prompt_features(self.backbone, classnames, self.template)).cpu()

    def pixels(self, images: list[Image.Image]) -> torch.Tensor:
        """feddtl's preprocessing: RGB, optional inversion, bilinear resize, normalisation."""
        bb = self.backbone
        return images_to_tensor(images, self.image_size, bb.image_mean, bb.image_std, invert=self.invert)

    @torch.no_grad()
    def image_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """L2-normalised (N, D) embeddings of preprocessed pixels (``pixels``), on the CPU."""
        x = pixels.to(self.device)
        return F.normalize(self.backbone.image_tail(self.backbone.image_trunk(x)), dim=-1).cpu()

    def logits(self, pixels: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """s * <image, text>: evaluation's logits (N, C) for ``text`` from ``text_embeddings``."""
        return self.logit_scale * self.image_embeddings(pixels) @ text.T

    def probabilities(self, images: list[Image.Image], text: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(self.pixels(images), text), dim=-1)


def load_tuned_model(path: str | Path, device: str = "cpu") -> TunedModel:
    """The model in an export folder (``feddtl_export.json``) or a finished run folder."""
    folder = Path(path)
    torch_device = resolve_device(device)
    if is_export(folder):
        manifest = read_manifest(folder)
        if manifest["kind"] == "hf-clip":
            backbone = load_hf_export(folder, manifest)
        else:
            backbone = load_lite_export(folder, manifest)
        return TunedModel(
            backbone=backbone.to(torch_device).eval(),
            template=manifest["template"],
            logit_scale=float(manifest["logit_scale"]),
            image_size=int(manifest["image_size"]),
            invert=bool(manifest["invert"]),
            source=f"export {folder}",
        )
    run = open_run(folder)
    backbone = run_backbone(run, device=torch_device.type)
    return TunedModel(
        backbone=backbone,
        template=run.config.backbone_options.template,
        logit_scale=float(backbone.logit_scale),
        image_size=run.config.data.image_size,
        invert=run.config.data.invert,
        source=f"run {folder}",
    )
