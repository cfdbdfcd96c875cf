"""The built wheel is complete: it installs into a fresh environment and runs from outside the repository, offline.

The wheel is built from this checkout (the repository root is found from this file, not from ``feddtl.__file__``,
which may point at another checkout's editable install). The build runs on a copy of the sources in a temporary
folder, so that it leaves no ``build/`` or ``*.egg-info`` in the checkout and a stale ``build/lib`` cannot leak
deleted modules into the wheel.

The fresh environment gets the dependencies without the network: a plain ``.pth`` line lists the site-packages of
the environment running the tests. Python adds that folder to ``sys.path`` but does not process the ``.pth`` files
inside it, so the editable install of feddtl there (``__editable__.feddtl-*.pth``) stays inactive, and
``import feddtl`` in the fresh environment must find the installed wheel.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "feddtl"
PRESETS = {"demo", "paper-clip", "tiny"}  # `feddtl presets` must list at least these
RUN_FILES = ("results.json", "metrics.jsonl", "config.toml", "final_lora.safetensors")
# Top-level files a build may read besides pyproject.toml and src/ (readme, license files, legacy setup files).
BUILD_INPUTS = ("README*", "LICEN[CS]E*", "COPYING*", "NOTICE*", "AUTHORS*", "MANIFEST.in", "setup.py", "setup.cfg")


def _clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without anything that could put another feddtl on the path or reach the network."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env.update(
        PYTHONNOUSERSITE="1",
        PIP_NO_INDEX="1",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PIP_NO_INPUT="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        FLWR_TELEMETRY_ENABLED="0",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
    )
    env.update(extra)
    return env


def _run(args: list, cwd: Path, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    args = [str(a) for a in args]
    proc = subprocess.run(args, check=False, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (
        f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
        f"--- stderr\n{proc.stderr[-4000:]}"
    )
    return proc


def _build_wheel(tmp: Path) -> Path:
    # `make install` installs the test extra, which asks for setuptools>=77 (the `license` expression needs 77).
    try:
        version = importlib.metadata.version("setuptools")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("building the wheel needs setuptools>=77 in the test environment: `make install` puts it there")
    assert tuple(int(x) for x in version.split(".")[:2]) >= (77, 0), f"setuptools {version} < 77"
    src = tmp / "src-copy"
    src.mkdir()
    shutil.copy2(REPO / "pyproject.toml", src)
    for pattern in BUILD_INPUTS:
        for path in REPO.glob(pattern):
            if path.is_file():
                shutil.copy2(path, src)
    shutil.copytree(REPO / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc"))
    dist = tmp / "dist"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    _run([*pip_wheel, "-w", dist, src], cwd=tmp, env=_clean_env())
    wheels = list(dist.glob("feddtl-*.whl"))
    assert len(wheels) == 1, f"expected one feddtl wheel, found {wheels}"
    return wheels[0]


def _check_wheel_contents(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    tops = {PurePosixPath(n).parts[0] for n in names}
    dist_info = {t for t in tops if t.endswith(".dist-info")}
    assert len(dist_info) == 1 and next(iter(dist_info)).startswith("feddtl-"), tops
    assert tops - dist_info == {"feddtl"}, f"the wheel holds files outside feddtl/: {sorted(tops - dist_info)}"
    for name in names:
        parts = PurePosixPath(name).parts
        assert not {"tests", "benchmarks", "docs", ".ci", "__pycache__"} & set(parts), f"repository-only file {name}"
        assert not name.endswith((".pyc", ".fab")), f"build leftover {name}"

    expected = [p.relative_to(PACKAGE.parent).as_posix() for p in (PACKAGE / "presets").rglob("*.toml")]
    assert {"feddtl/presets/" + f"{p}.toml" for p in PRESETS} <= set(expected)
    assert any(e.startswith("feddtl/presets/suites/") for e in expected)
    expected.append("feddtl/backbones/imagenet_classnames.txt")
    class_names = [p.relative_to(PACKAGE.parent).as_posix() for p in (PACKAGE / "presets" / "class_names").glob("*.txt")]
    assert "feddtl/presets/class_names/eurosat.txt" in class_names  # the CoOp-style files the paper-clip suite uses
    expected += class_names
    sources = [p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts]
    expected += [p.relative_to(PACKAGE.parent).as_posix() for p in sources]
    missing = sorted(set(expected) - names)
    assert not missing, f"the wheel lacks {missing}"


def _deps_dirs() -> list[Path]:
    """Where the dependencies of the test environment are installed."""
    paths = sysconfig.get_paths()
    return list(dict.fromkeys(Path(paths[k]).resolve() for k in ("purelib", "platlib")))


def _fresh_venv(tmp: Path) -> Path:
    """A venv without pip or feddtl that sees this environment's packages (pip included) through a plain .pth line."""
    env_dir = tmp / "fresh-venv"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env_dir)
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = Path(
        _run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp, env=_clean_env()
        ).stdout.strip()
    )
    deps = _deps_dirs()
    assert site.resolve() not in deps
    (site / "_feddtl_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    return python


def _probe(python: Path, cwd: Path) -> dict:
    code = (
        "import json, sys, importlib.util; spec = importlib.util.find_spec('feddtl'); "
        "hooks = sorted(m for m in sys.modules if m.startswith('__editable__')); "
        "print(json.dumps({'path': sys.path, 'feddtl': spec.origin if spec else None, 'hooks': hooks}))"
    )
    return json.loads(_run([python, "-c", code], cwd=cwd, env=_clean_env()).stdout)


def test_wheel_installs_and_runs_outside_the_repository(tmp_path: Path) -> None:
    wheel = _build_wheel(tmp_path)
    _check_wheel_contents(wheel)

    python = _fresh_venv(tmp_path)
    bindir = python.parent
    work = tmp_path / "elsewhere"  # a working directory outside the repository
    work.mkdir()
    assert REPO not in work.resolve().parents

    # Before the install, the editable install of the test environment must be inactive: no editable finder loaded,
    # and feddtl not importable (or, if the test environment holds a regular install, only from its site-packages).
    before = _probe(python, work)
    assert not before["hooks"], f"editable-install hooks active in the fresh venv: {before['hooks']}"
    assert before["feddtl"] is None or set(_deps_dirs()) & set(Path(before["feddtl"]).resolve().parents), (
        f"feddtl importable in the fresh venv from {before['feddtl']} before the wheel is installed"
    )

    _run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel],
        cwd=work,
        env=_clean_env(),
    )
    after = _probe(python, work)
    assert not after["hooks"], after["hooks"]
    origin = Path(after["feddtl"]).resolve()
    prefix = python.parent.parent.resolve()
    assert prefix in origin.parents, f"feddtl comes from {origin}, not from the wheel installed under {prefix}"
    feddtl_file = _run([python, "-c", "import feddtl; print(feddtl.__file__)"], cwd=work, env=_clean_env()).stdout
    assert prefix in Path(feddtl_file.strip()).resolve().parents

    cli = bindir / ("feddtl.exe" if os.name == "nt" else "feddtl")
    assert cli.exists(), "the wheel's console script was not installed"
    listed = set(_run([cli, "presets"], cwd=work, env=_clean_env()).stdout.split())
    assert PRESETS <= listed, f"`feddtl presets` printed {sorted(listed)}"
    # the paper's grid resolves from the installed package: its class-name files are found (offline, the hub ids
    # are listed as missing, the preset:*.txt files are not)
    plan = _run([cli, "bench", "--suite", "paper-clip", "--dry-run"], cwd=work, env=_clean_env()).stdout
    assert "class names preset:eurosat.txt" in plan and "class names file" not in plan

    out = tmp_path / "run"
    _run([cli, "run", "--config", "tiny", "--out", out, "--quiet"], cwd=work, env=_clean_env(), timeout=600)
    for name in RUN_FILES:
        assert (out / name).is_file(), f"{name} missing from {sorted(p.name for p in out.iterdir())}"
    assert json.loads((out / "results.json").read_text())
