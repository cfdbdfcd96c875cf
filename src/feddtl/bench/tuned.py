"""Tuned values: the file `feddtl tune` writes (tuned.toml) and how a grid applies it.

A grid that names a tuned file runs every cell with the values chosen for its method and partition type
(the cell's ``partition``: pathological, dirichlet, iid, domain, ...) and records them in its results.json
under ``tuned``. Methods without open knobs (zeroshot) get nothing. The file also records the tuning
split, and a grid cell that would evaluate that split is refused: tuning must never see what the grid
reports.

Layout::

    format = 1
    suite = "tune-lite"                  # the tuning suite it came from
    seed = 100                           # the one seed the sweep ran
    configs = 4                          # configurations per method
    validation_per_class = 200
    split = { base_novel = "random", base_novel_seed = 100, datasets = ["fashion-mnist", "digits-domains"] }

    [chosen.feddtl.pathological]         # what the grid applies
    "client.lr" = 0.0012
    ...

    [[trial]]                            # every configuration's validation result (the record)
    method = "feddtl"
    partition = "pathological"
    config = 0
    ...
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from feddtl.bench.errors import SuiteError
from feddtl.bench.knobs import tunable
from feddtl.config import ExperimentConfig, toml_value

FORMAT = 1


@dataclass
class Tuned:
    """A tuned.toml, read."""

    path: Path
    sha256: str
    suite: str
    seed: int
    configs: int
    split: dict[str, Any]
    """The tuning sweep's class split: base_novel, base_novel_seed, and the datasets it was drawn on."""
    chosen: dict[str, dict[str, dict[str, Any]]]
    """method -> partition type -> {dotted config key: value}."""
    trials: list[dict[str, Any]] = field(default_factory=list)

    def values(self, method: str, partition: str, where: str) -> dict[str, Any]:
        """The chosen values for a cell of ``method`` on a ``partition`` partition ({} for an untuned method)."""
        if not tunable(method):
            return {}
        per_method = self.chosen.get(method)
        if per_method is None:
            raise SuiteError(
                f"{where}: the tuned file {self.path} has no values for method {method!r} (it has "
                f"{', '.join(sorted(self.chosen)) or 'none'}); add the method to the tuning suite and run `feddtl tune` again"
            )
        if partition not in per_method:
            raise SuiteError(
                f"{where}: the tuned file {self.path} has no values for method {method!r} on partition type "
                f"{partition!r} (it has {', '.join(sorted(per_method))}); add a scenario of that type to the tuning suite"
            )
        return dict(per_method[partition])

    def record(self, method: str, partition: str) -> dict[str, Any]:
        """What a grid cell writes to its results.json under ``tuned``."""
        return {
            "values": self.values(method, partition, "") if tunable(method) else {},
            "partition": partition,
            "file": str(self.path),
            "sha256": self.sha256,
            "tuning_suite": self.suite,
        }

    def check_split(self, config: ExperimentConfig, where: str) -> None:
        """A grid cell must not evaluate the class split the values were tuned on."""
        if self.split.get("base_novel") != "random" or config.base_novel != "random":
            return
        if config.dataset not in self.split.get("datasets", [config.dataset]):
            return
        seed = config.seed if config.base_novel_seed is None else config.base_novel_seed
        if seed == self.split.get("base_novel_seed"):
            raise SuiteError(
                f"{where}: base_novel = 'random' with split seed {seed} is the tuning split of {self.path}; "
                "a grid must not evaluate the split its hyper-parameters were chosen on: give it another base_novel_seed"
            )


def load_tuned(path: str | Path, suite: str = "") -> Tuned:
    """Read a tuned.toml; a missing or malformed file is a SuiteError that says how to make one."""
    path = Path(path).expanduser()
    for_suite = f"suite {suite!r} runs with tuned values from {path}, but " if suite else f"{path}: "
    if not path.is_file():
        raise SuiteError(
            f"{for_suite}that file does not exist. Make it first with `feddtl tune --suite tune-lite --out DIR` "
            "(it writes DIR/tuned.toml), then pass it with `feddtl bench --tuned DIR/tuned.toml` or the suite's "
            "`tuned` key; nothing was run"
        )
    data = path.read_bytes()
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SuiteError(f"{for_suite}it is not valid TOML: {exc}") from None
    if raw.get("format") != FORMAT:
        raise SuiteError(f"{for_suite}it is not a tuned file of format {FORMAT} (written by `feddtl tune`)")
    chosen = raw.get("chosen", {})
    ok = isinstance(chosen, dict) and all(
        isinstance(per, dict) and all(isinstance(v, dict) for v in per.values()) for per in chosen.values()
    )
    if not ok:
        raise SuiteError(f"{for_suite}its [chosen] must be tables [chosen.<method>.<partition type>] of config keys")
    return Tuned(
        path=path,
        sha256=hashlib.sha256(data).hexdigest(),
        suite=str(raw.get("suite", "")),
        seed=int(raw.get("seed", 0)),
        configs=int(raw.get("configs", 0)),
        split=dict(raw.get("split", {})),
        chosen=chosen,
        trials=list(raw.get("trial", [])),
    )


def _inline(values: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in values.items()) + " }"


def tuned_text(header: dict[str, Any], chosen: dict[str, dict[str, dict[str, Any]]], trials: list[dict[str, Any]]) -> str:
    """tuned.toml's text: ``header`` (top-level scalars and inline tables), then [chosen], then every [[trial]]."""
    lines = [
        "# Written by `feddtl tune`: hyper-parameters chosen by validation HM on a tuning split that grids never",
        "# evaluate. A grid applies [chosen.<method>.<partition type>] (`tuned = ...` in the suite, or",
        "# `feddtl bench --tuned`); [[trial]] records every configuration's validation result.",
        f"format = {FORMAT}",
    ]
    for key, value in header.items():
        lines.append(f"{key} = {_inline(value) if isinstance(value, dict) else toml_value(value)}")
    for method, per_method in chosen.items():
        for partition, values in per_method.items():
            lines.append(f"\n[chosen.{toml_value(method)}.{toml_value(partition)}]")
            lines += [f"{toml_value(k)} = {toml_value(v)}" for k, v in values.items()]
    for trial in trials:
        lines.append("\n[[trial]]")
        for key, value in trial.items():
            lines.append(f"{key} = {_inline(value) if isinstance(value, dict) else toml_value(value)}")
    return "\n".join(lines) + "\n"
