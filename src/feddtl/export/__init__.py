"""The tuned model out of the run folder: ``feddtl export`` (HF / peft folders, lite folders) and
``feddtl predict`` (open-vocabulary classification of image files). See docs/export.md."""

from __future__ import annotations

from feddtl.export.manifest import MANIFEST_NAME, ExportError
from feddtl.export.model import TunedModel, load_tuned_model
from feddtl.export.predict import collect_images, parse_classes, predict_csv, predict_to_file
from feddtl.export.writer import export_run

__all__ = [
    "MANIFEST_NAME",
    "ExportError",
    "TunedModel",
    "collect_images",
    "export_run",
    "load_tuned_model",
    "parse_classes",
    "predict_csv",
    "predict_to_file",
]
