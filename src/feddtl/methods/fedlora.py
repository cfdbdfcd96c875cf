"""FedLoRA: LoRA on both towers trained locally with cross-entropy, FedAvg of all LoRA (no decoupling).

The paper's FedLoRA baseline. Each client loads the global image and text LoRA, computes the class
text embeddings T with its own text tower (with grad, from the base prompts' cached text-trunk
features, ``ClientData.base_text``), trains both LoRAs on its images, and uploads both. The server
averages each by sample count. No embeddings are uploaded and the server trains nothing: every
client pulls the shared text side toward its own classes, which is what decoupling avoids.

``two_stage = True`` (the ``feddtl-twostage`` ablation) swaps the local objective for SFT in
rounds <= M and the GRPO objective after, keeping everything else.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from feddtl.algorithm.aggregation import weighted_average
from feddtl.algorithm.client import ClientData, _all_logits, rl_loop, sft_epochs
from feddtl.algorithm.encoding import text_embeddings
from feddtl.algorithm.grpo import hybrid_reference_logprobs
from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.algorithm.server import class_embeddings
from feddtl.backbones.base import Backbone, TextFeatures
from feddtl.config import ExperimentConfig
from feddtl.methods.base import Method, ServerContext

TEXT_REF_PREFIX = "sft_reference_text."
"""Keys of ``ClientTask.extra`` holding the end-of-SFT text LoRA (two-stage RL reference)."""


def _client_T(backbone: Backbone, data: ClientData) -> TextFeatures:
    if data.base_text is None:
        raise ValueError(
            f"client {data.client_id}: this method trains the text tower on the client and needs "
            "ClientData.base_text (the base prompts' text-trunk features)"
        )
    return data.base_text


def _reference_logprobs(
    backbone: Backbone, data: ClientData, task: ClientTask, base_text: TextFeatures, config: ExperimentConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """pi_old (the received global image + text LoRA) and the hybrid reference, which mixes it with the
    end-of-SFT model (image + text LoRA at round M), each with its own class embeddings."""
    batch = config.client.batch_size
    T_global = class_embeddings(backbone, base_text)
    global_logits = _all_logits(backbone, data, T_global, batch)
    old_logprobs = torch.log_softmax(global_logits, dim=-1)
    sft_logits = global_logits
    if task.sft_reference_lora is not None and config.grpo.ref_mix > 0:
        text_ref = {k[len(TEXT_REF_PREFIX) :]: v for k, v in task.extra.items() if k.startswith(TEXT_REF_PREFIX)}
        backbone.load_image_lora(task.sft_reference_lora)
        backbone.load_text_lora(text_ref)
        sft_logits = _all_logits(backbone, data, class_embeddings(backbone, base_text), batch)
        backbone.load_image_lora(task.image_lora)
        backbone.load_text_lora(task.text_lora)  # type: ignore[arg-type]
    return old_logprobs, hybrid_reference_logprobs(sft_logits, global_logits, config.grpo.ref_mix)


class FedLoRA(Method):
    name = "fedlora"
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
        extra: dict[str, torch.Tensor] = {}
        sft_image = None
        if stage == "rl" and self.sft_reference is not None:
            sft_image = self.sft_reference[0]
            extra = {TEXT_REF_PREFIX + k: v for k, v in self.sft_reference[1].items()}
        return ClientTask(
            round=round_num,
            stage=stage,  # type: ignore[arg-type]
            image_lora=self.image_lora,
            # Clients compute T themselves from the text LoRA; nothing precomputed travels.
            class_embeddings=torch.zeros((0, self.backbone.info.embed_dim)),
            sft_reference_lora=sft_image,
            text_lora=self.text_lora,
            extra=extra,
        )

    @staticmethod
    def client_step(
        backbone: Backbone, data: ClientData, task: ClientTask, config: ExperimentConfig, seed: int
    ) -> ClientUpdate:
        data.require_images()
        if task.text_lora is None:
            raise ValueError("FedLoRA-style tasks must carry the global text LoRA")
        base_text = _client_T(backbone, data)
        generator = torch.Generator().manual_seed(seed)
        backbone.load_image_lora(task.image_lora)
        backbone.load_text_lora(task.text_lora)
        params = backbone.image_lora_parameters() + backbone.text_lora_parameters()

        def text_fn() -> torch.Tensor:
            return text_embeddings(backbone, base_text)

        if task.stage == "sft":
            metrics = sft_epochs(backbone, data, text_fn, params, config.client.sft_epochs, config.client, generator)
        else:
            # The text LoRA gets the RL gradient too: the ablation replaces the local objective of
            # FedLoRA, which trains both towers, and keeps everything else.
            old_lp, ref_lp = _reference_logprobs(backbone, data, task, base_text, config)
            metrics = rl_loop(
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
            text_lora=backbone.text_lora_state(),
        )

    def server_update(self, updates: Sequence[ClientUpdate], round_num: int) -> dict[str, float]:
        weights = [u.num_samples for u in updates]
        self.image_lora = weighted_average([u.image_lora for u in updates], weights)
        if any(u.text_lora is None for u in updates):
            raise ValueError("a FedLoRA client update carries no text LoRA")
        self.text_lora = weighted_average([u.text_lora for u in updates], weights)  # type: ignore[misc]
        if self.two_stage and round_num == self.config.switch_round:
            self.sft_reference = (self.image_lora, self.text_lora)
        return {}

    def prepare_eval(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.backbone.load_image_lora(self.image_lora)
        self.backbone.load_text_lora(self.text_lora)
        return class_embeddings(self.backbone, self.ctx.base_text), class_embeddings(self.backbone, self.ctx.novel_text)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            **{f"image.{k}": v for k, v in self.image_lora.items()},
            **{f"text.{k}": v for k, v in self.text_lora.items()},
        }
