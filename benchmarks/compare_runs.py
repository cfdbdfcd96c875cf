"""Are two sets of run folders the same run? For refactors: same config and seed must give the same numbers.

    python benchmarks/compare_runs.py BEFORE AFTER

BEFORE and AFTER are folders of run directories with the same names (e.g. made by running `feddtl run` with
the old and the new code). Per run it compares results.json and metrics.jsonl without the machine fields
(wall time, RSS: ``server.rundir.result_fields``) and final_lora.safetensors byte for byte, and prints
"same" or what differs. Exit 0 when every run is the same.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from feddtl.server.rundir import result_fields

IGNORED = ("feddtl_version", "cache")
"""Also not results: the version string, and the cache layout (placement and sizes on this machine)."""


def _comparable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result_fields(row).items() if k not in IGNORED}


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def compare(before: Path, after: Path) -> list[str]:
    """What differs between the two run folders (empty: the same)."""
    out = []
    a, b = (_comparable(json.loads((d / "results.json").read_text())) for d in (before, after))
    out += [f"results.json {k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    rows = [[_comparable(json.loads(line)) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (before, after)]
    if len(rows[0]) != len(rows[1]):
        out.append(f"metrics.jsonl: {len(rows[0])} rows -> {len(rows[1])}")
    for ra, rb in zip(*rows):
        keys = sorted(k for k in set(ra) | set(rb) if ra.get(k) != rb.get(k))
        if keys:
            out.append(f"metrics.jsonl round {ra.get('round')}: {', '.join(keys)}")
    if _digest(before / "final_lora.safetensors") != _digest(after / "final_lora.safetensors"):
        out.append("final_lora.safetensors bytes differ")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    names = sorted(p.name for p in args.before.iterdir() if (p / "results.json").is_file())
    if not names:
        print(f"no finished runs in {args.before}", file=sys.stderr)
        return 2
    same = True
    for name in names:
        if not (args.after / name / "results.json").is_file():
            print(f"{name}: missing in {args.after}")
            same = False
            continue
        diffs = compare(args.before / name, args.after / name)
        same &= not diffs
        print(f"{name}: same" if not diffs else f"{name}: differs\n  " + "\n  ".join(diffs))
    print("all the same" if same else "differences found")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
