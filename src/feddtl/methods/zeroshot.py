"""Zero-shot: the backbone as it ships, no training (the reference every method must beat).

No rounds run, so there is no checkpoint: a zero-shot run is one evaluation, and ``--resume`` of one that
did not finish simply evaluates again (the same numbers: nothing trains and nothing is random).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from feddtl.algorithm.client import ClientData
from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.algorithm.server import class_embeddings
from feddtl.backbones.base import Backbone
from feddtl.config import ExperimentConfig
from feddtl.methods.base import Method, ServerContext


class ZeroShot(Method):
    name = "zeroshot"
    client_image_only = True  # image tail and the task's class embeddings only
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
