"""In-process simulation: all clients run sequentially in one process, sharing one backbone object.

Each client loads the global state it is sent before training, so sharing the backbone is exactly
equivalent to separate processes (the Flower engine runs the same functions across processes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

import feddtl
from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.algorithm.validation import UpdateSpec
from feddtl.checkpoint import checkpoint_due, load_checkpoint, remove_checkpoint, restore_checkpoint, save_checkpoint
from feddtl.config import ExperimentConfig
from feddtl.evaluation import evaluate
from feddtl.federation import Federation, build_federation
from feddtl.methods import get_method
from feddtl.methods.base import Method, ServerContext
from feddtl.reporting.plots import plot_run
from feddtl.rundir import RunDir
from feddtl.sim.robust import RoundFailed, collect_updates, update_spec
from feddtl.sim.accounting import (
    MemoryMeter,
    communication_summary,
    current_rss_mb,
    peak_rss_mb,
    phase_summary,
    round_communication,
    tensor_bytes,
)

__all__ = ["peak_rss_mb", "run_experiment", "run_rounds", "tensor_bytes"]


def client_seed(seed: int, round_num: int, client_id: int) -> int:
    """Independent, reproducible seed of one client's local round."""
    return int(np.random.SeedSequence([seed, round_num, client_id]).generate_state(1)[0])


def select_clients(config: ExperimentConfig, round_num: int) -> list[int]:
    k = config.num_clients
    m = max(1, int(round(config.client_fraction * k)))
    if m >= k:
        return list(range(k))
    rng = np.random.default_rng([config.seed, round_num, 17])
    return sorted(rng.choice(k, size=m, replace=False).tolist())


def mean_client_metrics(updates: Sequence[ClientUpdate]) -> dict[str, float]:
    keys = sorted({k for u in updates for k in u.metrics})
    return {f"client_{k}": float(np.mean([u.metrics[k] for u in updates if k in u.metrics])) for k in keys}


class ClientRunner(Protocol):
    """Runs client steps elsewhere (the Flower ServerApp: on SuperNodes), behind the same robust round."""

    def dispatch(self, task: ClientTask, clients: list[int], tasks: dict[int, ClientTask] | None = None) -> None:
        """Send ``task`` to ``clients`` and wait for their replies (one attempt of a round); ``tasks``, if
        given, holds the task of each client instead (personalised methods, ``Method.client_task``)."""

    def step(self, task: ClientTask, client_id: int) -> ClientUpdate:
        """Client ``client_id``'s reply to the last dispatch; raises what went wrong there."""


BuildFn = Callable[..., Federation]
"""Builds the federation: called as ``build(config, log_fn=..., run_dir=...)``."""


def build_method(fed: Federation) -> Method:
    ctx = ServerContext(
        backbone=fed.backbone, config=fed.config, base_text=fed.base_text, novel_text=fed.novel_text,
        base_names=fed.classes.base_names, novel_names=fed.classes.novel_names,
    )
    return get_method(fed.config.method)(ctx)


def run_rounds(
    fed: Federation,
    method: Method,
    run: RunDir,
    progress: bool = True,
    log_fn: Callable[[str], None] = print,
    start_round: int = 1,
    rows: list[dict[str, Any]] | None = None,
    meter: MemoryMeter | None = None,
    client_runner: ClientRunner | None = None,
) -> list[dict[str, Any]]:
    """The federated loop from ``start_round`` (after ``rows``, the rows of the rounds before it);
    appends one metrics row per round to the run directory and checkpoints as configured.

    Failing clients and rejected updates are handled by sim.robust; a round with too few answers
    writes a checkpoint of the previous round and raises RoundFailed. Client steps run here, one
    after the other, unless ``client_runner`` runs them elsewhere; the accepted updates are aggregated
    in the order of the selected client ids either way.
    """
    config = fed.config
    meter = meter or MemoryMeter()
    rows = list(rows or [])
    bar = tqdm(total=(config.rounds - start_round + 1) * len(select_clients(config, 1)), disable=not progress,
               desc="client steps", unit="step", leave=False)
    for t in range(start_round, config.rounds + 1):
        row: dict[str, Any] = {"round": t}
        round_start = time.perf_counter()
        task = method.make_task(t)
        row["stage"] = task.stage
        selected = select_clients(config, t)
        # what each client is sent: the round's task, plus its personal state for personalised methods
        tasks = {k: method.client_task(task, k) for k in selected}
        personal = any(tasks[k] is not task for k in selected)
        meter.start_phase()
        start = time.perf_counter()

        def step(k: int, t: int = t, tasks: dict[int, ClientTask] = tasks) -> ClientUpdate:
            bar.set_description(f"round {t}/{config.rounds} [{tasks[k].stage}] client {k}")
            if client_runner is not None:
                return client_runner.step(tasks[k], k)
            return method.client_step(fed.backbone, fed.clients[k], tasks[k], config, client_seed(config.seed, t, k))

        def spec(k: int, tasks: dict[int, ClientTask] = tasks) -> UpdateSpec:
            return update_spec(fed, tasks[k], k, extra_reference=method.update_extra_reference(tasks[k]))

        def dispatch(ks: list[int], task: ClientTask = task, tasks: dict[int, ClientTask] = tasks,
                     personal: bool = personal) -> None:
            assert client_runner is not None
            if personal:
                client_runner.dispatch(task, ks, tasks={k: tasks[k] for k in ks})
            else:
                client_runner.dispatch(task, ks)

        try:
            outcome = collect_updates(
                task, selected, t, step, spec, config, lambda: bar.update(1),
                dispatch=None if client_runner is None else dispatch,
            )
        except RoundFailed:
            bar.close()
            save_checkpoint(run.path, t - 1, method, rows, config)
            raise
        updates = outcome.updates
        row["time_client_s"] = time.perf_counter() - start
        row["rss_peak_client_mb"] = meter.end_phase()
        row["clients"] = selected
        row.update(outcome.metrics())
        # every ask (retries included) downloads the task; every update received, valid or not, was uploaded
        row.update(round_communication(
            task, outcome.received, asks=outcome.asks, sent=[tasks[k] for k in outcome.asked] if personal else None,
        ))
        row.update(mean_client_metrics(updates))
        meter.start_phase()
        start = time.perf_counter()
        row.update(method.server_update(updates, t))
        row["time_server_s"] = time.perf_counter() - start
        row["rss_peak_server_mb"] = meter.end_phase()
        if t % config.eval.every == 0 or t == config.rounds:
            meter.start_phase()
            start = time.perf_counter()
            row.update(evaluate_method(fed, method))
            row["time_eval_s"] = time.perf_counter() - start
            row["rss_peak_eval_mb"] = meter.end_phase()
            log_fn(
                f"round {t:>3}/{config.rounds} [{task.stage}] base {row['base_acc']:.2f}  novel {row['novel_acc']:.2f}  "
                f"hm {row['hm']:.2f}  local {row['local_acc']:.2f}"
            )
        row["time_round_s"] = time.perf_counter() - round_start
        row["rss_mb"] = current_rss_mb()
        row["peak_rss_mb"] = meter.run_peak()
        run.append_metrics(row)
        rows.append(row)
        if checkpoint_due(t, config.rounds, config.checkpoint.every):
            save_checkpoint(run.path, t, method, rows, config)
    bar.close()
    return rows


def evaluate_method(fed: Federation, method: Method) -> dict[str, Any]:
    base_T, novel_T = method.prepare_eval()
    client_T = method.prepare_local_eval()
    return evaluate(fed.backbone, fed.eval_set, base_T, novel_T, fed.config.eval.batch_size, client_base_T=client_T)


def run_experiment(
    config: ExperimentConfig,
    out_dir: str | Path,
    progress: bool = True,
    log_fn: Callable[[str], None] = print,
    fed: Federation | None = None,
    resume: bool = False,
    build: BuildFn = build_federation,
    client_runner: ClientRunner | None = None,
    engine: str = "inprocess",
) -> dict[str, Any]:
    """Run one experiment in process and write its run directory; returns results.json's content.

    ``fed``: an already built federation for this config (the bench reuses one across methods, with
    the backbone's LoRA reset to its initial state); None builds it.
    ``resume``: continue the run in ``out_dir`` from its checkpoint (``config`` must be its config.toml,
    see checkpoint.load_run_config); the metrics rows past the checkpoint are dropped and recomputed.
    ``build``, ``client_runner``, ``engine``: the Flower ServerApp passes its own federation builder
    (server side only), a runner that sends the rounds' tasks to SuperNodes, and its engine's name.
    """
    started = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    meter = MemoryMeter()
    run = RunDir(out_dir)
    checkpoint = load_checkpoint(run.path, config) if resume else None  # before the slow setup: fail fast
    if checkpoint is None:
        remove_checkpoint(run.path)
        run.reset_metrics()
    run.write_config(config)
    meter.start_phase()
    if fed is None:
        fed = build(config, log_fn=log_fn, run_dir=run.path)
    setup_s = time.perf_counter() - started
    setup_peak = meter.end_phase()
    method = build_method(fed)
    rows: list[dict[str, Any]] = []
    if method.trains:
        start_round = 1
        if checkpoint is not None:
            restore_checkpoint(checkpoint, method)
            rows = checkpoint.rows
            run.write_metrics(rows)
            start_round = checkpoint.round + 1
            log_fn(f"resuming {run.path} after round {checkpoint.round} of {config.rounds}")
        elif resume:
            log_fn(f"{run.path} has no checkpoint: starting at round 1")
        rows = run_rounds(
            fed, method, run, progress=progress, log_fn=log_fn, start_round=start_round, rows=rows, meter=meter,
            client_runner=client_runner,
        )
        final = {k: rows[-1][k] for k in ("base_acc", "novel_acc", "hm", "local_acc", "local_acc_per_client")}
        if "per_domain_acc" in rows[-1]:
            final["per_domain_acc"] = rows[-1]["per_domain_acc"]
    else:
        final = evaluate_method(fed, method)
        run.append_metrics({"round": 0, **final})
    results = {
        "method": config.method,
        "engine": engine,
        "dataset": config.dataset,
        "backbone": config.backbone,
        "partition": config.partition,
        "num_clients": config.num_clients,
        "shots": config.shots,
        "rounds": config.rounds if method.trains else 0,
        "seed": config.seed,
        **final,
        **communication_summary(rows, fed.backbone.parameter_bytes()),
        "setup_s": setup_s,
        **phase_summary(rows),
        "rss_peak_setup_mb": setup_peak,
        "peak_rss_mb": meter.run_peak(),
        "cache": fed.cache.summary() if fed.cache is not None else None,
        "time_cache_build_s": fed.cache.build_s if fed.cache is not None else None,
        "wall_s": time.perf_counter() - started,
        "feddtl_version": feddtl.__version__,
    }
    if fed.cache is not None:
        fed.cache.close()  # the disk store (if any) is per run: its files go now
    run.write_results(results)
    run.save_weights(method.state_dict())
    plot_run(run.read_metrics(), run.path, title=f"{config.method} on {config.dataset}")
    return results
