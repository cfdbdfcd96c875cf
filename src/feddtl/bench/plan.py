"""What a suite will read or fetch, and what this machine lacks: the preflight and `feddtl bench --dry-run`.

Every distinct dataset, class-names file and backbone of the suite's cells is checked once:

- a local path (a save_to_disk folder, parquet files, an image folder, a CLIP folder): it must exist and hold
  what the loader reads;
- a Hugging Face Hub id: the hub is asked whether the repository exists (``HfApi.repo_info``, a 10 s timeout;
  after the first connection failure the other ids are not asked again). With ``HF_HUB_OFFLINE=1`` nothing is
  asked: a hub-only data set is missing, CLIP weights count when they are in the local Hugging Face cache.

The preflight of a real run raises SuiteError listing every problem before any work; the dry run prints the
same findings as a table, cell by cell, and returns normally.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from feddtl.bench.errors import SuiteError
from feddtl.bench.sources import Source
from feddtl.bench.suite import Cell, Suite, is_finished
from feddtl.config import ExperimentConfig
from feddtl.data.class_names import PRESET_PREFIX, preset_class_names, resolve_class_names_path
from feddtl.data.hf import local_hf_format

HUB_TIMEOUT_S = 10.0


@dataclass
class Check:
    """One thing a cell needs: what it reads or fetches, and what is wrong with it here (None: nothing)."""

    what: str
    """e.g. "read /data/eurosat (save_to_disk)" or "fetch uoft-cs/cifar10 from the hub"."""
    short: str
    """The table's column: "local /data/eurosat" or "hub uoft-cs/cifar10"."""
    problem: str | None = None
    names_problem: str | None = None
    """A missing class-names file (also in ``problem``)."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


class HubProbe:
    """Asks the Hugging Face Hub whether repositories exist, once per id; remembers an unreachable hub."""

    def __init__(self, query: Callable[[str, str], None] | None = None) -> None:
        self._query = query or _repo_info
        self._answers: dict[tuple[str, str], str | None] = {}
        self.unreachable: str | None = None

    def problem(self, repo_type: str, repo_id: str) -> str | None:
        """None if ``repo_id`` (a "model" or "dataset") can be fetched from here, else why not."""
        if _offline():
            return "HF_HUB_OFFLINE=1: nothing is fetched from the hub"
        if self.unreachable is not None:
            return f"the hub is not reachable from here ({self.unreachable})"
        key = (repo_type, repo_id)
        if key not in self._answers:
            from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

            try:
                self._query(repo_type, repo_id)
                answer = None
            except GatedRepoError:
                answer = f"{repo_id} is gated on the hub: accept its terms there and log in (hf auth login)"
            except RepositoryNotFoundError:
                answer = f"the hub has no {repo_type} {repo_id!r} (or it is private)"
            except Exception as err:  # connection errors of httpx/requests, timeouts, HTTP 5xx
                self.unreachable = _first_line(err)
                return f"the hub is not reachable from here ({self.unreachable})"
            self._answers[key] = answer
        return self._answers[key]


def _repo_info(repo_type: str, repo_id: str) -> None:
    from huggingface_hub import HfApi

    HfApi().repo_info(repo_id, repo_type=repo_type, timeout=HUB_TIMEOUT_S)


def _is_path(text: str) -> bool:
    return text.startswith(("/", ".", "~")) or "\\" in text or Path(text).expanduser().exists()


def check_dataset(config: ExperimentConfig, probe: HubProbe) -> Check:
    """What the cell's dataset reads or fetches (and its class-names file), and what is missing here."""
    name = config.dataset
    check = _dataset_source(name, config, probe)
    names = config.data.class_names_file
    if names is not None:
        file = resolve_class_names_path(names)
        check.what += f", class names {names}"
        if not file.is_file():
            shipped = f" (shipped: {', '.join(preset_class_names())})" if names.startswith(PRESET_PREFIX) else ""
            check.names_problem = f"class names file {file} (data.class_names_file = {names!r}) does not exist{shipped}"
            check.problem = "; ".join(p for p in (check.problem, check.names_problem) if p)
    return check


def _dataset_source(name: str, config: ExperimentConfig, probe: HubProbe) -> Check:
    if name.startswith("hf:"):
        spec = name[len("hf:") :]
        path = Path(spec).expanduser()
        if _is_path(spec):
            fmt = local_hf_format(path)
            if fmt is None:
                why = "does not exist" if not path.exists() else "holds no save_to_disk dataset or parquet files"
                return Check(f"read {path}", f"local {path}", f"data set {path} ({name}) {why}")
            return Check(f"read {path} ({fmt})", f"local {path}")
        return Check(
            f"fetch {spec} from the Hugging Face Hub (needs network)", f"hub {spec}",
            _prefixed(f"data set {spec} (hub)", probe.problem("dataset", spec)),
        )
    for prefix in ("imagefolder:", "imagefolder-domains:"):
        if name.startswith(prefix):
            folder = Path(name[len(prefix) :]).expanduser()
            kind = "image folder, one sub-folder per domain" if prefix == "imagefolder-domains:" else "image folder"
            problem = None if folder.is_dir() else f"dataset folder {folder} (for {name}) does not exist"
            return Check(f"read {folder} ({kind})", f"local {folder}", problem)
    if name == "fashion-mnist":
        folder = Path(config.data.fashion_mnist_dir).expanduser()
        problem = None
        if not (folder / "train-images-idx3-ubyte.gz").is_file():
            problem = f"Fashion-MNIST files under {folder} (apt-get install dataset-fashion-mnist)"
        return Check(f"read {folder} (Fashion-MNIST idx files)", f"local {folder}", problem)
    return Check(f"{name} (shipped with a dependency)", name)


def check_backbone(spec: str, probe: HubProbe) -> Check:
    """What the backbone reads or fetches, and what is missing here."""
    if not spec.startswith("hf-clip:"):
        return Check(f"{spec} (shipped with a dependency)", spec)
    where = spec[len("hf-clip:") :]
    path = Path(where).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            return Check(f"read {path}", f"local {path}",
                         f"CLIP weights: {path} has no config.json (expected a CLIPModel saved with save_pretrained)")
        return Check(f"read {path} (CLIPModel folder)", f"local {path}")
    if _is_path(where) or "/" not in where:
        return Check(f"read {where}", f"local {where}",
                     f"CLIP weights: {where} is not a directory (pass a local CLIP folder saved with save_pretrained)")
    if _in_hub_cache(where):
        return Check(f"read {where} from the Hugging Face cache", f"hub {where} (cached)")
    problem = probe.problem("model", where)
    return Check(
        f"fetch {where} from the Hugging Face Hub (needs network)", f"hub {where}",
        _prefixed(f"CLIP weights {where} (hub, not in the local cache)", problem),
    )


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an unreadable cache counts as no cache
        return False


def _prefixed(what: str, problem: str | None) -> str | None:
    return None if problem is None else f"{what}: {problem}"


@dataclass
class CellPlan:
    cell: Cell
    dataset: Check
    backbone: Check
    finished: bool = False

    @property
    def problems(self) -> list[str]:
        return [p for p in (self.backbone.problem, self.dataset.problem) if p]

    @property
    def status(self) -> str:
        if self.finished:
            return "finished"
        missing = [what for what, c in (("data", self.dataset), ("weights", self.backbone)) if c.problem]
        return "ok" if not missing else "missing " + ", ".join(missing)


@dataclass
class Plan:
    suite: Suite
    cells: list[CellPlan]
    problems: list[str] = field(default_factory=list)
    """Every distinct problem, in the order found (environment variables first)."""


def make_plan(suite: Suite, cells: list[Cell], out: Path | None = None, probe: HubProbe | None = None) -> Plan:
    """Check every cell's data set and backbone (each distinct one once); ``out``: mark finished cells."""
    probe = probe or HubProbe()
    problems = [f"environment variable {v} is not set" for v in suite.missing_env]
    sources = {s.spec: s for s in (suite.clip, *suite.datasets.values()) if s is not None}
    data_checks: dict[tuple[str, str | None], Check] = {}
    weight_checks: dict[str, Check] = {}
    planned = []
    for cell in cells:
        cfg = cell.config
        if cfg.backbone not in weight_checks:
            weight_checks[cfg.backbone] = _with_source(check_backbone(cfg.backbone, probe), sources.get(cfg.backbone))
        key = (cfg.dataset, cfg.data.class_names_file)
        if key not in data_checks:
            data_checks[key] = _with_source(check_dataset(cfg, probe), sources.get(cfg.dataset))
        item = CellPlan(cell, data_checks[key], weight_checks[cfg.backbone])
        item.finished = out is not None and is_finished(cell, out)
        planned.append(item)
        for problem in item.problems:
            if problem not in problems:
                problems.append(problem)
    return Plan(suite, planned, problems)


def _with_source(check: Check, source: Source | None) -> Check:
    """A check of a suite source's spec, worded with what the source table knows: why its local copy is not
    used (a problem found at load time replaces the plain one) and where a local copy would go."""
    if source is None or check.problem is None:
        return check
    if source.problem is not None:
        check.problem = "; ".join(p for p in (source.problem, check.names_problem) if p)
    elif source.origin == "hub" and source.local is not None:
        env = f" ({', '.join(source.unset)} not set)" if source.unset else ""
        check.problem += f"; or use a local copy at {source.local}{env}"
    return check


def preflight(suite: Suite, cells: list[Cell] | None = None, probe: HubProbe | None = None) -> None:
    """Raise SuiteError listing every missing environment variable, weight folder, data set and hub id."""
    problems = [f"environment variable {v} is not set" for v in suite.missing_env]
    if not problems:
        problems = make_plan(suite, suite.cells(1) if cells is None else cells, probe=probe).problems
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise SuiteError(
            f"suite {suite.name!r} cannot run on this machine; missing:\n{lines}\n"
            f"(`feddtl bench --suite {suite.name} --dry-run` shows what every cell reads or fetches)"
        )


def _source_lines(suite: Suite) -> list[str]:
    """The [clip] and [dataset.*] tables as resolved here: which copy is used, and why not the other."""
    lines = []
    used = {sc.dataset for sc in suite.scenarios}  # --scenarios may leave some data sets out
    for source in (suite.clip, *(s for key, s in suite.datasets.items() if key in used)):
        if source is None:
            continue
        if source.origin == "local":
            use = f"local copy {source.where} ({source.detail})"
        elif source.origin == "hub":
            use = f"hub id {source.hub} ({source.detail})"
        else:
            use = f"nothing usable ({source.detail})"
        lines.append(f"  {source.key:<18} {use}")
    return lines


def format_plan(plan: Plan, out: Path | None = None) -> str:
    """The dry run's report: sources, one row per cell, then what is missing."""
    suite, cells = plan.suite, plan.cells
    n_seeds = len(cells) // max(1, len(suite.scenarios) * len(suite.methods))
    lines = [
        f"suite {suite.name}: {len(cells)} cells ({len(suite.scenarios)} scenarios x {len(suite.methods)} methods x "
        f"{n_seeds} seeds), base config {suite.base}"
        + (f", --set {' '.join(suite.extra_overrides)}" if suite.extra_overrides else ""),
    ]
    sources = _source_lines(suite)
    if sources:
        lines += ["", "sources (a local copy, when it exists, is used instead of the hub id):", *sources]
    distinct: dict[str, Check] = {}
    for item in cells:
        for check in (item.backbone, item.dataset):
            distinct.setdefault(check.what, check)
    lines += ["", "what the cells read or fetch:"]
    for what, check in distinct.items():
        lines.append(f"  {'ok     ' if check.problem is None else 'MISSING'} {what}")
    rows = [(item.cell.key, item.dataset.short, item.backbone.short, item.status) for item in cells]
    header = ("cell", "data set", "weights", "status")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(3)]
    lines += ["", "  ".join(h.ljust(w) for h, w in zip(header, widths)) + "  status",
              "  ".join("-" * w for w in widths) + "  ------"]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) + f"  {r[3]}" for r in rows]
    runnable = sum(not item.problems for item in cells)
    finished = sum(item.finished for item in cells)
    lines.append("")
    if plan.problems:
        lines.append(f"missing here ({len(plan.problems)}):")
        lines += [f"  - {p}" for p in plan.problems]
    else:
        lines.append("nothing is missing here")
    lines.append(
        f"{runnable} of {len(cells)} cells have what they need here"
        + (f"; {finished} are finished in {out}" if out is not None else "")
    )
    return "\n".join(lines)
