"""A benchmark suite: a TOML file listing methods x scenarios on one base config, run over seeds.

Format (see src/feddtl/presets/suites/*.toml)::

    name = "smoke"
    description = "what it is for"
    base = "tiny"                 # preset name or config path (relative to the suite file)
    seeds = 3                     # default; `feddtl bench --seeds N` overrides
    methods = ["zeroshot", "fedlora", "feddtl"]

    [set]                         # overrides for every cell (any config key, nested tables allowed)
    rounds = 4

    [[scenario]]
    name = "fewshot-path"         # letters, digits, '-', '_' (it names a folder)
    title = "few-shot 16, pathological"
    group = "label skew"          # optional: scenarios of a group share a table section and a plot
    set = { partition = "pathological", shots = 16 }

    [method_set.feddtl]           # optional per-method overrides
    client = { switch_round = 2 }

String values may hold ``${ENV_VAR}``; an unset variable is reported by the preflight check,
which runs before any work and lists everything the suite needs that is missing here.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feddtl.config import ConfigError, ExperimentConfig, toml_value, find_toml, load_config, to_toml
from feddtl.methods import available_methods


class SuiteError(ValueError):
    """A suite cannot be loaded or cannot run here; the message says what is wrong or missing."""


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def suite_dir() -> Path:
    """Where the named suites live (package data: feddtl/presets/suites)."""
    return Path(__file__).resolve().parent.parent / "presets" / "suites"


def available_suites() -> list[str]:
    return sorted(p.stem for p in suite_dir().glob("*.toml"))


@dataclass
class Scenario:
    """One column of the results: a data setting applied on top of the base config."""

    name: str
    title: str
    group: str
    overrides: dict[str, Any]


@dataclass
class Cell:
    """One run: a method in a scenario with a seed."""

    scenario: str
    method: str
    seed: int
    config: ExperimentConfig

    @property
    def key(self) -> str:
        return f"{self.scenario}/{self.method}/seed{self.seed}"

    def run_dir(self, out: Path) -> Path:
        return out / "runs" / self.scenario / self.method / f"seed{self.seed}"


@dataclass
class Suite:
    name: str
    description: str
    base: str
    seeds: int
    methods: list[str]
    scenarios: list[Scenario]
    common: dict[str, Any] = field(default_factory=dict)
    method_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    source: str = ""
    """The suite file's text, copied into the output folder."""
    missing_env: list[str] = field(default_factory=list)
    """${VARS} used by the suite that are not set in this environment."""

    def cells(self, seeds: int | None = None) -> list[Cell]:
        """Every (scenario, method, seed) cell with its validated config; seeds are 0..n-1."""
        n = self.seeds if seeds is None else seeds
        if n < 1:
            raise SuiteError(f"seeds must be >= 1, got {n}")
        out = []
        for sc in self.scenarios:
            for method in self.methods:
                for seed in range(n):
                    values = _merge(self.common, sc.overrides, self.method_overrides.get(method, {}))
                    values = _merge(values, {"method": method, "seed": seed})
                    try:
                        config = load_config(self.base, _flatten(values))
                    except ConfigError as exc:
                        raise SuiteError(f"suite {self.name!r}, scenario {sc.name!r}, method {method!r}: {exc}") from None
                    out.append(Cell(sc.name, method, seed, config))
        return out


def _merge(*dicts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for d in dicts:
        for k, v in d.items():
            if isinstance(v, dict) and isinstance(out.get(k), dict):
                out[k] = _merge(out[k], v)
            else:
                out[k] = v
    return out


def _flatten(values: dict[str, Any], prefix: str = "") -> list[str]:
    """Nested overrides -> ["a.b=<TOML value>"] for load_config."""
    items = []
    for k, v in values.items():
        if isinstance(v, dict):
            items += _flatten(v, f"{prefix}{k}.")
        else:
            items.append(f"{prefix}{k}={toml_value(v)}")
    return items


def _expand(value: Any, missing: set[str]) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if name not in os.environ:
                missing.add(name)
                return m.group(0)
            return os.environ[name]

        return ENV_RE.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, missing) for v in value]
    return value


def resolve_suite_path(name_or_path: str) -> Path:
    path = find_toml(name_or_path, suite_dir())
    if path is not None:
        return path
    raise SuiteError(f"suite {name_or_path!r} is neither a file nor a named suite; named suites: {', '.join(available_suites())}")


def _table(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise SuiteError(f"{where}: {key} must be a table")
    return value


def load_suite(name_or_path: str) -> Suite:
    """Read and check a suite (names, methods, config keys of every cell); no work is done."""
    path = resolve_suite_path(name_or_path)
    text = path.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{path}: not valid TOML: {exc}") from None
    allowed = {"name", "description", "base", "seeds", "methods", "set", "scenario", "method_set"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SuiteError(f"{path}: unknown keys {unknown}; allowed: {', '.join(sorted(allowed))}")
    missing: set[str] = set()
    raw = _expand(raw, missing)
    name = raw.get("name", path.stem)
    base = raw.get("base")
    if base is None:
        raise SuiteError(f"{path}: 'base' (a preset name or config path) is required")
    base_path = (path.parent / base) if base.endswith(".toml") and not Path(base).is_absolute() else None
    base = str(base_path) if base_path is not None and base_path.is_file() else base
    seeds = raw.get("seeds", 3)
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise SuiteError(f"{path}: seeds must be an integer >= 1, got {seeds!r}")
    methods = raw.get("methods")
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        raise SuiteError(f"{path}: methods must be a non-empty list of method names")
    bad = [m for m in methods if m not in available_methods()]
    if bad:
        raise SuiteError(f"{path}: unknown methods {bad}; allowed: {', '.join(available_methods())}")
    if len(set(methods)) != len(methods):
        raise SuiteError(f"{path}: methods are listed twice")
    scenarios = []
    raw_scenarios = raw.get("scenario")
    if not isinstance(raw_scenarios, list) or not raw_scenarios:
        raise SuiteError(f"{path}: at least one [[scenario]] is required")
    for i, sc in enumerate(raw_scenarios):
        where = f"{path}: scenario #{i + 1}"
        extra = sorted(set(sc) - {"name", "title", "group", "set"})
        if extra:
            raise SuiteError(f"{where}: unknown keys {extra}; allowed: name, title, group, set")
        sname = sc.get("name")
        if not isinstance(sname, str) or not NAME_RE.match(sname):
            raise SuiteError(f"{where}: name must be letters, digits, '-' or '_', got {sname!r}")
        scenarios.append(
            Scenario(sname, str(sc.get("title", sname)), str(sc.get("group", "")), _table(sc, "set", where))
        )
    names = [s.name for s in scenarios]
    if len(set(names)) != len(names):
        raise SuiteError(f"{path}: scenario names must be unique, got {names}")
    method_sets = _table(raw, "method_set", str(path))
    stray = sorted(set(method_sets) - set(methods))
    if stray:
        raise SuiteError(f"{path}: [method_set] names methods not in the suite: {stray}")
    suite = Suite(
        name=str(name),
        description=str(raw.get("description", "")),
        base=base,
        seeds=seeds,
        methods=methods,
        scenarios=scenarios,
        common=_table(raw, "set", str(path)),
        method_overrides=method_sets,
        source=text,
        missing_env=sorted(missing),
    )
    if not suite.missing_env:
        suite.cells(1)  # validates every cell's config now, before any work
    return suite


# ----- preflight: what a suite needs that this machine lacks -----------------------------------


def _backbone_missing(spec: str) -> str | None:
    if not spec.startswith("hf-clip:"):
        return None
    where = spec[len("hf-clip:") :]
    path = Path(where).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return f"CLIP weights: {path} has no config.json (expected a CLIPModel saved with save_pretrained)"
        return None
    if "/" in where and not where.startswith((".", "/", "~")) and os.environ.get("HF_HUB_OFFLINE") != "1":
        return None  # a hub id: transformers resolves it (from its cache or the network) at run time
    return f"CLIP weights: {where} is not a directory (pass a local CLIP ViT-B/16 folder saved with save_pretrained)"


def _dataset_missing(config: ExperimentConfig) -> str | None:
    name = config.dataset
    for prefix in ("imagefolder:", "imagefolder-domains:"):
        if not name.startswith(prefix):
            continue
        folder = Path(name[len(prefix) :]).expanduser()
        if not folder.is_dir():
            return f"dataset folder {folder} (for {name}) does not exist"
        return None
    if name == "fashion-mnist":
        folder = Path(config.data.fashion_mnist_dir).expanduser()
        if not (folder / "train-images-idx3-ubyte.gz").is_file():
            return f"Fashion-MNIST files under {folder} (apt-get install dataset-fashion-mnist)"
    return None


def preflight(suite: Suite, cells: list[Cell] | None = None) -> None:
    """Raise SuiteError listing every missing environment variable, weight folder and dataset."""
    problems: list[str] = [f"environment variable {v} is not set" for v in suite.missing_env]
    if not problems:
        seen: set[str] = set()
        for cell in cells if cells is not None else suite.cells(1):
            for problem in (_backbone_missing(cell.config.backbone), _dataset_missing(cell.config)):
                if problem and problem not in seen:
                    seen.add(problem)
                    problems.append(problem)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise SuiteError(f"suite {suite.name!r} cannot run on this machine; missing:\n{lines}")


def federation_key(config: ExperimentConfig) -> str:
    """The config without what only affects training: cells with equal keys can share one federation
    (backbone, partitions, cached trunk features)."""
    values = dataclasses.asdict(config)
    for k in ("method", "rounds", "client", "grpo", "server", "prompt", "fedpgp", "client_fraction"):
        values.pop(k, None)
    return repr(sorted(values.items()))


def cell_config_text(cell: Cell) -> str:
    return to_toml(cell.config)
