"""The robust round: ask the selected clients, validate what comes back, retry, or stop.

The algorithm sees none of this. Each client call may have a wall-clock limit; each update that
arrives is screened by ``algorithm.validation`` before it may reach ``Method.server_update``. A round
completes with the clients that answered if they are at least ``robustness.min_fit_fraction`` of those
selected; otherwise the failed clients are asked again (``robustness.max_round_retries``) and, if still
too few, ``RoundFailed`` stops the run. Engine-neutral: clients run behind a ``ClientRunner``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.algorithm.validation import UpdateSpec, update_norm, validate_update
from feddtl.config.robustness_config import RobustnessConfig
from feddtl.federation import Federation
from feddtl.server.clients import ClientRunner


class RoundFailed(RuntimeError):
    """Too few clients answered a round, even after the retries; the run stops (resumably)."""

    def __init__(self, round_num: int, message: str) -> None:
        super().__init__(message)
        self.round = round_num


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


def call_client(
    fn: Callable[[], ClientUpdate | None], timeout_s: float | None, on_timeout: Callable[[], None] = lambda: None
) -> tuple[ClientUpdate | None, str | None]:
    """Run one client call: (update, None) or (None, why it failed).

    With a timeout the call runs in a thread. Clients share one backbone in process, so a call that
    overruns is reported as timed out but still awaited before returning (Python cannot kill it);
    ``on_timeout`` runs first (``ClientRunner.cancel``: a runner that can abandon the call does so there).
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
        on_timeout()
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


def collect_updates(
    tasks: dict[int, ClientTask],
    round_num: int,
    clients: ClientRunner,
    spec: Callable[[int], UpdateSpec],
    robustness: RobustnessConfig,
    on_client_done: Callable[[], None] = lambda: None,
) -> RoundOutcome:
    """Ask the selected clients (``tasks``: each one's task, in client order) for their updates, with
    timeouts, validation and retries. ``spec(k)`` says what the server expects from client k.

    Every attempt first dispatches the task to the clients asked in it (remote engines send them all at
    once there), then takes their replies one by one in client order.
    """
    rob = robustness
    selected = list(tasks)
    need = rob.min_answers(len(selected))
    out = RoundOutcome(updates=[])
    accepted: dict[int, ClientUpdate] = {}
    pending = list(selected)
    attempt = 0
    while True:
        clients.dispatch({k: tasks[k] for k in pending})
        for k in pending:
            expected = spec(k)
            update, reason = call_client(
                lambda k=k: clients.step(tasks[k], k), rob.client_timeout_s, on_timeout=lambda k=k: clients.cancel(k)
            )
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
        out.norms = [update_norm(accepted[k].image_lora, tasks[k].image_lora) for k in selected if k in accepted]
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
        extra_reference=extra_reference,
    )
