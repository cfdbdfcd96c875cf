"""One bench job: the cells of one (scenario, seed), run in one process that builds the federation once.

Run as ``python -m feddtl.bench.worker JOB.json``; the JSON lists ``{"run_dir", "config"}`` entries
(config as TOML text), each with an optional ``"record"`` of fields for its results.json. Cells whose
federation key matches the previous cell's reuse its federation: the backbone's LoRA and the global RNG
are reset to their state right after the build, so each run is the same as a standalone ``feddtl run``
of its config (a test checks this).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from feddtl.bench.suite import federation_key
from feddtl.config import ExperimentConfig, load_config


def _config_from_text(text: str) -> ExperimentConfig:
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
        name = f.name
    try:
        return load_config(name)
    finally:
        os.unlink(name)


def run_cells(
    cells: list[tuple[ExperimentConfig, Path]], log_fn: Callable[[str], None] = print,
    records: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Run ``(config, run_dir)`` cells in order, sharing the federation between consecutive equal keys.

    ``records``: per cell, fields added to its results.json (tuned values, a sweep's configuration).
    A failing cell is logged and skipped (its run directory gets no results.json); returns the
    results of the cells that finished.
    """
    from feddtl.federation import build_federation
    from feddtl.server.experiment import run_experiment

    fed = None
    key = None
    snapshot: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor] | None = None
    done = []
    for i, (config, run_dir) in enumerate(cells):
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            if fed is None or federation_key(config) != key:
                fed = build_federation(config, log_fn=log_fn)
                key = federation_key(config)
                snapshot = (fed.backbone.image_lora_state(), fed.backbone.text_lora_state(), torch.get_rng_state())
                log_fn(
                    f"federation built in {time.perf_counter() - started:.1f} s "
                    f"({time.process_time() - cpu_started:.1f} s CPU)"
                )
            else:
                assert snapshot is not None
                fed.backbone.load_image_lora(snapshot[0])
                fed.backbone.load_text_lora(snapshot[1])
                torch.set_rng_state(snapshot[2])
            results = run_experiment(
                config, run_dir, progress=False, log_fn=log_fn, fed=dataclasses.replace(fed, config=config),
                record=records[i] if records else None,
            )
        except Exception:  # one bad cell must not stop the others; the log keeps the traceback
            log_fn(f"FAILED {run_dir}:\n{traceback.format_exc()}")
            fed = None  # the backbone may be in any state now: rebuild for the next cell
            continue
        log_fn(
            f"done {run_dir}: Base {results['base_acc']:.2f} Novel {results['novel_acc']:.2f} "
            f"HM {results['hm']:.2f} [{time.perf_counter() - started:.0f} s, "
            f"{time.process_time() - cpu_started:.0f} s CPU]"
        )
        done.append(results)
    return done


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m feddtl.bench.worker JOB.json", file=sys.stderr)
        return 2
    threads = int(os.environ.get("FEDDTL_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    job = json.loads(Path(argv[0]).read_text())
    cells = [(_config_from_text(c["config"]), Path(c["run_dir"])) for c in job["cells"]]
    records = [c.get("record", {}) for c in job["cells"]]
    done = run_cells(cells, log_fn=lambda s: print(s, flush=True), records=records)
    return 0 if len(done) == len(cells) else 1


if __name__ == "__main__":
    raise SystemExit(main())
