"""Failure handling of one in-process round: injected faults, client timeouts, validation, retries.

The algorithm sees none of this. Each client call is wrapped (faults injected by ``[faults]``, an
optional wall-clock limit); each update that arrives is screened by ``algorithm.validation`` before
it may reach ``Method.server_update``. A round completes with the clients that answered if they are
at least ``robustness.min_fit_fraction`` of those selected; otherwise the failed clients are asked
again (``robustness.max_round_retries``) and, if still too few, ``RoundFailed`` stops the run.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

import numpy as np
import torch

from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.algorithm.validation import UpdateSpec, update_norm, validate_update
from feddtl.config import ExperimentConfig
from feddtl.federation import Federation
from feddtl.config.faults_config import FaultConfig, FaultMode

# Fault modes that corrupt a finished update (the others make the client fail to answer).
CORRUPTIONS = tuple(m for m in get_args(FaultMode) if m not in ("none", "raise", "timeout", "slow", "drop"))


class RoundFailed(RuntimeError):
    """Too few clients answered a round, even after the retries; the run stops (resumably)."""

    def __init__(self, round_num: int, message: str) -> None:
        super().__init__(message)
        self.round = round_num


class InjectedFault(RuntimeError):
    """The exception a client raises under faults.mode = "raise"."""


@dataclass
class RoundOutcome:
    """What came back from one round's clients."""

    updates: list[ClientUpdate]
    """Accepted updates, in the order of the selected clients: what the server aggregates."""
    received: list[ClientUpdate] = field(default_factory=list)
    """Every update that arrived, accepted or rejected (what crossed the wire)."""
    failed: list[dict[str, Any]] = field(default_factory=list)
    """Clients that raised, timed out or sent nothing: {client, attempt, reason}."""
    rejected: list[dict[str, Any]] = field(default_factory=list)
    """Updates excluded by validation: {client, attempt, reason}."""
    retries: int = 0
    asks: int = 0
    """Client calls made, retries included (each one was sent the task)."""
    asked: list[int] = field(default_factory=list)
    """The client of every call made, in order (``asks`` entries): whose task each download was."""
    norms: list[float] = field(default_factory=list)
    """Update norms of the accepted updates."""

    def metrics(self) -> dict[str, Any]:
        """The metrics-row entries of this round (failure lists only when something failed)."""
        row: dict[str, Any] = {"accepted": [u.client_id for u in self.updates]}
        if self.failed:
            row["failed"] = self.failed
        if self.rejected:
            row["rejected"] = self.rejected
        if self.retries:
            row["retries"] = self.retries
        if self.norms:
            row["update_norm_max"] = max(self.norms)
        return row


# ----- injected faults ----------------------------------------------------------------------------


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


def corrupt_update(update: ClientUpdate, mode: str, spec: UpdateSpec) -> ClientUpdate:
    """A copy of ``update`` broken in the way ``mode`` names (the originals are not modified).

    The weight corruptions (nan_lora, bad_shape, bad_keys, huge_norm) hit the image LoRA, or the
    method-specific ``extra`` tensors for methods that upload no image LoRA (PromptFL, FedPGP).
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
    else:
        raise ValueError(f"unknown corruption {mode!r}; allowed: {', '.join(CORRUPTIONS)}")
    return dataclasses.replace(update, **changes)


# ----- one client call ----------------------------------------------------------------------------


def _with_faults(
    step: Callable[[], ClientUpdate], mode: str | None, spec: UpdateSpec, release: threading.Event, delay_s: float
) -> Callable[[], ClientUpdate | None]:
    def run() -> ClientUpdate | None:
        if mode == "raise":
            raise InjectedFault("injected fault (faults.mode = raise)")
        if mode == "timeout":
            release.wait(delay_s)  # a hung client: released when the caller gives up on it
            return None
        if mode == "drop":
            return None
        if mode == "slow":
            time.sleep(delay_s)  # a slow but working client: its step is awaited even past a timeout
        update = step()
        return corrupt_update(update, mode, spec) if mode in CORRUPTIONS else update

    return run


def call_client(
    fn: Callable[[], ClientUpdate | None], timeout_s: float | None, release: threading.Event | None = None
) -> tuple[ClientUpdate | None, str | None]:
    """Run one client call: (update, None) or (None, why it failed).

    With a timeout the call runs in a thread. Clients share one backbone in process, so a call that
    overruns is reported as timed out but still awaited before returning (Python cannot kill it);
    ``release`` is set first, which ends an injected hang at once.
    """
    if timeout_s is None:
        try:
            update = fn()
        except Exception as exc:  # a failing client must not stop the server
            return None, f"raised {type(exc).__name__}: {exc}"
        return (update, None) if update is not None else (None, "no reply")
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["update"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the calling thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="feddtl-client", daemon=True)
    thread.start()
    thread.join(timeout_s)
    timed_out = thread.is_alive()
    if timed_out:
        if release is not None:
            release.set()
        thread.join()
        return None, f"timed out after {timeout_s:g} s (robustness.client_timeout_s)"
    error = box.get("error")
    if error is not None:
        if not isinstance(error, Exception):
            raise error
        return None, f"raised {type(error).__name__}: {error}"
    if box.get("update") is None:
        return None, "no reply"
    return box["update"], None


# ----- the round ----------------------------------------------------------------------------------


def collect_updates(
    task: ClientTask,
    selected: Sequence[int],
    round_num: int,
    step: Callable[[int], ClientUpdate],
    spec: Callable[[int], UpdateSpec],
    config: ExperimentConfig,
    on_client_done: Callable[[], None] = lambda: None,
    dispatch: Callable[[list[int]], None] | None = None,
) -> RoundOutcome:
    """Ask the selected clients for their updates, with faults, timeouts, validation and retries.

    ``step(k)`` runs client k's local round; ``spec(k)`` says what the server expects from it;
    ``config``'s robustness and faults sections are read. ``dispatch(clients)``, if given, is called at
    the start of every attempt with the clients asked in it: remote engines (Flower) send them the task
    at once there, and ``step(k)`` then hands back client k's reply.
    """
    rob, faults = config.robustness, config.faults
    need = rob.min_answers(len(selected))
    out = RoundOutcome(updates=[])
    accepted: dict[int, ClientUpdate] = {}
    pending = list(selected)
    attempt = 0
    while True:
        if dispatch is not None:
            dispatch(list(pending))
        for k in pending:
            mode = faults.mode if fault_hits(faults, round_num, k, attempt) else None
            expected = spec(k)
            release = threading.Event()
            fn = _with_faults(lambda k=k: step(k), mode, expected, release, faults.delay_s)
            update, reason = call_client(fn, rob.client_timeout_s, release)
            if update is None:
                out.failed.append({"client": k, "attempt": attempt, "reason": reason})
            else:
                out.received.append(update)
                reason = validate_update(update, expected) if rob.validate_updates else None
                if reason is None:
                    accepted[k] = update
                else:
                    out.rejected.append({"client": k, "attempt": attempt, "reason": reason})
            out.asks += 1
            out.asked.append(k)
            on_client_done()
        if len(accepted) >= need:
            break
        if attempt >= rob.max_round_retries:
            problems = "; ".join(f"client {e['client']}: {e['reason']}" for e in out.failed + out.rejected)
            raise RoundFailed(
                round_num,
                f"round {round_num}: {len(accepted)} of {len(selected)} clients answered with a valid update, "
                f"{need} needed (robustness.min_fit_fraction = {rob.min_fit_fraction}), after "
                f"{attempt} retr{'y' if attempt == 1 else 'ies'} ({problems})",
            )
        attempt += 1
        pending = [k for k in selected if k not in accepted]
    out.retries = attempt
    out.updates = [accepted[k] for k in selected if k in accepted]
    if rob.validate_updates:  # shapes are known to match only after validation
        out.norms = [update_norm(u.image_lora, task.image_lora) for u in out.updates]
    return out


def update_spec(
    fed: Federation, task: ClientTask, client_id: int, extra_reference: dict[str, torch.Tensor] | None = None
) -> UpdateSpec:
    """What the in-process server expects from client ``client_id`` this round (``task``: what it was sent;
    ``extra_reference``: ``Method.update_extra_reference`` of that task)."""
    config = fed.config
    cap = 1 if config.client.upload == "prototypes" else config.client.upload_cap_per_class
    return UpdateSpec(
        reference=task.image_lora,
        embed_dim=fed.backbone.info.embed_dim,
        num_classes=len(fed.classes.base),
        client_classes=fed.eval_set.client_classes[client_id],
        cap_per_class=cap,
        max_norm=config.robustness.max_update_norm,
        client_id=client_id,
        max_samples=len(fed.clients[client_id]) if fed.clients else (
            fed.client_sizes[client_id] if fed.client_sizes is not None else None  # remote clients (Flower)
        ),
        text_reference=task.text_lora,
        extra_reference=extra_reference,
    )
