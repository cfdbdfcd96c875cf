"""What a machine computes with: the feddtl, torch and transformers versions and the backbone's weights.

The ServerApp and every SuperNode compute this report; each node sends its own in the handshake reply and
the server compares it with its own (``differences``). A node that differs is refused, or admitted with
a warning when ``flower.allow_version_mismatch = true``: a node that runs other code or other weights
computes other updates, and nothing downstream would notice.

Package versions come from the installed distributions' metadata (nothing is imported: a SuperNode that
never runs the text tower does not import transformers); the weights' fingerprint is
``feddtl.backbones.fingerprint.weights_fingerprint`` (a sampled SHA-256 of the weight files, no model built).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from importlib import metadata

from flwr.app import UserConfig

import feddtl
from feddtl.backbones.base import BackboneError
from feddtl.backbones.fingerprint import weights_fingerprint

TEST_FEDDTL_VERSION = "test-feddtl-version"
"""Node-config key, a test hook only: the feddtl version this node reports instead of its own, so a test
can start a node that disagrees with the server without installing anything else. Never set it in a
real deployment: it makes a node lie about its code."""


@dataclass(frozen=True)
class Versions:
    """One machine's report (all strings, so it travels as a ConfigRecord)."""

    feddtl: str
    torch: str
    transformers: str
    weights: str
    """``weights_fingerprint`` of the config's backbone, or why it could not be computed."""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, object]) -> "Versions":
        """The report in ``values``; a field that is missing or not a string reads as "not reported"."""
        return cls(**{
            f.name: value if isinstance(value := values.get(f.name), str) else "not reported" for f in fields(cls)
        })


def distribution_version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def local_versions(backbone: str, feddtl_version: str | None = None) -> Versions:
    """This machine's report for a run on ``backbone`` (a config's ``backbone`` value).

    ``feddtl_version``: report this instead of the installed version (the ``TEST_FEDDTL_VERSION`` hook).
    """
    with warnings.catch_warnings():  # metadata of an editable install can warn; the version is what counts
        warnings.simplefilter("ignore")
        torch_version = distribution_version("torch")
        transformers_version = distribution_version("transformers")
    try:
        weights = weights_fingerprint(backbone)
    except (BackboneError, OSError) as exc:
        weights = f"unavailable: {exc}"
    return Versions(
        feddtl=feddtl_version or feddtl.__version__,
        torch=torch_version,
        transformers=transformers_version,
        weights=weights,
    )


def node_versions(backbone: str, node_config: UserConfig) -> Versions:
    """A SuperNode's report, honouring the ``TEST_FEDDTL_VERSION`` node-config test hook."""
    override = node_config.get(TEST_FEDDTL_VERSION)
    return local_versions(backbone, feddtl_version=str(override) if override is not None else None)


def differences(server: Versions, node: Versions) -> list[str]:
    """One line per field where ``node`` differs from ``server``, e.g.
    ``feddtl: 0.1.0 on the server, 9.9.9 on the node``; empty when they agree."""
    out = []
    for f in fields(Versions):
        mine, theirs = getattr(server, f.name), getattr(node, f.name)
        if mine != theirs:
            what = "backbone weights" if f.name == "weights" else f.name
            out.append(f"{what}: {mine} on the server, {theirs} on the node")
    return out
