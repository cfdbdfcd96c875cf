"""Where a suite's data sets and CLIP weights come from: a Hugging Face Hub id, or a local copy when one exists.

A suite names them in two kinds of table (see presets/suites/paper-clip.toml)::

    [clip]                                  # the backbone of every cell: hf-clip:<local or hub>
    hub = "openai/clip-vit-base-patch16"
    local = "${FEDDTL_CLIP_DIR}"            # used when it exists (a CLIPModel saved with save_pretrained)

    [dataset.cifar10]                       # a scenario uses it with `dataset = "cifar10"`
    title = "CIFAR-10"
    hub = "uoft-cs/cifar10"                 # hf:<hub id> when there is no local copy
    local = "${FEDDTL_DATA_ROOT}/cifar10"   # a save_to_disk folder or parquet files (hf:<path>) or an image folder
    domains = false                         # true: the local copy is imagefolder-domains: (one folder per domain)
    set = { data = { class_names_file = "preset:eurosat.txt" } }   # config for every source of it
    hf_set = { data = { hf_image_column = "img" } }               # config only for hf: sources (hub or local)

An unset ``${VAR}`` in ``local`` means "no local copy" (not a missing requirement): the hub id is used. The
resolution happens when the suite is loaded, so a cell's config.toml says what it read; whether a hub id can
be fetched from this machine is checked by the preflight (bench.plan), not here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feddtl.data.hf import local_hf_format

ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
DATASET_KEYS = ("title", "hub", "local", "domains", "set", "hf_set")
CLIP_KEYS = ("hub", "local")


class SourceError(ValueError):
    """A [clip] or [dataset.*] table is malformed; the message names the key."""


def expand_env(value: str) -> tuple[str, list[str]]:
    """``value`` with ``${VAR}`` replaced from the environment, and the names of the unset ones (kept as is)."""
    unset: list[str] = []

    def sub(m: re.Match[str]) -> str:
        if m.group(1) not in os.environ:
            unset.append(m.group(1))
            return m.group(0)
        return os.environ[m.group(1)]

    return ENV_RE.sub(sub, value), unset


@dataclass
class Source:
    """One data set or the CLIP weights, resolved: ``spec`` is what the cells' config gets."""

    key: str
    title: str
    hub: str | None
    local: str | None
    """The local path with the environment expanded (None: the table gives none)."""
    unset: list[str]
    """Environment variables ``local`` needs that are not set (then there is no local copy)."""
    spec: str
    """The config value: "hf:<path or hub id>", "imagefolder[-domains]:<path>" or "hf-clip:<path or hub id>"."""
    origin: str
    """"local", "hub" or "none" (neither: the cells cannot run here)."""
    detail: str
    """What the local path holds ("save_to_disk", "parquet", "image folder", "CLIPModel folder") or why it is
    not used."""
    problem: str | None = None
    """Known when the suite loads: no usable source at all (the preflight adds the hub checks)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Config overrides that go with the resolved source (the table's set, plus hf_set for hf: sources)."""

    @property
    def where(self) -> str:
        """The path or hub id ``spec`` points at."""
        return self.spec.split(":", 1)[1]


def merge(*dicts: dict[str, Any]) -> dict[str, Any]:
    """Nested config overrides, later ones winning key by key."""
    out: dict[str, Any] = {}
    for d in dicts:
        for k, v in d.items():
            out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _check_keys(table: Any, allowed: tuple[str, ...], where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise SourceError(f"{where} must be a table")
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise SourceError(f"{where}: unknown keys {unknown}; allowed: {', '.join(allowed)}")
    for key in ("hub", "local", "title"):
        if key in table and (not isinstance(table[key], str) or not table[key]):
            raise SourceError(f"{where}: {key} must be a non-empty string, got {table[key]!r}")
    if "hub" not in table and "local" not in table:
        raise SourceError(f"{where}: give a hub id (hub = ...), a local path (local = ...), or both")
    return table


def _local(table: dict[str, Any]) -> tuple[Path | None, str | None, list[str]]:
    """(usable local path or None, its text with the environment expanded, unset variables)."""
    if "local" not in table:
        return None, None, []
    text, unset = expand_env(table["local"])
    return (None if unset else Path(text).expanduser()), text, unset


def _not_used(text: str | None, unset: list[str], path: Path | None) -> str:
    if text is None:
        return "no local path in the suite"
    if unset:
        return f"local {text}: {', '.join(unset)} not set"
    return f"local {path} does not exist"


def resolve_dataset(key: str, table: Any) -> Source:
    where = f"[dataset.{key}]"
    table = _check_keys(table, DATASET_KEYS, where)
    domains = table.get("domains", False)
    if not isinstance(domains, bool):
        raise SourceError(f"{where}: domains must be true or false, got {domains!r}")
    common, hf_set = table.get("set", {}), table.get("hf_set", {})
    for name, value in (("set", common), ("hf_set", hf_set)):
        if not isinstance(value, dict):
            raise SourceError(f"{where}: {name} must be a table of config overrides")
    if domains and "hub" in table:
        raise SourceError(f"{where}: domains = true reads a local imagefolder-domains copy; hf: sources have no domains")
    title = table.get("title", key)
    path, text, unset = _local(table)
    folder_prefix = "imagefolder-domains:" if domains else "imagefolder:"
    hf = merge(common, hf_set)
    if path is not None and path.exists():
        fmt = None if domains else local_hf_format(path)
        if fmt is not None:
            return Source(key, title, table.get("hub"), text, [], f"hf:{path}", "local", fmt, overrides=hf)
        if path.is_dir() and any(p.is_dir() and not p.name.startswith(".") for p in path.iterdir()):
            detail = "image folder, one sub-folder per domain" if domains else "image folder"
            return Source(key, title, table.get("hub"), text, [], f"{folder_prefix}{path}", "local", detail,
                          overrides=common)
        what = "class folders per domain" if domains else "a save_to_disk dataset, parquet files or class folders"
        return Source(key, title, table.get("hub"), text, [], f"{folder_prefix}{path}", "none", "unusable",
                      problem=f"{title}: {path} holds no {what}", overrides=common)
    reason = _not_used(text, unset, path)
    if "hub" in table:
        return Source(key, title, table["hub"], text, unset, f"hf:{table['hub']}", "hub", reason, overrides=hf)
    fix = f"set {unset[0]}" if unset else f"put a copy at {path}"
    layout = "<domain>/<class>/*.jpg" if domains else "<class>/*.jpg or a save_to_disk folder"
    return Source(
        key, title, None, text, unset, f"{folder_prefix}{text}", "none", reason,
        problem=f"{title}: no copy here and none on the hub ({reason}); {fix} ({layout})", overrides=common,
    )


def resolve_clip(table: Any) -> Source:
    table = _check_keys(table, CLIP_KEYS, "[clip]")
    path, text, unset = _local(table)
    if path is not None and path.exists():
        if not (path / "config.json").is_file():
            return Source("clip", "CLIP weights", table.get("hub"), text, [], f"hf-clip:{path}", "none", "unusable",
                          problem=f"CLIP weights: {path} has no config.json (expected a CLIPModel saved with "
                                  "save_pretrained)")
        return Source("clip", "CLIP weights", table.get("hub"), text, [], f"hf-clip:{path}", "local", "CLIPModel folder")
    reason = _not_used(text, unset, path)
    if "hub" in table:
        return Source("clip", "CLIP weights", table["hub"], text, unset, f"hf-clip:{table['hub']}", "hub", reason)
    return Source("clip", "CLIP weights", None, text, unset, f"hf-clip:{text}", "none", reason,
                  problem=f"CLIP weights: no local copy ({reason}) and no hub id")
