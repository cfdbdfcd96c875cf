"""A tuning suite: a grid-like TOML file plus, per method, a search space over its open knobs.

Format (see src/feddtl/presets/tuning/tune-lite.toml)::

    name = "tune-lite"
    base = "demo"
    seed = 100                    # the one seed every configuration runs
    configs = 4                   # configurations per tuned method: the same for every method
    draw_seed = 0                 # seeds the draw of the configurations
    default_first = true          # configuration c0 is the base config's values (the paper's)
    methods = ["fedlora", "feddtl"]

    [set]                         # as in a grid; a tuning suite must evaluate on the validation hold-out
    base_novel = "random"         # and fix its class split (the tuning split)
    base_novel_seed = 100
    eval = { on = "validation" }

    [[scenario]]                  # as in a grid
    ...

    [space.feddtl]                # per method: its open knobs (feddtl.bench.knobs), each
    "client.lr" = { log = [3e-4, 3e-3] }     # a log-uniform range,
    "server.text_epochs" = [1, 2, 3]         # a list of values to choose from,
    [space.fedlora]
    points = [{ "client.lr" = 5e-4 }, ...]   # or explicit configurations instead of a draw

Configurations are drawn by Latin hypercube sampling: each knob's range is cut into as many equal
(log-)strata as there are draws and each stratum is used once; a list is cycled through so each value
is used as evenly as the count allows. The draw depends on draw_seed and the method's name only, so it
is the same on every machine. A method whose configuration count differs from ``configs`` (explicit
points, or a space with too few distinct values) is a SuiteError naming it.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from feddtl.bench.errors import SuiteError
from feddtl.bench.knobs import OPEN_KNOBS, tunable
from feddtl.bench.suite import Cell, Suite, parse_suite, read_suite_file
from feddtl.config import find_toml

TUNE_KEYS = ("seed", "configs", "draw_seed", "default_first", "space")


def tuning_dir() -> Path:
    """Where the named tuning suites live (package data: feddtl/presets/tuning)."""
    return Path(__file__).resolve().parent.parent / "presets" / "tuning"


def available_tuning_suites() -> list[str]:
    return sorted(p.stem for p in tuning_dir().glob("*.toml"))


@dataclass
class TuneSuite:
    """A tuning sweep: every (scenario, tuned method, configuration) on one seed."""

    suite: Suite
    seed: int
    configs: int
    points: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """method -> its configurations (dotted key -> value); index i is configuration c<i>."""

    @property
    def name(self) -> str:
        return self.suite.name

    def cells(self) -> list[Cell]:
        out = []
        for sc in self.suite.scenarios:
            for method in self.suite.methods:
                for i, values in enumerate(self.points[method]):
                    record = {"tuning": {"config": i, "values": values}}
                    out.append(self.suite.cell(sc, method, self.seed, knobs=values, variant=f"c{i}", record=record))
        return out


def _round(x: float, digits: int = 2) -> float:
    """``x`` to ``digits`` significant digits: drawn values a reader can copy."""
    return float(f"{x:.{digits - 1}e}")


def _draw(space: dict[str, Any], n: int, rng: np.random.Generator, where: str) -> list[dict[str, Any]]:
    """``n`` configurations by Latin hypercube sampling of ``space`` (module docstring)."""
    columns: dict[str, list[Any]] = {}
    for key, spec in space.items():
        if isinstance(spec, list) and spec:
            reps = [spec[i % len(spec)] for i in rng.permutation(max(n, len(spec)))[:n]]
            columns[key] = [reps[i] for i in rng.permutation(n)]
        elif isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in ("log", "uniform"):
            kind, bounds = next(iter(spec.items()))
            numbers = isinstance(bounds, list) and len(bounds) == 2 and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds
            )
            if not (numbers and bounds[0] < bounds[1] and (kind == "uniform" or bounds[0] > 0)):
                raise SuiteError(f"{where}: {key} = {{ {kind} = ... }} needs [low, high] with low < high (and low > 0 for log)")
            lo, hi = (math.log(bounds[0]), math.log(bounds[1])) if kind == "log" else (bounds[0], bounds[1])
            u = (rng.permutation(n) + rng.random(n)) / n  # one draw in each of n equal strata, shuffled
            columns[key] = [_round(math.exp(lo + x * (hi - lo)) if kind == "log" else lo + x * (hi - lo)) for x in u]
        else:
            raise SuiteError(
                f"{where}: {key} must be a list of values or {{ log = [low, high] }} / {{ uniform = [low, high] }}; got {spec!r}"
            )
    return [{key: columns[key][i] for key in space} for i in range(n)]


def _points(method: str, space: dict[str, Any], default: dict[str, Any], tune: dict[str, Any], where: str) -> list[dict[str, Any]]:
    """The method's configurations: the default first (if asked), then the drawn or explicit ones."""
    configs, first = tune["configs"], tune["default_first"]
    keys = [k for k in space if k != "points"]
    allowed = OPEN_KNOBS[method]
    stray = sorted(set(keys) - set(allowed))
    if stray:
        raise SuiteError(f"{where}: {stray} are not open knobs of {method!r}; allowed: {', '.join(allowed)}")
    head = [dict(default)] if first else []
    if "points" in space:
        if keys:
            raise SuiteError(f"{where}: give either points or knob ranges, not both")
        points = space["points"]
        if not isinstance(points, list) or not all(isinstance(p, dict) and p for p in points):
            raise SuiteError(f"{where}: points must be a list of tables of knob values")
        stray = sorted({k for p in points for k in p} - set(allowed))
        if stray:
            raise SuiteError(f"{where}: {stray} are not open knobs of {method!r}; allowed: {', '.join(allowed)}")
        out = head + [{**default, **p} for p in points]
        if len(out) != configs:
            also = " + the default" if first else ""
            raise SuiteError(
                f"{where}: method {method!r} gets {len(out)} configurations ({len(points)} points{also}) but the "
                f"suite's configs = {configs}: every tuned method must get the same number"
            )
    else:
        if not keys:
            raise SuiteError(f"{where}: no knobs to search for {method!r}; its open knobs: {', '.join(allowed)}")
        rng = np.random.default_rng([tune["draw_seed"], zlib.crc32(method.encode())])
        n = configs - len(head)
        for _ in range(100):  # redraw until the configurations are distinct (discrete spaces can repeat)
            out = head + [{**default, **p} for p in _draw({k: space[k] for k in keys}, n, rng, where)]
            if len({repr(sorted(p.items())) for p in out}) == len(out):
                break
        else:
            raise SuiteError(
                f"{where}: method {method!r}'s space has too few distinct configurations for configs = {configs}: "
                "widen it, or give explicit points"
            )
    if len({repr(sorted(p.items())) for p in out}) != len(out):
        raise SuiteError(f"{where}: method {method!r} lists the same configuration twice")
    return out


def _tune_settings(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    out = {"seed": raw.get("seed", 0), "configs": raw.get("configs"), "draw_seed": raw.get("draw_seed", 0),
           "default_first": raw.get("default_first", True)}
    for key in ("seed", "configs", "draw_seed"):
        v = out[key]
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if key == "configs" else 0):
            raise SuiteError(f"{path}: {key} must be an integer >= {1 if key == 'configs' else 0}, got {v!r}")
    if not isinstance(out["default_first"], bool):
        raise SuiteError(f"{path}: default_first must be true or false")
    return out


def load_tuning_suite(name_or_path: str) -> TuneSuite:
    """Read and check a tuning suite: its grid part, the equal configuration counts, the knobs, the tuning
    split and the validation hold-out of every cell; no work is done."""
    path = find_toml(name_or_path, tuning_dir())
    if path is None:
        raise SuiteError(
            f"tuning suite {name_or_path!r} is neither a file nor a named tuning suite; named: "
            f"{', '.join(available_tuning_suites())}"
        )
    text, raw = read_suite_file(path)
    suite = parse_suite(path, text, raw, extra_keys=TUNE_KEYS)
    tune = _tune_settings(raw, path)
    untuned = [m for m in suite.methods if not tunable(m)]
    if untuned:
        raise SuiteError(f"{path}: {untuned} have no open knobs to tune; leave them out of a tuning suite")
    spaces = raw.get("space", {})
    if not isinstance(spaces, dict):
        raise SuiteError(f"{path}: space must be tables [space.<method>]")
    missing, stray = [m for m in suite.methods if m not in spaces], sorted(set(spaces) - set(suite.methods))
    if missing or stray:
        raise SuiteError(f"{path}: every method needs a [space.<method>] and only those: missing {missing}, not in methods {stray}")
    tsuite = TuneSuite(suite, tune["seed"], tune["configs"])
    if suite.missing_env:
        return tsuite
    for method in suite.methods:
        # The default configuration is what the base config and [set] give the method's knobs: the paper's.
        where = f"{path}: [space.{method}]"
        config = suite.cell(suite.scenarios[0], method, tsuite.seed).config
        default = {k: _get(config, k) for k in spaces[method] if k != "points"}
        if "points" in spaces[method]:
            default = {k: _get(config, k) for p in spaces[method]["points"] if isinstance(p, dict) for k in p}
        tsuite.points[method] = _points(method, spaces[method], default, tune, where)
    cells = tsuite.cells()  # every configuration's config is valid, and each cell is a tuning cell
    for cell in cells:
        _check_tuning_cell(cell, path)
    if len({c.config.base_novel_seed for c in cells}) > 1:
        raise SuiteError(f"{path}: every scenario must use the same tuning split (one base_novel_seed)")
    return tsuite


def _get(config: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def _check_tuning_cell(cell: Cell, path: Path) -> None:
    c, where = cell.config, f"{path}: scenario {cell.scenario!r}, method {cell.method!r}"
    if c.eval.on != "validation":
        raise SuiteError(f"{where}: a tuning suite evaluates on the validation hold-out: set eval = {{ on = \"validation\" }}")
    if c.base_novel != "random" or c.base_novel_seed is None:
        raise SuiteError(
            f"{where}: a tuning suite fixes its own class split (the tuning split): set base_novel = \"random\" "
            "and a base_novel_seed that no grid uses"
        )
