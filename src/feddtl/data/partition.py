"""Class splits and client partitions: base/novel halves, IID / Dirichlet / pathological label
skew, few-shot and per-class caps. Every function is deterministic given its seed."""

from __future__ import annotations

import math

import numpy as np

PARTITION_SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "pathological")
BASE_NOVEL_MODES: tuple[str, ...] = ("half", "random")

# Dirichlet draws that leave a client below min_partition_size are redrawn; past this many
# attempts the settings are almost surely infeasible, so we stop with an error instead of looping.
MAX_DIRICHLET_ATTEMPTS = 100


def _as_labels(labels: np.ndarray) -> np.ndarray:
    """Check `labels` is a 1-D integer array and return it as int64."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _as_indices(indices: np.ndarray, n: int) -> np.ndarray:
    """Check `indices` is a 1-D integer array of positions into an array of length n."""
    arr = np.asarray(indices, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= n):
        raise ValueError(f"indices must lie in [0, {n}), got range [{arr.min()}, {arr.max()}]")
    return arr


def split_base_novel(num_classes: int, mode: str = "half", seed: int = 0) -> tuple[list[int], list[int]]:
    """Split class ids 0..C-1 into (base, novel), both sorted; base gets ceil(C/2) classes.

    "half": the first ceil(C/2) classes are base (CoOp convention); "random": a seeded random half.
    """
    if num_classes < 2:
        raise ValueError(f"base/novel split needs at least 2 classes, got {num_classes}")
    n_base = math.ceil(num_classes / 2)
    if mode == "half":
        base = list(range(n_base))
    elif mode == "random":
        perm = np.random.default_rng(seed).permutation(num_classes)
        base = sorted(int(c) for c in perm[:n_base])
    else:
        raise ValueError(f"base/novel mode must be one of {list(BASE_NOVEL_MODES)}, got {mode!r}")
    base_set = set(base)
    novel = [c for c in range(num_classes) if c not in base_set]
    return base, novel


def _iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    # array_split of a permutation: sizes differ by at most one.
    return list(np.array_split(rng.permutation(n), num_clients))


def _dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, min_partition_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    classes = np.unique(labels)
    for _ in range(MAX_DIRICHLET_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            props = rng.dirichlet(np.full(num_clients, alpha))
            if not np.all(np.isfinite(props)):
                # Very small alpha can underflow to 0/0 in the gamma draws; treat it as one client
                # taking the whole class, which is the limit the draw was approaching.
                props = np.zeros(num_clients)
                props[rng.integers(num_clients)] = 1.0
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        out = [np.concatenate(p) if p else np.empty(0, np.int64) for p in parts]
        if min(len(p) for p in out) >= min_partition_size:
            return out
    raise ValueError(
        f"dirichlet partition: no draw in {MAX_DIRICHLET_ATTEMPTS} attempts gave every one of "
        f"{num_clients} clients at least {min_partition_size} samples (alpha={alpha}, "
        f"{len(labels)} samples); raise alpha, lower num_clients or "
        f"min_partition_size"
    )


def _pathological_classes(num_classes: int, num_clients: int, classes_per_client: int) -> list[list[int]]:
    """Positions (into the sorted distinct classes) held by each client.

    Client i holds positions (i * classes_per_client + j) mod C, j < classes_per_client: disjoint
    blocks when num_clients * classes_per_client == C, wrapping around (some classes shared)
    when it is larger.
    """
    return [
        [(i * classes_per_client + j) % num_classes for j in range(classes_per_client)]
        for i in range(num_clients)
    ]


def _pathological(
    labels: np.ndarray, num_clients: int, classes_per_client: int, rng: np.random.Generator
) -> list[np.ndarray]:
    classes = np.unique(labels)
    n_classes = len(classes)
    if classes_per_client < 1:
        raise ValueError(f"classes_per_client must be >= 1, got {classes_per_client}")
    if classes_per_client > n_classes:
        raise ValueError(
            f"classes_per_client={classes_per_client} exceeds the {n_classes} classes present"
        )
    if num_clients > n_classes:
        raise ValueError(
            f"num_clients={num_clients}: more clients than classes ({n_classes}) in "
            f"pathological mode; use fewer clients or the dirichlet / iid scheme"
        )
    if num_clients * classes_per_client < n_classes:
        # Otherwise some classes would belong to nobody and the result would not be a partition.
        raise ValueError(
            f"pathological partition: {num_clients} clients x {classes_per_client} classes each "
            f"cannot cover the {n_classes} classes present; set classes_per_client >= "
            f"{math.ceil(n_classes / num_clients)}"
        )
    held = _pathological_classes(n_classes, num_clients, classes_per_client)
    holders: dict[int, list[int]] = {p: [] for p in range(n_classes)}
    for client, positions in enumerate(held):
        for p in positions:
            holders[p].append(client)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
    for p, c in enumerate(classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        for client, chunk in zip(holders[p], np.array_split(idx, len(holders[p]))):
            parts[client].append(chunk)
    return [np.concatenate(p) for p in parts]


def partition(
    labels: np.ndarray,
    num_clients: int,
    scheme: str,
    seed: int,
    alpha: float = 0.1,
    classes_per_client: int = 2,
    min_partition_size: int = 1,
) -> list[np.ndarray]:
    """Partition sample positions among clients; returns one sorted int64 index array per client.

    Every index of `labels` lands in exactly one client, and every client gets at least
    `min_partition_size` samples (a ValueError otherwise).
    - "iid": seeded shuffle, near-equal split (sizes differ by at most 1);
    - "dirichlet": per class, client proportions ~ Dir(alpha), redrawn until the size floor holds;
    - "pathological": client i holds the sorted distinct classes at positions
      (i * classes_per_client + j) mod C; each class is split evenly among its holders.
    """
    labels = _as_labels(labels)
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"partition.scheme must be one of {list(PARTITION_SCHEMES)}, got {scheme!r}")
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)) or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if min_partition_size < 0:
        raise ValueError(f"min_partition_size must be >= 0, got {min_partition_size}")
    if num_clients * min_partition_size > len(labels):
        raise ValueError(
            f"cannot give {num_clients} clients at least {min_partition_size} samples each from "
            f"{len(labels)} samples"
        )
    rng = np.random.default_rng(seed)
    if scheme == "iid":
        parts = _iid(len(labels), num_clients, rng)
    elif scheme == "dirichlet":
        parts = _dirichlet(labels, num_clients, alpha, min_partition_size, rng)
    else:
        parts = _pathological(labels, num_clients, classes_per_client, rng)
    parts = [np.sort(p).astype(np.int64) for p in parts]
    smallest = min(len(p) for p in parts)
    if smallest < min_partition_size:
        raise ValueError(
            f"{scheme} partition left a client with {smallest} samples, below "
            f"min_partition_size={min_partition_size}"
        )
    return parts


def cap_per_class(labels: np.ndarray, indices: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Seeded subsample of at most `cap` of `indices` per class; sorted int64.

    The choice does not depend on the order of `indices`, and for a fixed seed a smaller cap
    picks a subset of what a larger cap picks (nested few-shot sets).
    """
    labels = _as_labels(labels)
    indices = _as_indices(indices, len(labels))
    if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 1:
        raise ValueError(f"cap must be an integer >= 1, got {cap!r}")
    rng = np.random.default_rng(seed)
    indices = np.unique(indices)  # sorted, so the draw does not depend on the caller's order
    sub_labels = labels[indices]
    chosen: list[np.ndarray] = []
    for c in np.unique(sub_labels):
        idx = indices[sub_labels == c]
        # A full permutation whatever the cap keeps the random stream identical across caps.
        chosen.append(idx[rng.permutation(len(idx))[:cap]])
    return _sorted_concat(chosen)


def few_shot(labels: np.ndarray, indices: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """k = `shots` samples per class among `indices` (all of a class with fewer), sorted."""
    if isinstance(shots, bool) or not isinstance(shots, (int, np.integer)) or shots < 1:
        raise ValueError(f"shots must be an integer >= 1, got {shots!r}")
    return cap_per_class(labels, indices, shots, seed)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split into sorted (train, test) index arrays.

    Each class sends round(n_c * test_fraction) samples to test, clipped so a class with at
    least two samples keeps one on each side; a single-sample class stays in train.
    """
    labels = _as_labels(labels)
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = min(max(int(round(len(idx) * test_fraction)), 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return _sorted_concat(train), _sorted_concat(test)


def holdout_per_class(
    labels: np.ndarray, per_class: int, seed: int, groups: np.ndarray | None = None
) -> np.ndarray:
    """Seeded hold-out of `per_class` samples of every class (sorted positions into `labels`).

    With `groups` (e.g. each sample's domain), a class's quota is spread evenly over the groups that hold
    it (the lower group ids get the remainder), so every (class, group) cell is represented. A cell may
    give at most half of its samples: the rest must stay for training. Raises ValueError naming the class
    (and group) that is too small.
    """
    labels = _as_labels(labels)
    if isinstance(per_class, bool) or not isinstance(per_class, (int, np.integer)) or per_class < 1:
        raise ValueError(f"per_class must be an integer >= 1, got {per_class!r}")
    groups = np.zeros(len(labels), np.int64) if groups is None else np.asarray(groups, dtype=np.int64).reshape(-1)
    if len(groups) != len(labels):
        raise ValueError(f"{len(groups)} group ids but {len(labels)} labels")
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    for c in np.unique(labels):
        in_class = labels == c
        cells = np.unique(groups[in_class])
        quota, extra = divmod(per_class, len(cells))
        for i, g in enumerate(cells):
            idx = np.flatnonzero(in_class & (groups == g))
            take = quota + (i < extra)
            if take > len(idx) // 2:
                where = f"class {int(c)}" + (f", group {int(g)}" if len(cells) > 1 else "")
                raise ValueError(
                    f"{where} has {len(idx)} training samples; holding out {take} would leave fewer than half "
                    f"for training (at most {len(idx) // 2})"
                )
            # A full permutation whatever the quota: the stream does not depend on it.
            chosen.append(idx[rng.permutation(len(idx))[:take]])
    return _sorted_concat(chosen)


def _sorted_concat(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate index chunks into one sorted int64 array (empty if there are none)."""
    if not parts:
        return np.empty(0, np.int64)
    return np.sort(np.concatenate(parts)).astype(np.int64)
