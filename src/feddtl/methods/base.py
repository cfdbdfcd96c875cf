"""What a federated method is: the server side (state, tasks, aggregation) and a client step.

The in-process simulator and the Flower app drive any method through this interface, so a method
is one file plus one registry entry.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from feddtl.algorithm.client import ClientData
from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.backbones.base import Backbone, TextFeatures
from feddtl.config import ExperimentConfig
from feddtl.methods.robust_aggregation import State, aggregate_states


@dataclass
class ServerContext:
    """What a method's server side gets: the backbone and the class prompts' text-trunk features."""

    backbone: Backbone
    config: ExperimentConfig
    base_text: TextFeatures
    """Cached text-trunk features of the base-class prompts."""
    novel_text: TextFeatures
    """Cached text-trunk features of the novel-class prompts."""
    base_names: list[str] | None = None
    """Base class names (public), for methods that build their own prompts (PromptFL)."""
    novel_names: list[str] | None = None
    """Novel class names (public)."""


class Method(abc.ABC):
    """Server-side state of one method; ``client_step`` is the code that runs on each client."""

    name: str = ""
    trains: bool = True
    """False for methods evaluated as shipped (zero-shot): no rounds run."""
    client_text: bool = False
    """True: clients run the text tower on the base prompts themselves, so every engine hands their
    ``client_step`` a ``text_side.TextClientData`` with the prompts' text-trunk features (FedLoRA, FedPGP)."""
    client_image_only: bool = False
    """True: ``client_step`` runs only the image tower (image tail, image LoRA) against the task's class
    embeddings, so a Flower node may build the backbone without its text tower (the lite backbone then
    needs no transformers import). False (the safe default): the client gets the whole backbone."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx
        self.backbone = ctx.backbone
        self.config = ctx.config

    @abc.abstractmethod
    def make_task(self, round_num: int) -> ClientTask:
        """What the server sends to every selected client at the start of round ``round_num``."""

    @staticmethod
    @abc.abstractmethod
    def client_step(
        backbone: Backbone, data: ClientData, task: ClientTask, config: ExperimentConfig, seed: int
    ) -> ClientUpdate:
        """One local round on one client. Static: it must not touch server state (it runs remotely on Flower)."""

    @abc.abstractmethod
    def server_update(self, updates: Sequence[ClientUpdate], round_num: int) -> dict[str, Any]:
        """Aggregate a round's updates into the global state; returns server metrics (metrics-row entries)."""

    def aggregate(self, updates: Sequence[ClientUpdate], states: Sequence[State]) -> tuple[State | None, dict[str, Any]]:
        """``states`` (one per update, the tensors the method shares) combined by ``server.aggregation``:
        (aggregate, or None when the round is below the robust rule's bound and the global stays; metrics)."""
        return aggregate_states(
            states, [u.num_samples for u in updates], [u.client_id for u in updates], self.config.server
        )

    @abc.abstractmethod
    def prepare_eval(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Load the global model into the backbone; return (base, novel) class text embeddings."""

    def client_task(self, task: ClientTask, client_id: int) -> ClientTask:
        """The task client ``client_id`` is sent: ``task`` (the round's ``make_task``) with that client's
        personal state added, for methods that keep per-client state on the server (clients are stateless
        between rounds). The default sends every client the same task."""
        return task

    def update_extra_reference(self, task: ClientTask) -> dict[str, torch.Tensor] | None:
        """The tensors a valid update to ``task`` (a ``client_task``) carries in ``ClientUpdate.extra``, with
        the values the client was sent: validation checks the update's names, shapes, dtypes and finiteness
        against them, and its distance to them counts in the update norm. None (default): not checked."""
        return None

    def prepare_local_eval(self) -> list[torch.Tensor] | None:
        """Per client, the base-class text embeddings (C_base, D) its Local accuracy uses (personalised
        methods); None (default): Local accuracy uses ``prepare_eval``'s shared base embeddings."""
        return None

    @classmethod
    def resumable(cls) -> bool:
        """Whether a checkpoint of this method can be loaded (it implements ``load_checkpoint_state``).
        A class-level question, so ``--resume`` can refuse a method before the federation is built."""
        return cls.load_checkpoint_state is not Method.load_checkpoint_state

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Global tensors worth saving (final weights, checkpoints)."""
        return {}

    def checkpoint_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Everything the server side needs to continue after the current round: tensors (weights,
        optimiser moments, generator states; saved as safetensors) and JSON-able metadata.

        A resumed run must continue exactly as the uninterrupted one would. The default saves the
        ``state_dict`` only, which is enough to keep the weights but not to resume.
        """
        return self.state_dict(), {}

    def load_checkpoint_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        """Restore what ``checkpoint_state`` returned, into a freshly built method. Methods that train
        must implement it (``resumable``): a stopped run is refused otherwise, before the slow build."""
        raise NotImplementedError(
            f"method {self.name!r} cannot resume from a checkpoint (it does not implement load_checkpoint_state)"
        )
