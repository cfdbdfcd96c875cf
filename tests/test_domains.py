"""Feature shift on digits: the digits-domains dataset, domain partitions, per-domain accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from feddtl.data import DataConfig, load_dataset
from feddtl.data.domains import DIGIT_DOMAINS, domain_partition
from feddtl.evaluation import per_domain_accuracy


@pytest.fixture(scope="module")
def splits():
    return load_dataset("digits-domains", DataConfig(), seed=0)


def test_every_domain_has_all_ten_digits_in_train_and_test(splits):
    for ds in (splits.train, splits.test):
        assert ds.domain_names == list(DIGIT_DOMAINS)
        for d in range(len(DIGIT_DOMAINS)):
            assert set(ds.labels[ds.domains == d].tolist()) == set(range(10))
    assert splits.train.load_images([0])[0].size == (28, 28)


def test_domains_differ_in_style(splits):
    # mean grey level: white-on-black MNIST is dark, the inverted copy is bright, the coloured one in between
    def mean_level(name):
        d = DIGIT_DOMAINS.index(name)
        idx = np.flatnonzero(splits.train.domains == d)[:200]
        return np.mean([np.asarray(im).mean() for im in splits.train.load_images(idx)])

    assert mean_level("mnist") < 60 < 180 < mean_level("mnist-inverted")
    assert 60 < mean_level("mnist-colour") < 200


def test_mnist_shards_are_disjoint(splits):
    ds = splits.train
    plain = {ds.load_images([i])[0].tobytes() for i in np.flatnonzero(ds.domains == DIGIT_DOMAINS.index("mnist"))}
    inverted = ds.subset(np.flatnonzero(ds.domains == DIGIT_DOMAINS.index("mnist-inverted")))
    restored = {(255 - np.asarray(im)).astype(np.uint8).tobytes() for im in inverted.load_images(range(len(inverted)))}
    assert not plain & restored


def test_the_dataset_is_the_same_whatever_the_seed():
    a = load_dataset("digits-domains", DataConfig(), seed=0)
    b = load_dataset("digits-domains", DataConfig(), seed=5)
    assert len(a.train) + len(a.test) == len(b.train) + len(b.test)
    assert np.array_equal(np.bincount(a.train.domains), np.bincount(b.train.domains))


def test_domain_partition_gives_whole_domains_to_clients():
    domains = np.repeat(np.arange(4), 10)
    labels = np.tile(np.arange(5), 8)
    parts = domain_partition(labels, domains, 4, 4, "domain", seed=0)
    assert [set(domains[p].tolist()) for p in parts] == [{0}, {1}, {2}, {3}]
    parts = domain_partition(labels, domains, 4, 2, "domain", seed=0)
    assert [set(domains[p].tolist()) for p in parts] == [{0, 2}, {1, 3}]
    with pytest.raises(ValueError, match="domain-dirichlet"):
        domain_partition(labels, domains, 4, 5, "domain", seed=0)


def test_domain_dirichlet_splits_each_domain_among_its_clients():
    rng = np.random.default_rng(0)
    domains = np.repeat(np.arange(3), 200)
    labels = rng.integers(0, 5, 600)
    parts = domain_partition(labels, domains, 3, 6, "domain-dirichlet", seed=0, alpha=0.1)
    assert sorted(np.concatenate(parts).tolist()) == list(range(600))  # a partition
    for k, p in enumerate(parts):
        assert set(domains[p].tolist()) == {k % 3} and len(p) > 0
    with pytest.raises(ValueError, match="at least one client per domain"):
        domain_partition(labels, domains, 3, 2, "domain-dirichlet", seed=0)


def test_per_domain_accuracy_counts_each_domain_separately():
    base_logits = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    base_labels = torch.tensor([0, 1, 1, 0])
    base_domains = torch.tensor([0, 0, 1, 1])
    novel_logits = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    novel_labels = torch.tensor([0, 0])
    novel_domains = torch.tensor([0, 1])
    out = per_domain_accuracy(base_logits, base_labels, base_domains, novel_logits, novel_labels, novel_domains, ["a", "b"])
    assert out["a"]["base"] == pytest.approx(50.0) and out["a"]["novel"] == pytest.approx(100.0)
    assert out["b"]["base"] == pytest.approx(100.0) and out["b"]["novel"] == pytest.approx(0.0)
    assert out["a"]["hm"] == pytest.approx(2 * 50 * 100 / 150) and out["b"]["hm"] == 0.0


def test_imagefolder_domains_reads_one_folder_per_domain(tmp_path):
    from PIL import Image

    for domain, value in (("clipart", 30), ("photo", 200)):
        for cls in ("cat", "dog"):
            folder = tmp_path / domain / cls
            folder.mkdir(parents=True)
            for i in range(5):
                Image.new("RGB", (8, 8), (value, i, 0)).save(folder / f"{i}.png")
    splits = load_dataset(f"imagefolder-domains:{tmp_path}", DataConfig(test_fraction=0.2), seed=0)
    assert splits.train.domain_names == ["clipart", "photo"] and splits.classnames == ["cat", "dog"]
    assert len(splits.train) == 16 and len(splits.test) == 4
    assert np.bincount(splits.test.domains).tolist() == [2, 2]
    red = [np.asarray(im)[0, 0, 0] for im in splits.train.load_images(range(len(splits.train)))]
    assert [30 if d == 0 else 200 for d in splits.train.domains] == red
