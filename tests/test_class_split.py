"""The base/novel class split of a run: base_novel = "random" is seeded by base_novel_seed, else by seed."""

from __future__ import annotations

import pytest

from feddtl.config import ConfigError, load_config
from feddtl.data import DatasetSplits, load_dataset, split_base_novel
from feddtl.federation import class_split, client_partition


@pytest.fixture(scope="module")
def digits() -> DatasetSplits:
    config = load_config("tiny")
    return load_dataset(config.dataset, config.data, seed=config.seed)


def _base(digits: DatasetSplits, *overrides: str) -> list[int]:
    return class_split(load_config("tiny", ["base_novel=random", *overrides]), digits).base


def test_a_fixed_base_novel_seed_keeps_the_split_across_run_seeds(digits):
    # execute
    splits = {seed: _base(digits, f"seed={seed}", "base_novel_seed=3") for seed in range(5)}
    # assert: one split for every run seed, although the run seed alone would move it
    assert all(base == splits[0] for base in splits.values())
    assert len({tuple(_base(digits, f"seed={seed}")) for seed in range(5)}) > 1


def test_changing_base_novel_seed_changes_the_split(digits):
    # execute
    splits = {tuple(_base(digits, "seed=0", f"base_novel_seed={s}")) for s in range(5)}
    # assert
    assert len(splits) > 1


def test_default_is_the_run_seed(digits):
    # prepare
    num_classes = len(digits.train.classnames)
    for seed in range(4):
        # execute
        default = _base(digits, f"seed={seed}")
        # assert: None splits exactly as the run seed did before base_novel_seed existed
        assert default == split_base_novel(num_classes, "random", seed=seed)[0]
        assert default == _base(digits, f"seed={seed}", f"base_novel_seed={seed}")


def test_a_flower_client_sees_the_servers_split(digits):
    # prepare: the Flower ClientApp builds its own data through client_partition, the server through class_split
    config = load_config("tiny", ["base_novel=random", "seed=1", "base_novel_seed=7"])
    # execute
    classes, _ = client_partition(config, digits, 0)
    # assert
    assert classes == class_split(config, digits)


@pytest.mark.parametrize("value", ["-1", "-10"])
def test_negative_base_novel_seed_is_rejected(value):
    with pytest.raises(ConfigError, match="base_novel_seed must be >= 0 or none"):
        load_config("tiny", [f"base_novel_seed={value}"])


def test_base_novel_seed_none_is_accepted():
    assert load_config("tiny", ["base_novel_seed=none"]).base_novel_seed is None
