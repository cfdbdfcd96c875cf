"""Imports point down only: the layer order of the package, and no two modules that import each other.

Every import counts, also those inside functions and under ``if TYPE_CHECKING`` (a lazy import hides an
upward dependency, it does not remove it). A module may import its own top-level package and any
package of a lower layer, never one of its own layer or above.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "feddtl"

LAYERS: list[tuple[str, ...]] = [
    ("feddtl.__main__",),  # python -m feddtl
    ("feddtl.cli",),  # the command line
    ("feddtl.bench", "feddtl.flower", "feddtl.export"),  # benchmark suites; the Flower ServerApp / ClientApp; export, predict
    ("feddtl.server",),  # the engine-neutral round loop, robust round, checkpoints, run directory
    ("feddtl.methods", "feddtl.federation", "feddtl.reporting"),  # methods; building clients; tables/plots
    ("feddtl.evaluation",),  # Base / Novel / HM / Local
    ("feddtl.algorithm",),  # FedDTL: client step, server step, GRPO loss, aggregation
    ("feddtl.cache",),  # the frozen-trunk cache (runs backbones over datasets)
    ("feddtl.backbones", "feddtl.data"),
    ("feddtl.config",),  # the typed config: imports nothing else of feddtl
    ("feddtl",),  # the root package: version only
]
"""Top to bottom. Listed under a layer: a top-level sub-package or module of feddtl."""


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported feddtl module, line) for every import statement of the module ``name``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [f"{target}.{alias.name}" for alias in node.names] + [target]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # "from pkg import name": name may be a module or not
                target = target.rpartition(".")[0]
            if target:
                found.append((target, node.lineno))
                break
    return found


def _top(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def _layer(module: str) -> int:
    top = _top(module)
    for i, members in enumerate(LAYERS):
        if top in members:
            return i
    raise AssertionError(f"{top} is in no layer of LAYERS: add it where it belongs")


def test_every_import_points_down() -> None:
    modules = _modules()
    upward = []
    for name, path in sorted(modules.items()):
        for target, line in _imports(name, path, modules):
            if _top(target) == _top(name):
                continue
            if _layer(target) <= _layer(name):
                upward.append(f"{path.relative_to(SRC.parent)}:{line} {name} imports {target}")
    assert not upward, "imports that do not point down (see LAYERS):\n" + "\n".join(upward)


def test_no_modules_import_each_other() -> None:
    modules = _modules()
    graph = {name: {t for t, _ in _imports(name, path, modules)} - {name} for name, path in modules.items()}
    # A package's __init__ re-exporting its own modules is not a cycle between files.
    for name in graph:
        if modules[name].name == "__init__.py":
            graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "modules that import each other:\n" + "\n".join(cycles)


def test_every_package_sits_in_exactly_one_layer() -> None:
    tops = {_top(m) for m in _modules()}
    listed = [t for layer in LAYERS for t in layer]
    assert len(listed) == len(set(listed)), "a package is listed twice"
    assert tops == set(listed), f"in no layer: {sorted(tops - set(listed))}; gone: {sorted(set(listed) - tops)}"
