"""`feddtl run --engine flower-sim`: one config through Flower's Simulation Engine (Ray backend).

The same ServerApp loop (``serve``) and the same ClientApp as a deployment; one virtual SuperNode per
client, whose node_config the engine sets (partition-id, num-partitions = num_clients).

The virtual nodes share one node cache: the folder $FEDDTL_NODE_CACHE_DIR names, else a temporary folder
removed at the end (so a simulation leaves nothing behind, and its actors build the backbone's bridge once).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from feddtl.config import ExperimentConfig
from feddtl.config.node_cache_config import DIR_ENV


def run_flower_simulation(
    config: ExperimentConfig, out_dir: str | Path, log_fn: Callable[[str], None] = print
) -> dict[str, Any]:
    """Run ``config`` on the Simulation Engine and write ``out_dir``; returns results.json's content."""
    from feddtl.federation import refuse_node_local

    refuse_node_local(config)  # its virtual SuperNodes cannot each name data of their own
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from feddtl.flower.client_app import app as client_app
    from feddtl.flower.server_app import serve

    results: dict[str, Any] = {}
    server_app = ServerApp()
    temporary = None
    if not os.environ.get(DIR_ENV):  # Ray's workers inherit this process's environment
        temporary = tempfile.mkdtemp(prefix="feddtl-node-cache-")
        os.environ[DIR_ENV] = temporary

    @server_app.main()
    def _main(grid: Grid, context: Any) -> None:
        results.update(serve(grid, config, str(out_dir), engine="flower-sim", log_fn=log_fn))

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # run_simulation is marked deprecated in favour of `flwr run`
            run_simulation(
                server_app=server_app,
                client_app=client_app,
                num_supernodes=config.num_clients,
                backend_config={
                    "client_resources": {"num_cpus": config.flower.sim_client_cpus, "num_gpus": 0.0},
                    "init_args": {"logging_level": logging.WARNING, "log_to_driver": True},
                },
            )
    finally:
        if temporary is not None:
            del os.environ[DIR_ENV]
            shutil.rmtree(temporary, ignore_errors=True)
    if not results:
        raise RuntimeError("the Flower simulation ended without results; see the log above")
    return results
