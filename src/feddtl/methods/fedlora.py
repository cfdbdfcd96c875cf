"""FedLoRA: LoRA on both towers trained locally with cross-entropy, FedAvg of all LoRA (no decoupling).

The paper's FedLoRA baseline. Each client loads the global image and text LoRA (the text LoRA travels
in ``extra`` under ``text.``), computes the class text embeddings T with its own text tower (with grad,
from the base prompts' cached text-trunk features, ``TextClientData.base_text``), trains both LoRAs on
its images, and uploads both. The server
averages each by sample count. No embeddings are uploaded and the server trains nothing: every
client pulls the shared text side toward its own classes, which is what decoupling avoids.

``two_stage = True`` (the ``feddtl-twostage`` ablation) swaps the local objective for SFT in
rounds <= M and the GRPO objective after, keeping everything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from feddtl.algorithm.client import ClientData, rl_reference_logprobs
from feddtl.algorithm.encoding import text_embeddings
from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.algorithm.server import class_embeddings
from feddtl.backbones.base import Backbone
from feddtl.config import ExperimentConfig
from feddtl.methods.base import Method, ServerContext
from feddtl.methods.state import prefixed, unprefixed
from feddtl.methods.text_side import client_base_text, lora_params, text_rl_epochs, text_sft_epochs

IMAGE = "image"
"""Prefix of the image LoRA in the joint state the server aggregates."""
TEXT = "text"
"""Prefix of the global (task) and local (update) text LoRA in ``extra``."""
TEXT_REF = "sft_reference_text"
"""Prefix of the end-of-SFT text LoRA in a task's ``extra`` (the two-stage RL reference)."""


class FedLoRA(Method):
    name = "fedlora"
    client_text = True
    two_stage = False
    """SFT for rounds <= M, then the GRPO objective on both towers (the feddtl-twostage ablation)."""

    def __init__(self, ctx: ServerContext) -> None:
        super().__init__(ctx)
        self.image_lora = self.backbone.image_lora_state()
        self.text_lora = self.backbone.text_lora_state()
        self.sft_reference: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None
        if self.two_stage and self.config.switch_round == 0:
            self.sft_reference = (self.image_lora, self.text_lora)

    def stage(self, round_num: int) -> str:
        return "rl" if self.two_stage and round_num > self.config.switch_round else "sft"

    def make_task(self, round_num: int) -> ClientTask:
        stage = self.stage(round_num)
        extra = prefixed(self.text_lora, TEXT)
        sft_image = None
        if stage == "rl" and self.sft_reference is not None:
            sft_image = self.sft_reference[0]
            extra.update(prefixed(self.sft_reference[1], TEXT_REF))
        return ClientTask(
            round=round_num,
            stage=stage,  # type: ignore[arg-type]
            image_lora=self.image_lora,
            # Clients compute T themselves from the text LoRA; nothing precomputed travels.
            class_embeddings=torch.zeros((0, self.backbone.info.embed_dim)),
            sft_reference_lora=sft_image,
            extra=extra,
        )

    @staticmethod
    def client_step(
        backbone: Backbone, data: ClientData, task: ClientTask, config: ExperimentConfig, seed: int
    ) -> ClientUpdate:
        data.require_images()
        text_lora = unprefixed(task.extra, TEXT)
        if not text_lora:
            raise ValueError("FedLoRA-style tasks must carry the global text LoRA (extra['text.*'])")
        base_text = client_base_text(data, "fedlora")
        generator = torch.Generator().manual_seed(seed)
        backbone.load_image_lora(task.image_lora)
        backbone.load_text_lora(text_lora)
        params = lora_params(backbone, config.client)

        def text_fn() -> torch.Tensor:
            return text_embeddings(backbone, base_text)

        if task.stage == "sft":
            metrics = text_sft_epochs(backbone, data, text_fn, params, config.client.sft_epochs, config.client, generator)
        else:
            # The text LoRA gets the RL gradient too: the ablation replaces the local objective of
            # FedLoRA, which trains both towers, and keeps everything else. The reference's end-of-SFT
            # half is that round's image and text LoRA, each model with its own T.
            sft_image, sft_text = task.sft_reference_lora, unprefixed(task.extra, TEXT_REF)

            def load(image: dict[str, torch.Tensor], text: dict[str, torch.Tensor]) -> None:
                backbone.load_image_lora(image)
                backbone.load_text_lora(text)

            old_lp, ref_lp = rl_reference_logprobs(
                backbone, data, lambda: class_embeddings(backbone, base_text), config.client.batch_size,
                config.grpo.ref_mix,
                load_sft=None if sft_image is None else lambda: load(sft_image, sft_text),
                load_global=lambda: load(task.image_lora, text_lora),
            )
            metrics = text_rl_epochs(
                backbone, data, text_fn, old_lp, ref_lp, params, config.client.rl_epochs, config.client,
                config.grpo, generator,
            )
        return ClientUpdate(
            client_id=data.client_id,
            num_samples=len(data),
            image_lora=backbone.image_lora_state(),
            embeddings=torch.zeros((0, backbone.info.embed_dim)),
            labels=torch.zeros(0, dtype=torch.long),
            metrics=metrics,
            extra=prefixed(backbone.text_lora_state(), TEXT),
        )

    def update_extra_reference(self, task: ClientTask) -> dict[str, torch.Tensor]:
        # the local text LoRA, checked against the global one sent
        return {k: v for k, v in task.extra.items() if k.startswith(TEXT + ".")}

    def server_update(self, updates: Sequence[ClientUpdate], round_num: int) -> dict[str, Any]:
        # One state per client, image and text LoRA together: a selecting rule (Krum) keeps or drops a
        # client's whole update, never its image half from one client and its text half from another.
        # FedAvg works key by key, so this is the same arithmetic as averaging the two apart.
        states = [
            {**prefixed(u.image_lora, IMAGE), **prefixed(unprefixed(u.extra, TEXT, list(self.text_lora)), TEXT)}
            for u in updates
        ]
        state, metrics = self.aggregate(updates, states)
        if state is not None:  # None: too few updates for the robust rule; the global LoRA stays
            self.image_lora = unprefixed(state, IMAGE, list(self.image_lora))
            self.text_lora = unprefixed(state, TEXT, list(self.text_lora))
        if self.two_stage and round_num == self.config.switch_round:
            self.sft_reference = (self.image_lora, self.text_lora)
        return metrics

    def prepare_eval(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.backbone.load_image_lora(self.image_lora)
        self.backbone.load_text_lora(self.text_lora)
        return class_embeddings(self.backbone, self.ctx.base_text), class_embeddings(self.backbone, self.ctx.novel_text)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **{f"image.{k}": v for k, v in self.image_lora.items()},
            **{f"text.{k}": v for k, v in self.text_lora.items()},
        }

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        # Everything the next round reads: the global image and text LoRA and, for the two-stage
        # ablation after round M, the end-of-SFT pair (the RL reference). The server has no optimiser
        # or generator; clients load what they are sent, so the backbone holds no state of its own.
        tensors = {**prefixed(self.image_lora, "image"), **prefixed(self.text_lora, "text")}
        if self.sft_reference is not None:
            tensors.update(prefixed(self.sft_reference[0], "sft_reference_image"))
            tensors.update(prefixed(self.sft_reference[1], "sft_reference_text"))
        return tensors, {"has_sft_reference": self.sft_reference is not None}

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        image_order, text_order = list(self.image_lora), list(self.text_lora)
        image, text = unprefixed(tensors, "image", image_order), unprefixed(tensors, "text", text_order)
        self.backbone.load_image_lora(image)  # checks shapes against the model
        self.backbone.load_text_lora(text)
        self.image_lora, self.text_lora = image, text
        self.sft_reference = None
        if meta["has_sft_reference"]:
            self.sft_reference = (
                unprefixed(tensors, "sft_reference_image", image_order),
                unprefixed(tensors, "sft_reference_text", text_order),
            )
