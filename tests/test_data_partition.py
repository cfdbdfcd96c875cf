"""Partitions, base/novel splits, few-shot and per-class caps."""

from __future__ import annotations

import numpy as np
import pytest

from feddtl.data import cap_per_class, few_shot, partition, split_base_novel, stratified_split

# 10 classes x 200 samples, shuffled so nothing relies on labels being grouped.
LABELS = np.random.default_rng(123).permutation(np.repeat(np.arange(10), 200))


def _assert_true_partition(parts: list[np.ndarray], n: int) -> None:
    allidx = np.concatenate(parts)
    assert len(allidx) == n, "some index is missing or duplicated"
    assert np.array_equal(np.sort(allidx), np.arange(n))
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each client's indices must be sorted and unique"


def _label_hist(part: np.ndarray, labels: np.ndarray = LABELS) -> np.ndarray:
    return np.bincount(labels[part], minlength=10) / len(part)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_partition_is_disjoint_and_covering(scheme: str) -> None:
    # prepare / execute
    parts = partition(LABELS, 5, scheme, seed=0, alpha=0.5, classes_per_client=2)
    # assert
    assert len(parts) == 5
    _assert_true_partition(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 1


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "pathological"])
def test_partition_deterministic_and_seed_dependent(scheme: str) -> None:
    # 4 clients x 3 classes over 10 classes: shared classes, so pathological depends on the seed too.
    kwargs = dict(alpha=0.5, classes_per_client=3)
    a = partition(LABELS, 4, scheme, seed=7, **kwargs)
    b = partition(LABELS, 4, scheme, seed=7, **kwargs)
    c = partition(LABELS, 4, scheme, seed=8, **kwargs)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_iid_sizes_and_label_mix() -> None:
    parts = partition(LABELS[:1003], 4, "iid", seed=1)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    global_hist = np.bincount(LABELS[:1003], minlength=10) / 1003
    for p in parts:
        # ~250 samples per client: class fractions within a few points of the global 10 %.
        assert np.abs(_label_hist(p) - global_hist).max() < 0.07


def test_dirichlet_small_alpha_is_skewed() -> None:
    def mean_max_fraction(alpha: float) -> float:
        parts = partition(LABELS, 5, "dirichlet", seed=3, alpha=alpha)
        return float(np.mean([_label_hist(p).max() for p in parts]))

    skewed, flat = mean_max_fraction(0.1), mean_max_fraction(100.0)
    assert flat < 0.15  # near the uniform 0.1
    assert skewed > 0.35
    assert skewed > 2 * flat


def test_dirichlet_respects_min_partition_size() -> None:
    for seed in range(5):
        parts = partition(LABELS, 10, "dirichlet", seed=seed, alpha=0.1, min_partition_size=50)
        assert min(len(p) for p in parts) >= 50
        _assert_true_partition(parts, len(LABELS))


def test_dirichlet_infeasible_floor_raises() -> None:
    # One class of 30 samples, 3 clients, each must get 10: only exact thirds pass, which the
    # near one-hot Dir(0.01) draws never give.
    labels = np.zeros(30, dtype=np.int64)
    with pytest.raises(ValueError, match="attempts"):
        partition(labels, 3, "dirichlet", seed=0, alpha=0.01, min_partition_size=10)


def test_pathological_disjoint_classes_when_exact_cover() -> None:
    parts = partition(LABELS, 5, "pathological", seed=0, classes_per_client=2)
    class_sets = [set(np.unique(LABELS[p]).tolist()) for p in parts]
    assert all(len(s) == 2 for s in class_sets)
    assert set().union(*class_sets) == set(range(10))
    assert sum(len(s) for s in class_sets) == 10  # pairwise disjoint
    # Deterministic assignment: client i holds classes 2i and 2i+1.
    assert class_sets == [{0, 1}, {2, 3}, {4, 5}, {6, 7}, {8, 9}]


def test_pathological_overlap_splits_shared_classes_evenly() -> None:
    parts = partition(LABELS, 4, "pathological", seed=0, classes_per_client=3)
    _assert_true_partition(parts, len(LABELS))
    class_sets = [set(np.unique(LABELS[p]).tolist()) for p in parts]
    assert all(len(s) == 3 for s in class_sets)
    # 12 slots over 10 classes: classes 0 and 1 are shared by clients 0 and 3, 100 samples each.
    for c in (0, 1):
        assert [int(np.sum(LABELS[p] == c)) for p in (parts[0], parts[3])] == [100, 100]


def test_pathological_uses_distinct_labels_present() -> None:
    labels = np.repeat(np.array([3, 7, 11, 20]), 5)
    parts = partition(labels, 2, "pathological", seed=0, classes_per_client=2)
    assert [sorted(set(labels[p].tolist())) for p in parts] == [[3, 7], [11, 20]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_clients=0, scheme="iid"), "num_clients"),
        (dict(num_clients=2, scheme="dirichlet", alpha=0.0), "alpha"),
        (dict(num_clients=2, scheme="shards"), "iid, dirichlet, pathological|'iid', 'dirichlet', 'pathological'"),
        (dict(num_clients=11, scheme="pathological", classes_per_client=1), "more clients than classes"),
        (dict(num_clients=2, scheme="pathological", classes_per_client=11), "classes_per_client"),
        (dict(num_clients=3, scheme="pathological", classes_per_client=2), "cannot cover"),
    ],
)
def test_partition_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        partition(LABELS, seed=0, **kwargs)


def test_split_base_novel_half_and_random() -> None:
    base, novel = split_base_novel(7, "half")
    assert (base, novel) == ([0, 1, 2, 3], [4, 5, 6])
    rb, rn = split_base_novel(10, "random", seed=4)
    assert len(rb) == 5 and not set(rb) & set(rn) and sorted(rb + rn) == list(range(10))
    assert split_base_novel(10, "random", seed=4) == (rb, rn)
    assert any(split_base_novel(10, "random", seed=s)[0] != rb for s in range(5, 10))
    with pytest.raises(ValueError, match="half"):
        split_base_novel(10, "thirds")


def test_few_shot_exactly_k_per_class() -> None:
    pool = np.arange(0, len(LABELS), 3)
    picked = few_shot(LABELS, pool, shots=4, seed=0)
    assert np.all(np.isin(picked, pool)) and np.all(np.diff(picked) > 0)
    assert np.array_equal(np.bincount(LABELS[picked], minlength=10), np.full(10, 4))
    assert np.array_equal(picked, few_shot(LABELS, pool[::-1], shots=4, seed=0))  # order-free
    assert not np.array_equal(picked, few_shot(LABELS, pool, shots=4, seed=1))
    # Nested: a smaller k picks a subset of the larger k's samples (same seed).
    assert set(few_shot(LABELS, pool, 2, 0).tolist()) <= set(picked.tolist())


def test_few_shot_takes_all_of_a_small_class() -> None:
    labels = np.array([0] * 10 + [1] * 2)
    picked = few_shot(labels, np.arange(12), shots=5, seed=0)
    assert np.bincount(labels[picked]).tolist() == [5, 2]


def test_cap_per_class() -> None:
    capped = cap_per_class(LABELS, np.arange(len(LABELS)), cap=30, seed=0)
    assert np.bincount(LABELS[capped], minlength=10).tolist() == [30] * 10
    assert np.array_equal(capped, cap_per_class(LABELS, capped, cap=30, seed=0))  # idempotent
    with pytest.raises(ValueError):
        cap_per_class(LABELS, np.arange(10), cap=0, seed=0)


def test_stratified_split() -> None:
    train, test = stratified_split(LABELS, 0.25, seed=0)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(len(LABELS)))
    assert np.bincount(LABELS[test]).tolist() == [50] * 10
    again, _ = stratified_split(LABELS, 0.25, seed=0)
    other, _ = stratified_split(LABELS, 0.25, seed=1)
    assert np.array_equal(train, again) and not np.array_equal(train, other)
