"""One experiment, start to end: build the federation and the method, run (or resume) the rounds,
and write the run directory. Every engine calls ``run_experiment``; only the ``ClientRunner`` differs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import feddtl
from feddtl.config import ExperimentConfig
from feddtl.federation import Federation, build_federation, check_image_size, refuse_node_local
from feddtl.methods import get_method
from feddtl.methods.base import Method, ServerContext
from feddtl.reporting.plots import plot_partition, plot_run
from feddtl.server.accounting import MemoryMeter, communication_summary, phase_summary
from feddtl.server.checkpoint import CheckpointError, load_checkpoint, remove_checkpoint, restore_checkpoint
from feddtl.server.clients import ClientRunner, InProcessClients
from feddtl.server.faults import FaultyClients
from feddtl.server.loop import evaluate_method, run_rounds
from feddtl.server.robust import update_spec
from feddtl.server.rundir import RunDir, read_results
from feddtl.server.stop import StopRequest

BuildFn = Callable[..., Federation]
"""Builds the federation: called as ``build(config, log_fn=..., run_dir=...)``."""

FINAL_FIELDS = ("base_acc", "novel_acc", "hm", "local_acc", "local_acc_per_client")
NODE_EVAL_FIELDS = ("evaluation", "eval_counts", "eval_missing")
"""Where the final evaluation ran, its counts and the nodes it lacks, when the SuperNodes evaluated (a
``node-local`` run); absent from every other run's results."""
PRIVACY_FIELDS = ("dp_upload_epsilon", "dp_upload_delta", "dp_lora_epsilon", "dp_lora_delta")
"""The (epsilon, delta) spent by the end of the run, per DP channel, when [privacy] turned it on."""


def build_method(fed: Federation) -> Method:
    ctx = ServerContext(
        backbone=fed.backbone, config=fed.config, base_text=fed.base_text, novel_text=fed.novel_text,
        base_names=fed.classes.base_names, novel_names=fed.classes.novel_names,
    )
    return get_method(fed.config.method)(ctx)


def client_runner(fed: Federation, method: Method, remote: ClientRunner | None = None) -> ClientRunner:
    """The runner of the clients: ``remote`` (e.g. Flower SuperNodes) or in-process clients, wrapped in
    the fault harness when ``[faults]`` asks for injected faults (tests and demos)."""
    clients = remote if remote is not None else InProcessClients(fed, method)
    if fed.config.faults.mode == "none":
        return clients
    return FaultyClients(
        clients, fed.config.faults,
        lambda task, k: update_spec(fed, task, k, extra_reference=method.update_extra_reference(task)),
    )


def draw_partition(fed: Federation, out: Path, log_fn: Callable[[str], None] = print) -> Path | None:
    """``partition.png`` in the run folder: the clients x base classes image counts (reads the clients'
    labels, changes nothing). Remote clients (the Flower ServerApp) report only their classes and sizes,
    so there the picture is skipped, with a log line."""
    counts = fed.partition_counts()
    if counts is None:
        log_fn("partition.png not drawn: the clients are remote and report only their classes and image counts")
        return None
    config = fed.config
    held = "full data" if config.shots is None else f"{config.shots} shots"
    title = f"{config.dataset}: {config.partition} partition, {config.num_clients} clients, {held}"
    return plot_partition(counts, fed.classes.base_names, out, title=title)


def run_experiment(
    config: ExperimentConfig,
    out_dir: str | Path,
    progress: bool = True,
    log_fn: Callable[[str], None] = print,
    fed: Federation | None = None,
    resume: bool = False,
    build: BuildFn = build_federation,
    remote_clients: ClientRunner | None = None,
    engine: str = "inprocess",
    stop: StopRequest | None = None,
    record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run one experiment and write its run directory; returns results.json's content.

    ``fed``: an already built federation for this config (the bench reuses one across methods, with
    the backbone's LoRA reset to its initial state); None builds it.
    ``resume``: continue the run in ``out_dir`` from its checkpoint (``config`` must be its config.toml,
    see checkpoint.load_run_config); the metrics rows past the checkpoint are dropped and recomputed. A
    finished run (it has results.json) is left as it is and its results returned, whatever engine wrote it.
    Without ``resume`` the run starts at round 1 and replaces whatever an earlier run left in ``out_dir``.
    ``build``, ``remote_clients``, ``engine``: the Flower ServerApp passes its own federation builder
    (server side only), the runner of its SuperNodes, and its engine's name.
    ``stop``: when requested (the CLI's signal handlers), the run stops after the current round, with a
    checkpoint, and raises RunStopped.
    ``record``: fields added to results.json as they are (the bench records the tuned values a cell runs with).
    """
    started = time.perf_counter()
    meter = MemoryMeter()
    check_image_size(config)  # a config error, before anything is written
    if remote_clients is None:
        refuse_node_local(config)
    if resume and (finished := read_results(out_dir)) is not None:
        log_fn(f"{out_dir} is finished ({finished.get('method')}, {finished.get('rounds')} rounds, engine "
               f"{finished.get('engine')}): nothing to resume, nothing changed")
        return finished
    run = RunDir(out_dir)
    method_class = get_method(config.method)
    checkpoint = None
    if resume:  # everything a resume can refuse is checked before the slow setup: fail fast
        if not method_class.trains:
            log_fn(f"{config.method} trains no rounds: nothing to resume; evaluating {run.path} again")
        else:
            checkpoint = load_checkpoint(run.path, config)
            if checkpoint is not None and not method_class.resumable():
                raise CheckpointError(
                    f"method {config.method!r} cannot resume from a checkpoint; "
                    f"`feddtl run --resume {run.path} --restart` starts it again from round 1"
                )
    if checkpoint is None:
        remove_checkpoint(run.path)
        run.start_fresh()
    run.write_config(config)
    meter.start_phase()
    if fed is None:
        fed = build(config, log_fn=log_fn, run_dir=run.path)
    setup_s = time.perf_counter() - started
    setup_peak = meter.end_phase()
    draw_partition(fed, run.path, log_fn)
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
            log_fn(f"{run.path} stopped before its first round: starting at round 1")
        clients = client_runner(fed, method, remote_clients)
        rows = run_rounds(
            fed, method, clients, run, start_round, rows, meter, progress=progress, log_fn=log_fn, stop=stop
        )
        final = {k: rows[-1][k] for k in FINAL_FIELDS}
        final |= {k: rows[-1][k] for k in NODE_EVAL_FIELDS if k in rows[-1]}
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
        # Marked only when on: a validation number must never pass for a test number, and test-mode
        # results.json stay exactly as they were before eval.on existed.
        **({"eval_on": "validation", "validation_per_class": config.eval.validation_per_class}
           if config.eval.on == "validation" else {}),
        # Marked only when asked for, like eval_on: what the towers ran in (bfloat16 falls back to float32 off
        # CUDA); float32 runs keep results.json as it was before the key existed.
        **({"precision": fed.backbone.precision} if config.precision != "float32" else {}),
        **final,
        **{k: rows[-1][k] for k in PRIVACY_FIELDS if rows and k in rows[-1]},
        **communication_summary(rows, fed.backbone.parameter_bytes()),
        "setup_s": setup_s,
        **phase_summary(rows),
        "rss_peak_setup_mb": setup_peak,
        "peak_rss_mb": meter.run_peak(),
        "cache": fed.cache.summary() if fed.cache is not None else None,
        "time_cache_build_s": fed.cache.build_s if fed.cache is not None else None,
        "wall_s": time.perf_counter() - started,
        "feddtl_version": feddtl.__version__,
        **(record or {}),
    }
    if fed.cache is not None:
        fed.cache.close()  # the disk store (if any) is per run: its files go now
    run.write_results(results)
    run.save_weights(method.state_dict())
    plot_run(run.read_metrics(), run.path, title=f"{config.method} on {config.dataset}")
    return results
