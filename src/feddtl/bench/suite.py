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

    [clip]                        # optional: the CLIP weights by hub id, a local copy overriding it
    [dataset.cifar10]             # optional: a data set by hub id and local copy; a scenario names it with
                                  # `dataset = "cifar10"` (see bench.sources)

A grid may add ``tuned = "runs/tune-lite/tuned.toml"`` (relative to the working directory; `feddtl bench
--tuned PATH` overrides it): every cell then runs with the values `feddtl tune` chose for its method and
partition type (``feddtl.bench.tuned``), and records them in its results.json.

String values may hold ``${ENV_VAR}``; an unset variable is reported by the preflight check (bench.plan),
which runs before any work and lists everything the suite needs that is missing here (an unset variable in
a [clip] or [dataset.*] local path only means "no local copy").
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feddtl.bench.errors import SuiteError
from feddtl.bench.sources import Source, SourceError, merge, resolve_clip, resolve_dataset
from feddtl.bench.tuned import Tuned, load_tuned
from feddtl.config import ConfigError, ExperimentConfig, find_toml, load_config, loads_config, to_toml, toml_value
from feddtl.methods import available_methods


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
    dataset: str | None = None
    """The [dataset.<key>] it reads (None: its `set` names the dataset, or the base config does)."""


@dataclass
class Cell:
    """One run: a method in a scenario with a seed (and, in a tuning sweep, one of its configurations)."""

    scenario: str
    method: str
    seed: int
    config: ExperimentConfig
    variant: str = ""
    """A tuning sweep's configuration ("c0", "c1", ...): one more folder level; "" in a grid."""
    record: dict[str, Any] = field(default_factory=dict)
    """Fields the cell adds to its results.json (the tuned values it runs with, the sweep's configuration)."""

    @property
    def key(self) -> str:
        return "/".join(p for p in (self.scenario, self.method, self.variant, f"seed{self.seed}") if p)

    def run_dir(self, out: Path) -> Path:
        folder = out / "runs" / self.scenario / self.method
        return (folder / self.variant if self.variant else folder) / f"seed{self.seed}"


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
    tuned: Tuned | None = None
    """The tuned values the suite runs with (its `tuned` file, or `feddtl bench --tuned`), per method x partition type."""
    clip: Source | None = None
    """The [clip] table, resolved: every cell's backbone."""
    datasets: dict[str, Source] = field(default_factory=dict)
    """The [dataset.*] tables, resolved."""
    extra_overrides: list[str] = field(default_factory=list)
    """`feddtl bench --set KEY=VALUE` items, applied to every cell after the suite's own overrides."""

    def cells(self, seeds: int | None = None) -> list[Cell]:
        """Every (scenario, method, seed) cell with its validated config; seeds are 0..n-1."""
        n = self.seeds if seeds is None else seeds
        if n < 1:
            raise SuiteError(f"seeds must be >= 1, got {n}")
        return [self.cell(sc, method, seed) for sc in self.scenarios for method in self.methods for seed in range(n)]

    def cell(
        self, sc: Scenario, method: str, seed: int, knobs: dict[str, Any] | None = None, variant: str = "",
        record: dict[str, Any] | None = None,
    ) -> Cell:
        """One cell: base config < [set] < [clip] < the scenario's [dataset.*] source < scenario < [method_set]
        < `--set` < ``knobs`` (dotted keys: a tuning sweep's configuration) or the suite's tuned values for
        (method, partition type) < method and seed."""
        where = f"suite {self.name!r}, scenario {sc.name!r}, method {method!r}"
        weights = {} if self.clip is None else {"backbone": self.clip.spec}
        source = {} if sc.dataset is None else merge(self.datasets[sc.dataset].overrides,
                                                     {"dataset": self.datasets[sc.dataset].spec})
        settings = _flatten(merge(self.common, weights, source, sc.overrides, self.method_overrides.get(method, {})))
        settings += self.extra_overrides  # after the suite's own: a later item wins; a tuned knob may not be set
        tail = [f"method={toml_value(method)}", f"seed={seed}"]
        config = self._load(settings + tail, where)
        record = dict(record or {})
        if self.tuned is not None:
            knobs = self.tuned.values(method, config.partition, where)
            clash = sorted(set(knobs) & {item.split("=", 1)[0] for item in settings})
            if clash:
                raise SuiteError(f"{where}: sets {clash}, which the tuned file {self.tuned.path} chooses; leave them to it")
            self.tuned.check_split(config, where)
            record["tuned"] = self.tuned.record(method, config.partition)
        if knobs:
            config = self._load(settings + [f"{k}={toml_value(v)}" for k, v in knobs.items()] + tail, where)
        return Cell(sc.name, method, seed, config, variant=variant, record=record)

    def _load(self, overrides: list[str], where: str) -> ExperimentConfig:
        try:
            return load_config(self.base, overrides)
        except ConfigError as exc:
            raise SuiteError(f"{where}: {exc}") from None

    def select(self, scenarios: list[str] | None = None, methods: list[str] | None = None) -> "Suite":
        """The suite restricted to some scenarios and methods (`feddtl bench --scenarios/--methods`), in the
        suite's order; an unknown name is an error naming the suite's."""
        def pick(kind: str, wanted: list[str] | None, have: list[str]) -> list[str]:
            if wanted is None:
                return have
            unknown = [w for w in wanted if w not in have]
            if unknown:
                raise SuiteError(f"suite {self.name!r} has no {kind} {unknown}; its {kind}: {', '.join(have)}")
            return [h for h in have if h in wanted]

        names = pick("scenarios", scenarios, [sc.name for sc in self.scenarios])
        return dataclasses.replace(
            self, scenarios=[sc for sc in self.scenarios if sc.name in names],
            methods=pick("methods", methods, self.methods),
            method_overrides={m: v for m, v in self.method_overrides.items() if methods is None or m in methods},
        )

    @property
    def selection_toml(self) -> str:
        """A [bench] table recording a selection or --set overrides, appended to the suite.toml a run writes
        (bench.cells.collect reports only the selected cells); empty when the whole suite runs as written."""
        raw = tomllib.loads(self.source)
        all_scenarios = [sc.get("name") for sc in raw.get("scenario", [])]
        scenarios = [sc.name for sc in self.scenarios]
        if scenarios == all_scenarios and self.methods == raw.get("methods") and not self.extra_overrides:
            return ""
        return (
            "\n\n# written by `feddtl bench` for this output folder: the cells it ran\n[bench]\n"
            f"scenarios = {toml_value(scenarios)}\nmethods = {toml_value(self.methods)}\n"
            f"overrides = {toml_value(self.extra_overrides)}\n"
        )


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
    if (suite_dir().parent / "tuning" / f"{name_or_path}.toml").is_file():
        raise SuiteError(f"{name_or_path!r} is a tuning suite: run it with `feddtl tune --suite {name_or_path} --out DIR`")
    raise SuiteError(f"suite {name_or_path!r} is neither a file nor a named suite; named suites: {', '.join(available_suites())}")


def _table(raw: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise SuiteError(f"{where}: {key} must be a table")
    return value


def read_suite_file(path: Path) -> tuple[str, dict[str, Any]]:
    """(text, parsed TOML) of a suite file."""
    text = path.read_text()
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SuiteError(f"{path}: not valid TOML: {exc}") from None


SUITE_KEYS = ("name", "description", "base", "seeds", "methods", "set", "scenario", "method_set", "clip", "dataset")


def parse_suite(path: Path, text: str, raw: dict[str, Any], extra_keys: tuple[str, ...] = ()) -> Suite:
    """The grid part of a suite file (base, [set], scenarios, methods, [method_set]); keys in ``extra_keys``
    are left to the caller (a grid's `tuned`, a tuning sweep's search space). Cells are not built yet."""
    allowed = set(SUITE_KEYS) | set(extra_keys)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise SuiteError(f"{path}: unknown keys {unknown}; allowed: {', '.join(sorted(allowed))}")
    # [clip] and [dataset.*] expand ${VARS} themselves: unset there means "no local copy", not "missing".
    raw = dict(raw)
    try:
        clip = resolve_clip(raw.pop("clip")) if "clip" in raw else None
        raw_datasets = raw.pop("dataset", {})
        if not isinstance(raw_datasets, dict):
            raise SourceError("[dataset.<name>] tables are expected")
        datasets = {key: resolve_dataset(key, table) for key, table in raw_datasets.items()}
    except SourceError as exc:
        raise SuiteError(f"{path}: {exc}") from None
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
        extra = sorted(set(sc) - {"name", "title", "group", "set", "dataset"})
        if extra:
            raise SuiteError(f"{where}: unknown keys {extra}; allowed: name, title, group, set, dataset")
        sname = sc.get("name")
        if not isinstance(sname, str) or not NAME_RE.match(sname):
            raise SuiteError(f"{where}: name must be letters, digits, '-' or '_', got {sname!r}")
        key = sc.get("dataset")
        if key is not None and key not in datasets:
            raise SuiteError(
                f"{where} ({sname}): dataset = {key!r} names no [dataset.*] table; the suite's: "
                f"{', '.join(datasets) or 'none'}"
            )
        sc_set = _table(sc, "set", where)
        if key is not None and "dataset" in sc_set:
            raise SuiteError(f"{where} ({sname}): give the dataset once, as dataset = {key!r} or in set")
        scenarios.append(Scenario(sname, str(sc.get("title", sname)), str(sc.get("group", "")), sc_set, key))
    names = [s.name for s in scenarios]
    if len(set(names)) != len(names):
        raise SuiteError(f"{path}: scenario names must be unique, got {names}")
    common = _table(raw, "set", str(path))
    if clip is not None and "backbone" in common:
        raise SuiteError(f"{path}: give the backbone once, in [clip] or in [set]")
    method_sets = _table(raw, "method_set", str(path))
    stray = sorted(set(method_sets) - set(methods))
    if stray:
        raise SuiteError(f"{path}: [method_set] names methods not in the suite: {stray}")
    return Suite(
        name=str(name),
        description=str(raw.get("description", "")),
        base=base,
        seeds=seeds,
        methods=methods,
        scenarios=scenarios,
        common=common,
        method_overrides=method_sets,
        source=text,
        missing_env=sorted(missing),
        clip=clip,
        datasets=datasets,
    )


def load_suite(name_or_path: str, tuned: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Suite:
    """Read and check a suite (names, methods, config keys of every cell); no work is done.

    ``tuned``: a tuned.toml (`feddtl tune`) to run with, in place of the suite's own `tuned` key. A suite
    that names tuned values which are missing here fails now, saying how to make them.
    ``overrides``: `--set KEY=VALUE` items applied to every cell after the suite's own (e.g. fewer rounds).
    """
    path = resolve_suite_path(name_or_path)
    text, raw = read_suite_file(path)
    suite = parse_suite(path, text, raw, extra_keys=("tuned",))
    suite.extra_overrides = list(overrides)
    declared = raw.get("tuned")
    if declared is not None and not isinstance(declared, str):
        raise SuiteError(f"{path}: tuned must be the path of a tuned.toml, got {declared!r}")
    if tuned is not None or declared is not None:
        suite.tuned = load_tuned(tuned if tuned is not None else _expand(declared, set()), suite=suite.name)
    if not suite.missing_env:
        suite.cells(1)  # validates every cell's config now, before any work
    return suite


def federation_key(config: ExperimentConfig) -> str:
    """The config without what only affects training: cells with equal keys can share one federation
    (backbone, partitions, cached trunk features)."""
    values = dataclasses.asdict(config)
    for k in ("method", "rounds", "client", "grpo", "server", "prompt", "fedpgp", "client_fraction"):
        values.pop(k, None)
    return repr(sorted(values.items()))


def cell_config_text(cell: Cell) -> str:
    return to_toml(cell.config)


def is_finished(cell: Cell, out: Path) -> bool:
    """The cell's run directory holds results.json and the cell's config.

    The stored config.toml is compared after loading it, so keys it lacks take today's defaults: a
    feddtl that adds a config section (e.g. a new method's) does not rerun a finished suite, while a
    changed value (or a changed default the file states) does. A stored config that no longer loads
    (a key was removed) counts as unfinished.
    """
    run_dir = cell.run_dir(out)
    config = run_dir / "config.toml"
    if not ((run_dir / "results.json").is_file() and config.is_file()):
        return False
    text = config.read_text()
    if text == cell_config_text(cell):
        return True
    # A run written before a config section was added lacks it in its TOML; loaded, the section takes its
    # defaults, which compute what the run computed: the cell is finished if the loaded configs are equal.
    try:
        return loads_config(text, source=str(config)) == cell.config
    except ConfigError:
        return False
