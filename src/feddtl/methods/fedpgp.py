"""FedPGP: a global soft prompt plus a personal low-rank adaptation per client, with a contrastive pull
back toward the hand-crafted prompt ("Harmonizing Generalization and Personalization in Federated Prompt
Learning", ICML 2024, as its public code does it).

Client i's context is sigma + U_i V_i: sigma (n_ctx x H) is the global context, initialised from the
token embeddings of ``prompt.ctx_init`` and averaged by sample count (as PromptFL); U_i (n_ctx x r) and
V_i (r x H) are client i's own, drawn from N(0, 0.02^2) with a generator seeded from the run seed and
the client id, and never aggregated. Locally, sigma, U_i and V_i train together (Adam, ``prompt.lr`` or
``client.lr``) on the cross-entropy of the personal prompt's logits plus lambda times a contrastive
loss: per class, anchor = the sigma-only prompt's text embedding, positive = the hand-crafted prompt's
(the backbone's zero-shot embedding, no grad), negative = the personal prompt's; logits [cos(a, p),
cos(a, n)] / tau, cross-entropy with target 0, averaged over the classes.

Clients are stateless between rounds (a Flower SuperNode may start a fresh process per message), so
the server keeps every client's (U_i, V_i) and sends them only to that client (``client_task``).
Base and Novel accuracy use the global sigma (the shared model; novel classes never had personal
training); Local accuracy uses each client's personal prompt on its own classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from feddtl.algorithm.client import ClientData
from feddtl.algorithm.encoding import text_embeddings
from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.backbones.base import Backbone
from feddtl.config import ExperimentConfig
from feddtl.methods.base import Method, ServerContext
from feddtl.methods.state import matching
from feddtl.methods.text_side import client_base_text, text_sft_epochs
from feddtl.methods.promptfl import (
    class_prompts,
    prompt_client_config,
    prompt_eval,
    prompt_task,
    prompt_text_embeddings,
    prompt_update,
    task_tokens,
)

INIT_STD = 0.02
"""Standard deviation of the personal factors' initialisation (reference code: nn.init.normal_, std 0.02)."""
_INIT_STREAM = 0x9F3D
"""Keeps the personal-initialisation seeds apart from the run's other seeded streams."""
PERSONAL_KEYS = ("sigma", "U", "V")
"""The tensors a client trains and uploads in ``ClientUpdate.extra``."""


def personal_init(seed: int, client_id: int, n_ctx: int, rank: int, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Client ``client_id``'s initial (U, V), N(0, 0.02^2), the same for the same seed and id."""
    state = int(np.random.SeedSequence([seed, client_id, _INIT_STREAM]).generate_state(1)[0])
    generator = torch.Generator().manual_seed(state)
    u = torch.randn(n_ctx, rank, generator=generator) * INIT_STD
    v = torch.randn(rank, hidden, generator=generator) * INIT_STD
    return u, v


def personal_context(sigma: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sigma + U V, the context of a client's personal prompt (n_ctx, H)."""
    return sigma + u @ v


def contrastive_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mean over classes c of CE([cos(a_c, p_c), cos(a_c, n_c)] / tau, target 0): the sigma-only prompt
    (anchor) is pulled toward the hand-crafted prompt (positive) and away from the personal one (negative).
    Per class this is log(1 + exp((cos(a, n) - cos(a, p)) / tau))."""
    pos = F.cosine_similarity(anchor, positive, dim=-1, eps=1e-7)
    neg = F.cosine_similarity(anchor, negative, dim=-1, eps=1e-7)
    logits = torch.stack([pos, neg], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


class FedPGP(Method):
    name = "fedpgp"
    client_text = True

    def __init__(self, ctx: ServerContext) -> None:
        super().__init__(ctx)
        self.base_tokens, self.novel_tokens, self.sigma = class_prompts(
            self.backbone, ctx, self.name, self.config.prompt.ctx_init
        )
        n_ctx, hidden = self.sigma.shape
        rank = self.config.fedpgp.rank
        self.personal = [personal_init(self.config.seed, k, n_ctx, rank, hidden) for k in range(self.config.num_clients)]
        """Per client id: its (U, V), kept here between rounds and sent only to that client."""

    def make_task(self, round_num: int) -> ClientTask:
        # clients compute the hand-crafted prompts' embeddings themselves (from TextClientData.base_text)
        return prompt_task(round_num, self.backbone, self.base_tokens, sigma=self.sigma)

    def client_task(self, task: ClientTask, client_id: int) -> ClientTask:
        u, v = self.personal[client_id]
        return dataclasses.replace(task, extra={**task.extra, "U": u, "V": v})

    def update_extra_reference(self, task: ClientTask) -> dict[str, torch.Tensor]:
        return {k: task.extra[k] for k in PERSONAL_KEYS}

    @staticmethod
    def client_step(
        backbone: Backbone, data: ClientData, task: ClientTask, config: ExperimentConfig, seed: int
    ) -> ClientUpdate:
        data.require_images()
        missing = [k for k in PERSONAL_KEYS if k not in task.extra]
        if missing:
            raise ValueError(f"a FedPGP task must carry sigma and the client's own U, V in extra; missing {missing}")
        base_text = client_base_text(data, "fedpgp")  # the hand-crafted prompts, for the contrastive loss
        generator = torch.Generator().manual_seed(seed)
        device = next(backbone.parameters()).device
        tokens = task_tokens(task)
        sigma, u, v = (nn.Parameter(task.extra[k].clone().to(device)) for k in PERSONAL_KEYS)
        with torch.no_grad():
            handcrafted = text_embeddings(backbone, base_text)
        pgp = config.fedpgp

        def contrastive(personal_T: torch.Tensor) -> torch.Tensor:
            anchor = prompt_text_embeddings(backbone, sigma, tokens)
            return pgp.contrastive_weight * contrastive_loss(anchor, handcrafted, personal_T, pgp.temperature)

        client = prompt_client_config(config)
        metrics = text_sft_epochs(
            backbone, data, lambda: prompt_text_embeddings(backbone, personal_context(sigma, u, v), tokens),
            [sigma, u, v], client.sft_epochs, client, generator,
            extra_loss=contrastive if pgp.contrastive_weight > 0 else None,
        )
        return prompt_update(
            backbone, data, metrics, {k: p.detach().cpu().clone() for k, p in zip(PERSONAL_KEYS, (sigma, u, v))}
        )

    def server_update(self, updates: Sequence[ClientUpdate], round_num: int) -> dict[str, Any]:
        for update in updates:
            if not 0 <= update.client_id < len(self.personal):
                raise ValueError(f"update from client id {update.client_id}, outside 0..{len(self.personal) - 1}")
        # the shared sigma goes through server.aggregation; U, V are personal and never aggregated
        state, metrics = self.aggregate(updates, [{"sigma": u.extra["sigma"]} for u in updates])
        if state is not None:  # None: too few updates for the robust rule; the global sigma stays
            self.sigma = state["sigma"]
        for update in updates:  # personal: each client's own, never averaged
            self.personal[update.client_id] = (update.extra["U"], update.extra["V"])
        return metrics

    def prepare_eval(self) -> tuple[torch.Tensor, torch.Tensor]:
        return prompt_eval(self.backbone, self.sigma, self.base_tokens, self.novel_tokens)

    @torch.no_grad()
    def prepare_local_eval(self) -> list[torch.Tensor]:
        return [
            prompt_text_embeddings(self.backbone, personal_context(self.sigma, u, v), self.base_tokens).cpu()
            for u, v in self.personal
        ]

    def state_dict(self) -> dict[str, torch.Tensor]:
        tensors = {"prompt.sigma": self.sigma}
        for k, (u, v) in enumerate(self.personal):
            tensors[f"prompt.U.{k}"], tensors[f"prompt.V.{k}"] = u, v
        return tensors

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        # Everything the next round reads: sigma and every client's (U, V); clients keep no state and
        # the server has no optimiser or generator of its own.
        return self.state_dict(), {}

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        saved = matching(tensors, self.state_dict(), "fedpgp")
        self.sigma = saved["prompt.sigma"]
        self.personal = [(saved[f"prompt.U.{k}"], saved[f"prompt.V.{k}"]) for k in range(len(self.personal))]
