"""Which tower moves Novel accuracy? A finished run's final LoRA, one tower at a time.

Every LoRA method (fedlora, feddtl, feddtl-decoupled, feddtl-twostage) saves its final image and text
LoRA in final_lora.safetensors. This script rebuilds each run's federation from its config.toml
(once per federation: runs of one scenario and seed share it), then evaluates four models:
both towers as shipped (zero-shot), the trained image LoRA only, the trained text LoRA only, and
both (which reproduces the run's own results.json). The differences attribute a Novel drop or gain
to the image side, the text side, or their interaction.

Usage:
    python benchmarks/novel_split.py runs/paper-lite/runs/full-path/*/seed0 [--csv out.csv]
Run directories of methods without LoRA (zeroshot, promptfl) are skipped.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from feddtl.algorithm.server import class_embeddings
from feddtl.bench.suite import federation_key
from feddtl.config import load_config
from feddtl.evaluation import evaluate
from feddtl.federation import Federation, build_federation
from feddtl.methods.state import unprefixed

VARIANTS = (("shipped", False, False), ("image LoRA only", True, False), ("text LoRA only", False, True), ("both", True, True))


def split_lora(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """final_lora.safetensors -> (image LoRA, text LoRA), without their "image." / "text." prefixes."""
    tensors = load_file(str(path))
    return unprefixed(tensors, "image"), unprefixed(tensors, "text")


def evaluate_variants(fed: Federation, image: dict[str, torch.Tensor], text: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    shipped_image, shipped_text = fed.backbone.image_lora_state(), fed.backbone.text_lora_state()
    rows = []
    try:
        for name, use_image, use_text in VARIANTS:
            fed.backbone.load_image_lora(image if use_image else shipped_image)
            fed.backbone.load_text_lora(text if use_text else shipped_text)
            base_T, novel_T = class_embeddings(fed.backbone, fed.base_text), class_embeddings(fed.backbone, fed.novel_text)
            result = evaluate(fed.backbone, fed.eval_set, base_T, novel_T, fed.config.eval.batch_size)
            rows.append({"variant": name, **{k: result[k] for k in ("base_acc", "novel_acc", "hm", "local_acc")}})
    finally:
        fed.backbone.load_image_lora(shipped_image)
        fed.backbone.load_text_lora(shipped_text)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="finished run directories (config.toml + final_lora.safetensors)")
    parser.add_argument("--csv", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    runs = []
    for d in args.run_dirs:
        if not (d / "final_lora.safetensors").is_file() or not (d / "config.toml").is_file():
            print(f"skip {d}: no final_lora.safetensors / config.toml", file=sys.stderr)
            continue
        config = load_config(str(d / "config.toml"))
        image, text = split_lora(d / "final_lora.safetensors")
        if not image and not text:
            print(f"skip {d}: {config.method} trains no LoRA", file=sys.stderr)
            continue
        runs.append((d, config, image, text))
    if not runs:
        print("no LoRA runs to evaluate", file=sys.stderr)
        return 2
    runs.sort(key=lambda r: federation_key(r[1]))  # build each federation once
    fed, key, out = None, None, []
    print("| run | method | variant | Base | Novel | HM | Local | run's own HM |")
    print("|---|---|---|---|---|---|---|---|")
    for d, config, image, text in runs:
        if fed is None or federation_key(config) != key:
            fed, key = build_federation(config, log_fn=lambda s: print(s, file=sys.stderr)), federation_key(config)
        own = json.loads((d / "results.json").read_text()) if (d / "results.json").is_file() else {}
        for row in evaluate_variants(fed, image, text):
            row = {"run": str(d), "method": config.method, **row}
            out.append(row)
            print(
                f"| {d} | {config.method} | {row['variant']} | {row['base_acc']:.2f} | {row['novel_acc']:.2f} | "
                f"{row['hm']:.2f} | {row['local_acc']:.2f} | {own.get('hm', float('nan')):.2f} |",
                flush=True,
            )
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(out[0]))
            writer.writeheader()
            writer.writerows(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
