"""The federated round loop, the same for every engine (DESIGN.md, "One round").

Per round: the method makes the task -> the selected clients are asked through a ``ClientRunner``
(in process, or Flower SuperNodes) -> the robust round collects and validates their updates -> the
method aggregates them and runs its server step -> evaluation when due -> the metrics row is logged
and a checkpoint written. Accounting, checkpoints and the run directory are collaborators called here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm import tqdm

from feddtl.algorithm.messages import ClientUpdate
from feddtl.evaluation import evaluate
from feddtl.federation import Federation
from feddtl.methods.base import Method
from feddtl.server.accounting import MemoryMeter, round_communication
from feddtl.server.checkpoint import checkpoint_due, save_checkpoint
from feddtl.server.clients import ClientRunner, select_clients
from feddtl.server.robust import RoundFailed, collect_updates, update_spec
from feddtl.server.rundir import RunDir
from feddtl.server.stop import RunStopped, StopRequest


def mean_client_metrics(updates: Sequence[ClientUpdate]) -> dict[str, float]:
    keys = sorted({k for u in updates for k in u.metrics})
    return {f"client_{k}": float(np.mean([u.metrics[k] for u in updates if k in u.metrics])) for k in keys}


def evaluate_method(fed: Federation, method: Method) -> dict[str, Any]:
    """Base / Novel / HM / Local of the method's current global model (on the SuperNodes' own test images
    when the federation has an evaluator: a ``node-local`` run)."""
    base_T, novel_T = method.prepare_eval()
    client_T = method.prepare_local_eval()
    if fed.evaluator is not None:
        return fed.evaluator(base_T, novel_T, client_T)
    return evaluate(fed.backbone, fed.eval_set, base_T, novel_T, fed.config.eval.batch_size, client_base_T=client_T)


def run_rounds(
    fed: Federation,
    method: Method,
    clients: ClientRunner,
    run: RunDir,
    start_round: int = 1,
    rows: list[dict[str, Any]] | None = None,
    meter: MemoryMeter | None = None,
    progress: bool = True,
    log_fn: Callable[[str], None] = print,
    stop: StopRequest | None = None,
) -> list[dict[str, Any]]:
    """Rounds ``start_round``..T (after ``rows``, the metrics rows of the rounds before); returns all rows.

    A fresh run (``start_round`` 1) first writes a checkpoint of round 0, so a run that has begun its rounds
    always has a state.json (see checkpoint.load_checkpoint). A round with too few valid answers writes a
    checkpoint of the previous round and raises RoundFailed. ``stop``, when requested (a signal), ends the
    run between rounds, with a checkpoint of the last completed one, by raising RunStopped; a request
    during the last round lets the run finish. Accepted updates are aggregated in the order of the
    selected client ids, whatever the engine.
    """
    config = fed.config
    meter = meter or MemoryMeter()
    rows = list(rows or [])
    if start_round == 1:
        save_checkpoint(run.path, 0, method, rows, config)

    def stop_point(done: int) -> None:
        """After round ``done`` (0: none yet) is complete and its row on disk: stop here if asked."""
        if stop is None or not stop.requested or done >= config.rounds:
            return
        bar.close()
        if done >= start_round and not checkpoint_due(done, config.rounds, config.checkpoint.every):
            save_checkpoint(run.path, done, method, rows, config)
        raise RunStopped(done, stop.reason or "stop requested")

    bar = tqdm(total=(config.rounds - start_round + 1) * len(select_clients(config, 1)), disable=not progress,
               desc="client steps", unit="step", leave=False)
    stop_point(start_round - 1)  # a signal during the setup: the checkpoint before start_round is on disk
    for t in range(start_round, config.rounds + 1):
        meter.start_round()
        task = method.make_task(t)
        row: dict[str, Any] = {"round": t, "stage": task.stage}
        bar.set_description(f"round {t}/{config.rounds} [{task.stage}]")
        selected = select_clients(config, t)
        # what each client is sent: the round's task, plus its personal state for personalised methods
        tasks = {k: method.client_task(task, k) for k in selected}

        def spec(k: int) -> Any:
            return update_spec(fed, tasks[k], k, extra_reference=method.update_extra_reference(tasks[k]))

        with meter.phase(row, "client"):
            try:
                outcome = collect_updates(tasks, t, clients, spec, config.robustness, lambda: bar.update(1))
            except RoundFailed:
                bar.close()
                save_checkpoint(run.path, t - 1, method, rows, config)
                raise
        row["clients"] = selected
        row.update(outcome.metrics())
        personal = any(tasks[k] is not task for k in selected)
        # every ask (retries included) downloads a task; every update received, valid or not, was uploaded
        row.update(round_communication(
            task, outcome.received, asks=outcome.asks, sent=[tasks[k] for k in outcome.asked] if personal else None,
        ))
        row.update(mean_client_metrics(outcome.updates))
        with meter.phase(row, "server"):
            row.update(method.server_update(outcome.updates, t))
        if t % config.eval.every == 0 or t == config.rounds:
            with meter.phase(row, "eval"):
                row.update(evaluate_method(fed, method))
            log_fn(
                f"round {t:>3}/{config.rounds} [{task.stage}] base {row['base_acc']:.2f}  novel {row['novel_acc']:.2f}  "
                f"hm {row['hm']:.2f}  local {row['local_acc']:.2f}"
            )
        meter.end_round(row)
        run.append_metrics(row)
        rows.append(row)
        if checkpoint_due(t, config.rounds, config.checkpoint.every):
            save_checkpoint(run.path, t, method, rows, config)
        stop_point(t)
    bar.close()
    return rows
