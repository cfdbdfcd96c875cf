"""The fault harness: a ``ClientRunner`` wrapper that makes clients fail as ``[faults]`` says.

For tests and demos only, and opt-in: ``run_experiment`` wraps its client runner in ``FaultyClients``
when ``faults.mode`` is not "none"; the production round (``server.robust``) knows nothing of it and
sees only what a real client could send: an exception, no reply, a hang, or a malformed update.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any, get_args

import numpy as np
import torch

from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.algorithm.validation import UpdateSpec
from feddtl.config.faults_config import FaultConfig, FaultMode
from feddtl.server.clients import ClientRunner

# Fault modes that corrupt a finished update (the others make the client fail to answer).
CORRUPTIONS = tuple(m for m in get_args(FaultMode) if m not in ("none", "raise", "timeout", "slow", "drop"))


class InjectedFault(RuntimeError):
    """The exception a client raises under faults.mode = "raise"."""


def fault_hits(faults: FaultConfig, round_num: int, client_id: int, attempt: int) -> bool:
    """Whether the fault strikes this client in this attempt of this round (stateless, seeded)."""
    if faults.mode == "none":
        return False
    if faults.clients is not None and client_id not in faults.clients:
        return False
    if faults.rounds is not None and round_num not in faults.rounds:
        return False
    if faults.attempts is not None and attempt >= faults.attempts:
        return False
    if faults.probability >= 1:
        return True
    return bool(np.random.default_rng([faults.seed, round_num, client_id, attempt]).random() < faults.probability)


BOUND_MARGIN = 0.99
"""An attack shrunk to the norm bound lands at this fraction of it: inside, whatever the float rounding."""


def attacked_weights(update: ClientUpdate, spec: UpdateSpec, factor: float) -> dict[str, Any]:
    """The weights of ``update`` moved to reference + ``factor`` x (uploaded - reference), as replacements
    for its ``image_lora`` and ``extra``; ``factor`` is shrunk so the update stays inside ``spec.max_norm``.

    The change is taken against what the client was sent (``spec.reference`` and, for methods with their
    own tensors, ``spec.extra_reference``): the same quantity validation bounds, so the attack passes it.
    """
    parts = [("image_lora", update.image_lora, spec.reference)]
    if spec.extra_reference is not None:
        parts.append(("extra", update.extra, spec.extra_reference))
    deltas = {
        name: {k: state[k].detach().to(torch.float64) - ref[k].detach().to(torch.float64) for k in ref}
        for name, state, ref in parts
    }
    norm = float(sum(d.square().sum() for delta in deltas.values() for d in delta.values()) ** 0.5)
    if spec.max_norm is not None and norm * abs(factor) > BOUND_MARGIN * spec.max_norm:
        factor = math.copysign(BOUND_MARGIN * spec.max_norm / norm, factor)
    return {
        name: {**state, **{k: (ref[k].to(torch.float64) + factor * deltas[name][k]).to(ref[k].dtype) for k in ref}}
        for name, state, ref in parts
    }


def flipped_labels(labels: torch.Tensor) -> torch.Tensor:
    """``labels`` with each of its classes renamed to the next one it holds (cyclically): every label is
    wrong, yet still a class of the client, within the per-class cap, so validation cannot tell."""
    classes = labels.unique()  # sorted
    if len(classes) < 2:  # one class (or none): no wrong label of its own to give
        return labels.clone()
    return classes[(torch.searchsorted(classes, labels) + 1) % len(classes)]


def corrupt_update(update: ClientUpdate, mode: str, spec: UpdateSpec, attack_scale: float = 10.0) -> ClientUpdate:
    """A copy of ``update`` broken in the way ``mode`` names (the originals are not modified).

    The weight corruptions (nan_lora, bad_shape, bad_keys, huge_norm) hit the image LoRA, or the
    method-specific ``extra`` tensors for methods that upload no image LoRA (PromptFL, FedPGP); the weight
    attacks (sign_flip, scaled, collude) move both by ``attack_scale`` (see ``attacked_weights``). One
    update alone cannot collude: "collude" here is the sign flip that ``FaultyClients`` hands every
    colluder of the round.
    """
    weights = "image_lora" if update.image_lora else "extra"
    lora = dict(getattr(update, weights))
    first = next(iter(lora))
    emb, labels = update.embeddings.clone(), update.labels.clone()
    changes: dict[str, Any] = {}
    if mode == "nan_lora":
        t = lora[first].clone()
        t.view(-1)[0] = float("nan")
        changes[weights] = {**lora, first: t}
    elif mode == "inf_embeddings":
        emb[0, 0] = float("inf")
        changes["embeddings"] = emb
    elif mode == "bad_shape":
        changes[weights] = {**lora, first: torch.cat([lora[first], lora[first][:1]])}
    elif mode == "bad_keys":
        lora[first + ".evil"] = lora.pop(first)
        changes[weights] = lora
    elif mode == "huge_norm":
        changes[weights] = {k: v * 1e6 for k, v in lora.items()}
    elif mode == "bad_embed_dim":
        changes["embeddings"] = emb[:, :-1].contiguous()
    elif mode == "bad_labels":
        held = set(spec.client_classes or [])
        labels[0] = next((c for c in range(spec.num_classes) if c not in held), spec.num_classes)
        changes["labels"] = labels
    elif mode == "too_many_embeddings":
        cap = spec.cap_per_class if spec.cap_per_class is not None else update.num_samples
        extra = cap + 1 - int((labels == labels[0]).sum())
        changes["embeddings"] = torch.cat([emb, emb[:1].expand(extra, -1)])
        changes["labels"] = torch.cat([labels, labels[:1].expand(extra)])
    elif mode == "unnormalised":
        changes["embeddings"] = emb * 3
    elif mode == "bad_num_samples":
        changes["num_samples"] = 10**9
    elif mode == "wrong_client_id":
        changes["client_id"] = update.client_id + 1000
    elif mode in ("sign_flip", "collude"):
        changes.update(attacked_weights(update, spec, -attack_scale))
    elif mode == "scaled":
        changes.update(attacked_weights(update, spec, attack_scale))
    elif mode == "label_flip":
        changes["labels"] = flipped_labels(labels)
    else:
        raise ValueError(f"unknown corruption {mode!r}; allowed: {', '.join(CORRUPTIONS)}")
    return dataclasses.replace(update, **changes)


class FaultyClients:
    """``inner`` with the faults of ``faults`` injected around each client call.

    Whether a call is hit is drawn statelessly per (round, client, attempt), so a run with faults is as
    reproducible as one without; the attempt is counted here, per round and client. ``spec(task, k)``
    is what the server expects from client k for ``task`` (the corruptions that depend on it, e.g. a
    label the client does not hold, read it).
    """

    def __init__(
        self, inner: ClientRunner, faults: FaultConfig, spec: Callable[[ClientTask, int], UpdateSpec]
    ) -> None:
        self.inner = inner
        self.faults = faults
        self.spec = spec
        self._attempts: defaultdict[tuple[int, int], int] = defaultdict(int)
        self._release: dict[int, threading.Event] = {}
        self._collusion: dict[int, ClientUpdate] = {}
        """Per round, the first colluder's attacked update: the weights every later colluder sends."""

    def dispatch(self, tasks: dict[int, ClientTask]) -> None:
        # One fresh release per call of this attempt, made before any call starts, so a cancel can never
        # miss a hang that has not begun waiting yet.
        self._release = {k: threading.Event() for k in tasks}
        self.inner.dispatch(tasks)

    def step(self, task: ClientTask, client_id: int) -> ClientUpdate | None:
        attempt = self._attempts[(task.round, client_id)]
        self._attempts[(task.round, client_id)] += 1
        if not fault_hits(self.faults, task.round, client_id, attempt):
            return self.inner.step(task, client_id)
        mode = self.faults.mode
        if mode == "raise":
            raise InjectedFault("injected fault (faults.mode = raise)")
        if mode == "timeout":
            self._release[client_id].wait(self.faults.delay_s)  # a hung client: released when the server gives up
            return None
        if mode == "drop":
            return None
        if mode == "slow":
            time.sleep(self.faults.delay_s)  # a slow but working client: its step is awaited even past a timeout
        update = self.inner.step(task, client_id)
        if update is None or mode not in CORRUPTIONS:
            return update
        if mode == "collude" and task.round in self._collusion:
            # the same malicious weights as the round's first colluder; its own id, count and embeddings
            lead = self._collusion[task.round]
            return dataclasses.replace(update, image_lora=dict(lead.image_lora), extra=dict(lead.extra))
        attacked = corrupt_update(update, mode, self.spec(task, client_id), self.faults.attack_scale)
        if mode == "collude":
            self._collusion[task.round] = attacked
        return attacked

    def cancel(self, client_id: int) -> None:
        if client_id in self._release:
            self._release[client_id].set()
        self.inner.cancel(client_id)
