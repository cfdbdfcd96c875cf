"""When and how the global model is evaluated ([eval])."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class EvalConfig:
    """When and how the global model is evaluated."""

    every: int = 5
    """Evaluate every this many rounds (and always after the last round)."""
    batch_size: int = 256
    """Batch size of evaluation forward passes (separate from the training batch size)."""
    on: Literal["test", "validation"] = "test"
    """What Base / Novel / Local are measured on. "test": the test split (every reported number).
    "validation": a seeded, stratified hold-out of validation_per_class *training* images per class
    (base and novel classes), carved from the training pool before the partition and the shots, so no
    client ever trains on it; the test split is then never evaluated. For tuning (`feddtl tune`), so that
    choosing hyper-parameters never looks at the test images; results.json says eval_on = "validation"."""
    validation_per_class: int = 200
    """With on = "validation": training images per class held out as the validation set (seeded by
    seed + 4000, stratified; on data with domains spread evenly over the domains that hold the class).
    At most half of a class's (or a class-and-domain's) training images may go; more is a config error.
    data.test_per_class does not apply to it. Unused with on = "test"."""
