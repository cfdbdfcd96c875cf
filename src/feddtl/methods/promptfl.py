"""PromptFL: CoOp-style learnable context vectors in the text tower's input, trained locally, FedAvg.

Every class prompt is "[V_1] ... [V_n] {class}." where the V_i are shared learnable word-embedding
vectors, initialised from the token embeddings of ``prompt.ctx_init`` ("a photo of a"), so round 0
is the zero-shot model. Only the context vectors train (both towers' weights and LoRA stay as
shipped); the server averages them by sample count. The text tower runs whole (trunk and tail) from
the input embeddings, with grad to the context.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from feddtl.algorithm.client import ClientData
from feddtl.config.client_config import ClientConfig
from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.backbones.base import Backbone
from feddtl.config import ExperimentConfig
from feddtl.methods.base import Method, ServerContext
from feddtl.methods.state import matching
from feddtl.methods.text_side import text_sft_epochs


def prompt_tokens(backbone: Backbone, ctx_init: str, classnames: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Tokens of "<ctx_init> {class}." per class, and the initial context (n_ctx, H).

    The context occupies token positions 1..n_ctx (after the begin-of-text token) in every prompt;
    this is checked, so a tokenizer that merges across the boundary fails loudly.
    """
    init = backbone.tokenize([ctx_init])
    n_ctx = int(init["attention_mask"][0].sum()) - 2  # minus begin- and end-of-text tokens
    if n_ctx < 1:
        raise ValueError(f"prompt.ctx_init={ctx_init!r} tokenizes to no words")
    ctx_ids = init["input_ids"][0, 1 : 1 + n_ctx]
    tokens = backbone.tokenize([f"{ctx_init} {name}." for name in classnames])
    if not torch.equal(tokens["input_ids"][:, 1 : 1 + n_ctx], ctx_ids.expand(len(classnames), -1)):
        raise ValueError(f"prompts do not start with the tokens of prompt.ctx_init={ctx_init!r}")
    device = next(backbone.parameters()).device
    with torch.no_grad():
        context = backbone.text_token_embeddings(ctx_ids.unsqueeze(0).to(device))[0].detach().cpu().clone()
    return tokens, context


def prompt_text_embeddings(backbone: Backbone, context: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2-normalised class embeddings (C, D) with the context vectors spliced in (with grad to them)."""
    device = next(backbone.parameters()).device
    tokens = {k: v.to(device) for k, v in tokens.items()}
    embeds = backbone.text_token_embeddings(tokens["input_ids"])
    n_ctx, c = context.shape[0], embeds.shape[0]
    ctx = context.to(device=device, dtype=embeds.dtype).unsqueeze(0).expand(c, -1, -1)
    embeds = torch.cat([embeds[:, :1], ctx, embeds[:, 1 + n_ctx :]], dim=1)
    return F.normalize(backbone.text_from_token_embeddings(embeds, tokens), dim=-1)


def class_prompts(
    backbone: Backbone, ctx: ServerContext, method: str, ctx_init: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """(base tokens, novel tokens, initial context) for a prompt-learning method's server."""
    if ctx.base_names is None or ctx.novel_names is None:
        raise ValueError(f"{method} needs the class names in ServerContext (base_names, novel_names)")
    base_tokens, context = prompt_tokens(backbone, ctx_init, ctx.base_names)
    novel_tokens, _ = prompt_tokens(backbone, ctx_init, ctx.novel_names)
    return base_tokens, novel_tokens, context


def prompt_task(round_num: int, backbone: Backbone, tokens: dict[str, torch.Tensor], **context: torch.Tensor) -> ClientTask:
    """A round's task that sends only prompt tensors (and the base prompts' tokens) in ``extra``."""
    return ClientTask(
        round=round_num,
        stage="sft",
        image_lora={},  # the image tower stays as shipped: nothing to send
        class_embeddings=torch.zeros((0, backbone.info.embed_dim)),
        extra={**context, **{f"tokens.{k}": v for k, v in tokens.items()}},
    )


def task_tokens(task: ClientTask) -> dict[str, torch.Tensor]:
    """The base prompts' tokens a ``prompt_task`` carries."""
    return {k[len("tokens.") :]: v for k, v in task.extra.items() if k.startswith("tokens.")}


def prompt_client_config(config: ExperimentConfig) -> ClientConfig:
    """``config.client`` with ``prompt.lr`` in place of ``client.lr`` when it is set."""
    if config.prompt.lr is None:
        return config.client
    return dataclasses.replace(config.client, lr=config.prompt.lr)


def prompt_update(backbone: Backbone, data: ClientData, metrics: dict[str, float], extra: dict[str, torch.Tensor]) -> ClientUpdate:
    """A client's update that carries only prompt tensors (no LoRA, no embeddings)."""
    return ClientUpdate(
        client_id=data.client_id,
        num_samples=len(data),
        image_lora={},
        embeddings=torch.zeros((0, backbone.info.embed_dim)),
        labels=torch.zeros(0, dtype=torch.long),
        metrics=metrics,
        extra=extra,
    )


@torch.no_grad()
def prompt_eval(
    backbone: Backbone, context: torch.Tensor, base_tokens: dict[str, torch.Tensor], novel_tokens: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Base and novel class embeddings with the given context, on the CPU."""
    return (
        prompt_text_embeddings(backbone, context, base_tokens).cpu(),
        prompt_text_embeddings(backbone, context, novel_tokens).cpu(),
    )


class PromptFL(Method):
    name = "promptfl"

    def __init__(self, ctx: ServerContext) -> None:
        super().__init__(ctx)
        self.base_tokens, self.novel_tokens, self.context = class_prompts(
            self.backbone, ctx, self.name, self.config.prompt.ctx_init
        )

    def make_task(self, round_num: int) -> ClientTask:
        return prompt_task(round_num, self.backbone, self.base_tokens, context=self.context)

    @staticmethod
    def client_step(
        backbone: Backbone, data: ClientData, task: ClientTask, config: ExperimentConfig, seed: int
    ) -> ClientUpdate:
        data.require_images()
        if "context" not in task.extra:
            raise ValueError("a PromptFL task must carry the context vectors in extra['context']")
        generator = torch.Generator().manual_seed(seed)
        tokens = task_tokens(task)
        context = nn.Parameter(task.extra["context"].clone().to(next(backbone.parameters()).device))
        client = prompt_client_config(config)
        metrics = text_sft_epochs(
            backbone, data, lambda: prompt_text_embeddings(backbone, context, tokens), [context],
            client.sft_epochs, client, generator,
        )
        return prompt_update(backbone, data, metrics, {"context": context.detach().cpu().clone()})

    def update_extra_reference(self, task: ClientTask) -> dict[str, torch.Tensor]:
        return {"context": task.extra["context"]}  # an update must carry a finite context of the sent shape

    def server_update(self, updates: Sequence[ClientUpdate], round_num: int) -> dict[str, Any]:
        state, metrics = self.aggregate(updates, [{"context": u.extra["context"]} for u in updates])
        if state is not None:  # None: too few updates for the robust rule; the global context stays
            self.context = state["context"]
        return metrics

    def prepare_eval(self) -> tuple[torch.Tensor, torch.Tensor]:
        return prompt_eval(self.backbone, self.context, self.base_tokens, self.novel_tokens)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"prompt.context": self.context}

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        # The context vectors are the whole server state: no optimiser, no generator, no LoRA.
        return self.state_dict(), {}

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.context = matching(tensors, self.state_dict(), "promptfl")["prompt.context"]
