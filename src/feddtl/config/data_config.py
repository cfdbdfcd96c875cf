"""Configuration of the datasets: where they live, image size, held-out fractions."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """Where the image data come from and how they are prepared for the encoders."""

    fashion_mnist_dir: str = "/usr/share/datasets/fashion-mnist"
    """Folder holding the four Fashion-MNIST idx.gz files (train/t10k images and labels).
    The Debian package `dataset-fashion-mnist` installs them here."""
    image_size: int = 96
    """Images are resized (PIL bilinear) to image_size x image_size before the image encoder."""
    invert: bool = False
    """Invert grey levels (dark strokes on a white background, closer to photos); an option for
    zero-shot experiments on MNIST-like data."""
    test_fraction: float = 0.2
    """Held-out fraction for datasets without an official test split (stratified per class, seeded).
    Must be in (0, 1)."""
    test_per_class: int | None = None
    """Cap on test images per class used in evaluation (None: all). The subsample is seeded and
    applied by `load_dataset` to the returned test split."""

    verify_images: bool = True
    """imagefolder datasets: decode every image once at load time and skip unreadable files with a
    warning (an error if a class is left without images). False: a bad file fails when it is first used."""

    hf_subset: str | None = None
    """hf: datasets: the subset (configuration) name, datasets.load_dataset's `name`; None: the default one.
    A folder written by save_to_disk has no subsets."""
    hf_train_split: str = "train"
    """hf: datasets: the split the clients' images come from. A single Dataset written by save_to_disk (or
    one .parquet file) is the split "train"."""
    hf_test_split: str | None = None
    """hf: datasets: the split evaluated on. None: "test" when the dataset has one with labels, else a
    seeded stratified split of the train split (test_fraction), as for image folders."""
    hf_image_column: str | None = None
    """hf: datasets: the column holding the images (an Image feature). None: the dataset's one Image column."""
    hf_label_column: str | None = None
    """hf: datasets: the column holding the labels (a ClassLabel, or integers named by class_names_file).
    None: the dataset's one ClassLabel column, else an integer column named "label" or "labels"."""
    class_names_file: str | None = None
    """A UTF-8 text file with one class name per line, in label order, that replaces the dataset's class
    names (any dataset; needed for hf: labels without names). The count must match the dataset's classes.
    Lines "<dataset's class name> = <name>" instead rename, order (the file's order becomes the label order,
    hence the base/novel split) and select (unlisted classes are left out) by the dataset's own names, as
    CoOp-style protocols need. Blank lines and lines starting with # are skipped. "preset:<file>" names a
    file shipped with feddtl (feddtl/presets/class_names/). With dataset = "node-local" it is the run's class
    list (read on the server; SuperNodes' own classes are matched onto it, and a node never reads this file).
    Other relative paths are relative to the working directory."""

    def validate(self) -> None:
        """Raise ValueError naming the offending key and its allowed values."""
        if not isinstance(self.fashion_mnist_dir, str) or not self.fashion_mnist_dir:
            raise ValueError(
                f"data.fashion_mnist_dir must be a non-empty path string, got {self.fashion_mnist_dir!r}"
            )
        # bool is an int subclass; reject it so `image_size = true` in a TOML file is caught.
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ValueError(f"data.image_size must be an integer >= 1, got {self.image_size!r}")
        if not isinstance(self.invert, bool):
            raise ValueError(f"data.invert must be true or false, got {self.invert!r}")
        if isinstance(self.test_fraction, bool) or not isinstance(self.test_fraction, (int, float)) or not (
            0.0 < self.test_fraction < 1.0
        ):
            raise ValueError(f"data.test_fraction must be a number in (0, 1), got {self.test_fraction!r}")
        if self.test_per_class is not None and (
            isinstance(self.test_per_class, bool)
            or not isinstance(self.test_per_class, int)
            or self.test_per_class < 1
        ):
            raise ValueError(
                f"data.test_per_class must be an integer >= 1 or None (all), got {self.test_per_class!r}"
            )
        if not isinstance(self.hf_train_split, str) or not self.hf_train_split:
            raise ValueError(f"data.hf_train_split must be a split name, got {self.hf_train_split!r}")
        for key in ("hf_subset", "hf_test_split", "hf_image_column", "hf_label_column", "class_names_file"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"data.{key} must be a non-empty string or none, got {value!r}")
        if self.hf_test_split is not None and self.hf_test_split == self.hf_train_split:
            raise ValueError(
                f"data.hf_test_split={self.hf_test_split!r} is the train split too; name another split, or none "
                "to split the train split"
            )
