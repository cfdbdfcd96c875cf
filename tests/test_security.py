"""Nothing is unpickled: every torch.load passes weights_only=True, and no module imports pickle."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "feddtl"


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _is_torch_load(call: ast.Call) -> bool:
    f = call.func
    return isinstance(f, ast.Attribute) and f.attr == "load" and isinstance(f.value, ast.Name) and f.value.id == "torch"


def test_every_torch_load_is_weights_only():
    offenders = []
    for path in SRC.rglob("*.py"):
        for call in _calls(ast.parse(path.read_text())):
            if _is_torch_load(call):
                kw = {k.arg: k.value for k in call.keywords}
                value = kw.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    offenders.append(f"{path.relative_to(SRC)}:{call.lineno}")
    assert offenders == [], f"torch.load without weights_only=True: {offenders}"


def test_no_module_imports_pickle():
    unsafe = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    offenders = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            offenders += [f"{path.relative_to(SRC)}:{node.lineno} {n}" for n in names if n in unsafe]
    assert offenders == [], f"modules that can unpickle: {offenders}"
