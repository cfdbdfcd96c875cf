"""The dataset types every loader returns: images + labels + class names, and train/test splits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
from PIL import Image

from feddtl.config.data_config import DataConfig

from .partition import cap_per_class

# Shared by the digit datasets (digits, mnist5k, digits-domains).
DIGIT_CLASSNAMES: list[str] = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

class DatasetError(ValueError):
    """A dataset cannot be found or read; the message says what to do about it."""


class ImageSource(Protocol):
    """Images decoded on demand, addressed by row (e.g. the image column of a Hugging Face dataset)."""

    def load(self, rows: np.ndarray) -> list[Image.Image]:
        """The images at ``rows``, in that order (any PIL mode; raise DatasetError if one cannot be read)."""
        ...


class ImageDataset:
    """Images (in memory, lazily loaded from files, or decoded on demand from an ImageSource) + int64
    labels + class names."""

    def __init__(
        self,
        labels: np.ndarray,
        classnames: Sequence[str],
        *,
        images: np.ndarray | None = None,
        paths: Sequence[str] | None = None,
        source: ImageSource | None = None,
        rows: np.ndarray | Sequence[int] | None = None,
        domains: np.ndarray | None = None,
        domain_names: Sequence[str] | None = None,
    ) -> None:
        """Give exactly one of `images` (uint8, (N, H, W) grey or (N, H, W, 3) RGB), `paths`, or `source`
        with `rows` (sample i is ``source``'s row ``rows[i]``; nothing is decoded until `load_images`).

        `domains` (optional, with `domain_names`): each sample's domain id, for feature-shift data."""
        if sum(x is not None for x in (images, paths, source)) != 1:
            raise ValueError("ImageDataset needs exactly one of images=, paths= or source=")
        if (source is None) != (rows is None):
            raise ValueError("ImageDataset needs rows= with source=, and only with it")
        self.labels: np.ndarray = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.classnames: list[str] = list(classnames)
        self.domains: np.ndarray | None = None
        self.domain_names: list[str] | None = None
        if (domains is None) != (domain_names is None):
            raise ValueError("ImageDataset needs both domains= and domain_names=, or neither")
        if domains is not None:
            self.domains = np.asarray(domains, dtype=np.int64).reshape(-1)
            self.domain_names = list(domain_names)  # type: ignore[arg-type]
            if len(self.domains) != len(self.labels):
                raise ValueError(f"{len(self.domains)} domain ids but {len(self.labels)} labels")
            if len(self.domains) and (self.domains.min() < 0 or self.domains.max() >= len(self.domain_names)):
                raise ValueError(f"domain ids must lie in [0, {len(self.domain_names)})")
        self._images: np.ndarray | None = None
        self._paths: list[str] | None = None
        self._source: ImageSource | None = None
        self._rows: np.ndarray | None = None
        if images is not None:
            images = np.asarray(images)
            if images.dtype != np.uint8 or not (
                images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)
            ):
                raise ValueError(
                    f"images must be uint8 (N, H, W) or (N, H, W, 3), got {images.dtype} {images.shape}"
                )
            n = len(images)
            self._images = images
        elif paths is not None:
            self._paths = [str(p) for p in paths]
            n = len(self._paths)
        else:
            self._source = source
            self._rows = np.asarray(rows, dtype=np.int64).reshape(-1)
            n = len(self._rows)
        if n != len(self.labels):
            raise ValueError(f"{n} images but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classnames)):
            raise DatasetError(
                f"labels must lie in [0, {len(self.classnames)}), got "
                f"[{self.labels.min()}, {self.labels.max()}]"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        kind = "in-memory" if self._images is not None else "files" if self._paths is not None else "lazy"
        return f"ImageDataset({len(self)} images, {len(self.classnames)} classes, {kind})"

    @property
    def num_classes(self) -> int:
        """Number of class names (labels lie in [0, num_classes))."""
        return len(self.classnames)

    def load_images(self, indices: Sequence[int]) -> list[Image.Image]:
        """RGB PIL images at `indices`, in that order, at their original size."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self._images is not None:
            return [Image.fromarray(self._images[i]).convert("RGB") for i in idx]
        if self._source is not None:
            return [im.convert("RGB") for im in self._source.load(self._rows[idx])]  # type: ignore[index]
        out: list[Image.Image] = []
        for i in idx:
            path = self._paths[i]  # type: ignore[index]
            try:
                with Image.open(path) as im:
                    out.append(im.convert("RGB"))  # convert() reads the pixels before the file closes
            except (OSError, ValueError) as err:
                raise DatasetError(f"cannot read image {path}: {err}") from err
        return out

    def subset(self, indices: Sequence[int] | np.ndarray) -> "ImageDataset":
        """The images at `indices` (same class names; pixels shared for in-memory data, and an ImageSource's
        images stay undecoded)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        dom = {} if self.domains is None else {"domains": self.domains[idx], "domain_names": self.domain_names}
        if self._images is not None:
            return ImageDataset(self.labels[idx], self.classnames, images=self._images[idx], **dom)
        if self._source is not None:
            rows = self._rows[idx]  # type: ignore[index]
            return ImageDataset(self.labels[idx], self.classnames, source=self._source, rows=rows, **dom)
        return ImageDataset(self.labels[idx], self.classnames, paths=[self._paths[i] for i in idx], **dom)  # type: ignore[index]


@dataclass
class DatasetSplits:
    """A dataset's train and test splits (same class names)."""

    name: str
    """The name it was loaded by (e.g. "fashion-mnist" or "imagefolder:/data/pets")."""
    train: ImageDataset
    """Training images; clients' partitions index into it."""
    test: ImageDataset
    """Held-out images for evaluation (already capped by `DataConfig.test_per_class`)."""

    @property
    def classnames(self) -> list[str]:
        """Class names shared by both splits."""
        return self.train.classnames


def with_test_cap(name: str, train: ImageDataset, test: ImageDataset, config: DataConfig, seed: int) -> DatasetSplits:
    """Train and test splits, with the test split capped at ``config.test_per_class`` images per class (seeded)."""
    if config.test_per_class is not None:
        test = test.subset(cap_per_class(test.labels, np.arange(len(test)), config.test_per_class, seed))
    return DatasetSplits(name=name, train=train, test=test)
