"""FedDTL: decoupled training (image LoRA on clients, text LoRA on the server) with SFT -> GRPO."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from feddtl.algorithm.client import ClientData, client_step
from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.algorithm.server import aggregate_image_lora, class_embeddings, pooled_embeddings, text_alignment_step
from feddtl.backbones.base import Backbone
from feddtl.config import ExperimentConfig
from feddtl.methods.base import Method, ServerContext
from feddtl.methods.state import load_optimizer_state, optimizer_state, prefixed, unprefixed


class FedDTL(Method):
    name = "feddtl"
    client_image_only = True  # image tail and the task's class embeddings only

    def __init__(self, ctx: ServerContext) -> None:
        super().__init__(ctx)
        self.image_lora = self.backbone.image_lora_state()
        # M = 0 means RL from the start: the "end of SFT" reference is then the initial model.
        self.sft_reference = self.image_lora if self.config.switch_round == 0 else None
        self.text_optimizer = torch.optim.Adam(self.backbone.text_lora_parameters(), lr=self.config.server.text_lr)
        self.generator = torch.Generator().manual_seed(self.config.seed + 7919)
        self.base_T = class_embeddings(self.backbone, ctx.base_text)

    def stage(self, round_num: int) -> str:
        return "sft" if round_num <= self.config.switch_round else "rl"

    def make_task(self, round_num: int) -> ClientTask:
        stage = self.stage(round_num)
        return ClientTask(
            round=round_num,
            stage=stage,  # type: ignore[arg-type]
            image_lora=self.image_lora,
            class_embeddings=self.base_T,
            sft_reference_lora=self.sft_reference if stage == "rl" else None,
        )

    @staticmethod
    def client_step(
        backbone: Backbone, data: ClientData, task: ClientTask, config: ExperimentConfig, seed: int
    ) -> ClientUpdate:
        return client_step(backbone, data, task, config.client, config.grpo, seed)

    def server_update(self, updates: Sequence[ClientUpdate], round_num: int) -> dict[str, float]:
        self.image_lora = aggregate_image_lora(updates)
        if round_num == self.config.switch_round:
            self.sft_reference = self.image_lora
        embeddings, labels = pooled_embeddings(updates)
        metrics = text_alignment_step(
            self.backbone, self.ctx.base_text, embeddings, labels, self.text_optimizer, self.config.server, self.generator
        )
        self.base_T = class_embeddings(self.backbone, self.ctx.base_text)
        return metrics

    def prepare_eval(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.backbone.load_image_lora(self.image_lora)
        return self.base_T, class_embeddings(self.backbone, self.ctx.novel_text)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **{f"image.{k}": v for k, v in self.image_lora.items()},
            **{f"text.{k}": v for k, v in self.backbone.text_lora_state().items()},
        }

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        opt_tensors, opt_meta = optimizer_state(self.text_optimizer)
        tensors = {
            **prefixed(self.image_lora, "image"),
            **prefixed(self.backbone.text_lora_state(), "text"),
            **prefixed(opt_tensors, "text_adam"),
            "generator": self.generator.get_state(),
        }
        if self.sft_reference is not None:
            tensors.update(prefixed(self.sft_reference, "sft_reference"))
        return tensors, {"text_adam": opt_meta, "has_sft_reference": self.sft_reference is not None}

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        order = list(self.image_lora)
        self.image_lora = unprefixed(tensors, "image", order)
        self.backbone.load_image_lora(self.image_lora)  # checks shapes against the model
        self.backbone.load_text_lora(unprefixed(tensors, "text"))
        load_optimizer_state(self.text_optimizer, unprefixed(tensors, "text_adam"), meta["text_adam"])
        self.generator.set_state(tensors["generator"])
        self.sft_reference = unprefixed(tensors, "sft_reference", order) if meta["has_sft_reference"] else None
        self.base_T = class_embeddings(self.backbone, self.ctx.base_text)
