"""FedDTL: decoupled training (image LoRA on clients, text LoRA on the server) with SFT -> GRPO."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from feddtl.algorithm.client import ClientData, client_step
from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.algorithm.privacy import epsilon_spent, upload_noise
from feddtl.algorithm.server import class_embeddings, pooled_embeddings, screen_embeddings, text_alignment_step
from feddtl.backbones.base import Backbone
from feddtl.config import ExperimentConfig
from feddtl.methods.base import Method, ServerContext
from feddtl.methods.central_dp import CentralDP
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
        privacy = self.config.privacy
        # [privacy]: None when off, and then nothing below draws, computes or reports anything more
        self.central_dp = CentralDP(privacy, self.config.rounds, self.config.seed) if privacy.lora_private else None
        self.upload_noise = upload_noise(privacy, self.config.rounds)

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
        noise = upload_noise(config.privacy, config.rounds)  # None unless privacy.upload_epsilon is set
        return client_step(backbone, data, task, config.client, config.grpo, seed, noise)

    def server_update(self, updates: Sequence[ClientUpdate], round_num: int) -> dict[str, Any]:
        dp_metrics: dict[str, Any] = {}
        if self.central_dp is None:
            image_lora, metrics = self.aggregate(updates, [u.image_lora for u in updates])
            if image_lora is not None:  # None: too few updates for the robust rule; the global LoRA stays
                self.image_lora = image_lora
        else:  # central DP is the aggregation (Flower's fixed clipping): no robust rule with it (a config check)
            metrics = {}
            self.image_lora, dp_metrics = self.central_dp.aggregate([u.image_lora for u in updates], self.image_lora, round_num)
        if self.upload_noise is not None:
            # the clients add this noise; the server accounts it from the config (one release a round)
            privacy = self.config.privacy
            dp_metrics["dp_upload_epsilon"] = epsilon_spent(self.upload_noise.multiplier, round_num, privacy.upload_delta)
            dp_metrics["dp_upload_delta"] = privacy.upload_delta
            dp_metrics["dp_upload_noise_multiplier"] = self.upload_noise.multiplier
        if round_num == self.config.switch_round:
            self.sft_reference = self.image_lora
        server = self.config.server
        uploads = list(updates)
        if server.embedding_min_relative_agreement is not None:
            # judged against T of the global model the clients were sent (before this round's text step)
            uploads, agreements, rejected = screen_embeddings(updates, self.base_T, server.embedding_min_relative_agreement)
            metrics["embedding_agreement"] = agreements
            if rejected:
                metrics["embeddings_rejected"] = rejected
        if not uploads:
            metrics["uploaded_embeddings"] = 0.0  # every upload rejected: no text step this round
            return metrics
        embeddings, labels = pooled_embeddings(uploads)
        metrics.update(text_alignment_step(
            self.backbone, self.ctx.base_text, embeddings, labels, self.text_optimizer, server, self.generator
        ))
        self.base_T = class_embeddings(self.backbone, self.ctx.base_text)
        return {**metrics, **dp_metrics}

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
        if self.central_dp is not None:
            tensors["dp_generator"] = self.central_dp.generator.get_state()
        return tensors, {"text_adam": opt_meta, "has_sft_reference": self.sft_reference is not None}

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        order = list(self.image_lora)
        self.image_lora = unprefixed(tensors, "image", order)
        self.backbone.load_image_lora(self.image_lora)  # checks shapes against the model
        self.backbone.load_text_lora(unprefixed(tensors, "text"))
        load_optimizer_state(self.text_optimizer, unprefixed(tensors, "text_adam"), meta["text_adam"])
        self.generator.set_state(tensors["generator"])
        if self.central_dp is not None:
            self.central_dp.generator.set_state(tensors["dp_generator"])
        self.sft_reference = unprefixed(tensors, "sft_reference", order) if meta["has_sft_reference"] else None
        self.base_T = class_embeddings(self.backbone, self.ctx.base_text)
