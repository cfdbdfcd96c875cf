"""The partition as a run sees it: the `min_partition_size` key (flwr-datasets' guard, default 1 = the behaviour
before the key) and the partition picture each run draws (partition.png)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from feddtl.config import ConfigError, load_config
from feddtl.data import load_dataset, partition
from feddtl.federation import class_split, client_indices
from feddtl.reporting.plots import plot_partition
from feddtl.server.experiment import draw_partition


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", load_config("tiny").data, seed=0)


def test_default_min_partition_size_keeps_the_partitions(digits) -> None:
    # prepare: Dirichlet over the base classes, as federation.client_indices draws it
    config = load_config("tiny", ["partition=dirichlet", "alpha=0.1", "num_clients=5", "shots=none"])
    labels = digits.train.labels
    pool = np.flatnonzero(np.isin(labels, class_split(config, digits).base))
    # execute
    with_key = client_indices(config, digits, class_split(config, digits))
    before = partition(labels[pool], 5, "dirichlet", seed=config.seed, alpha=0.1)  # the call before the key
    # assert
    assert config.min_partition_size == 1
    assert all(np.array_equal(a, pool[b]) for a, b in zip(with_key, before))


def test_min_partition_size_redraws_dirichlet_until_every_client_has_enough(digits) -> None:
    config = load_config("tiny", ["partition=dirichlet", "alpha=0.1", "num_clients=5", "shots=none"])
    floor = load_config("tiny", ["partition=dirichlet", "alpha=0.1", "num_clients=5", "shots=none",
                                 "min_partition_size=60"])
    plain = client_indices(config, digits, class_split(config, digits))
    guarded = client_indices(floor, digits, class_split(floor, digits))
    assert min(len(p) for p in plain) < 60 <= min(len(p) for p in guarded)


def test_infeasible_min_partition_size_is_a_config_error(digits) -> None:
    config = load_config("tiny", ["partition=dirichlet", "num_clients=5", "min_partition_size=1000"])
    with pytest.raises(ConfigError, match="at least 1000 samples"):
        client_indices(config, digits, class_split(config, digits))


def test_min_partition_size_below_one_is_rejected() -> None:
    with pytest.raises(ConfigError, match="min_partition_size must be >= 1"):
        load_config("tiny", ["min_partition_size=0"])


def test_plot_partition_writes_a_png(tmp_path: Path) -> None:
    counts = np.array([[8, 8, 0], [0, 3, 5]])
    path = plot_partition(counts, ["cat", "dog", "pull over"], tmp_path, title="t")
    assert path == tmp_path / "partition.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="3 classes"):
        plot_partition(counts[:, :2], ["cat", "dog", "pull over"], tmp_path)


def test_remote_clients_skip_the_picture_with_a_line(tmp_path: Path) -> None:
    # prepare: the Flower ServerApp's federation holds no client data
    fed = SimpleNamespace(partition_counts=lambda: None)
    lines: list[str] = []
    # execute
    drawn = draw_partition(fed, tmp_path, lines.append)  # type: ignore[arg-type]
    # assert
    assert drawn is None and not (tmp_path / "partition.png").exists()
    assert lines and "partition.png not drawn" in lines[0]
