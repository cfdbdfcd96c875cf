"""Zero-shot: the backbone as it ships, no training (the reference every method must beat)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from feddtl.algorithm.client import ClientData
from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.algorithm.server import class_embeddings
from feddtl.backbones.base import Backbone
from feddtl.config import ExperimentConfig
from feddtl.methods.base import Method, ServerContext
from feddtl.methods.state import unprefixed


class ZeroShot(Method):
    name = "zeroshot"
    trains = False

    def __init__(self, ctx: ServerContext) -> None:
        super().__init__(ctx)
        self.image_lora = self.backbone.image_lora_state()  # LoRA B = 0: the shipped weights

    def make_task(self, round_num: int) -> ClientTask:
        raise RuntimeError("zeroshot runs no rounds")

    @staticmethod
    def client_step(
        backbone: Backbone, data: ClientData, task: ClientTask, config: ExperimentConfig, seed: int
    ) -> ClientUpdate:
        raise RuntimeError("zeroshot runs no rounds")

    def server_update(self, updates: Sequence[ClientUpdate], round_num: int) -> dict[str, float]:
        raise RuntimeError("zeroshot runs no rounds")

    def prepare_eval(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.backbone.load_image_lora(self.image_lora)
        return class_embeddings(self.backbone, self.ctx.base_text), class_embeddings(self.backbone, self.ctx.novel_text)

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {f"image.{k}": v for k, v in self.image_lora.items()}, {}

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        image = unprefixed(tensors, "image", list(self.image_lora))
        self.backbone.load_image_lora(image)
        self.image_lora = image
