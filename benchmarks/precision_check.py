"""float32 against bfloat16 (``precision = "bfloat16"``) on the same seed: accuracies, LoRA weights, time.

Runs the `tiny` preset's federation (sklearn digits, 3 clients, 4 rounds, SFT then RL) with an hf-clip backbone
twice in this process, once per precision, and prints / writes what differs:

    python benchmarks/precision_check.py --device cuda --clip vit-b16 --image-size 224 --json out.json
    python benchmarks/precision_check.py --device cpu --clip tiny --image-size 32 --cpu-autocast   # CPU dry run

``--clip vit-b16``: a random-weight CLIP with ViT-B/16's shape (both towers 12 blocks of width 768, patch 16), so the
timings are those of the paper's backbone; ``tiny``: the 4-block width-32 test CLIP. On a CPU, ``bfloat16`` falls
back to float32 (by design: results.json says "float32"); ``--cpu-autocast`` lets this script run the bfloat16
autocast path on the CPU anyway (torch's CPU autocast), to check the code path where no GPU is at hand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch
from transformers.utils import logging as hf_logging
from safetensors.torch import load_file

import feddtl.federation as federation
from feddtl.backbones.tiny_clip import build_tiny_clip
from feddtl.config import load_config
from feddtl.server.experiment import run_experiment

FIELDS = ("base_acc", "novel_acc", "hm", "local_acc")


def build_clip(kind: str, folder: Path, image_size: int) -> Path:
    if kind == "vit-b16":  # ViT-B/16's towers (random weights; the tokenizer is the tiny byte-level one)
        return build_tiny_clip(folder, image_size=image_size, patch_size=16, hidden_size=768, num_layers=12,
                               num_heads=12, projection_dim=512)
    return build_tiny_clip(folder, image_size=32, patch_size=8)


def run(clip: Path, precision: str, args: argparse.Namespace, out: Path) -> dict:
    config = load_config("tiny", [
        f'backbone="hf-clip:{clip}"', f"device={args.device}", f"precision={precision}",
        f"data.image_size={args.image_size}", f"rounds={args.rounds}", f"client.switch_round={args.rounds // 2}",
        "eval.every=1", f"seed={args.seed}",
    ])
    if args.device == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    results = run_experiment(config, out, progress=False, log_fn=lambda s: None)
    if args.device == "cuda":
        torch.cuda.synchronize()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "precision_asked": precision, "precision_used": results.get("precision", "float32"), "wall_s": time.perf_counter() - started,
        "setup_s": results["setup_s"], "client_s": results.get("time_client_s_total"),
        "server_s": results.get("time_server_s_total"), "eval_s": results.get("time_eval_s_total"),
        **{k: results[k] for k in FIELDS}, "hm_per_round": [r.get("hm") for r in rows if "hm" in r],
        "weights": str(out / "final_lora.safetensors"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--clip", default="vit-b16", choices=["vit-b16", "tiny"])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cpu-autocast", action="store_true", help="on a CPU: run bfloat16 under CPU autocast")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()  # "Loading weights" bars: noise in a log
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if args.cpu_autocast:
        if args.device != "cpu":
            parser.error("--cpu-autocast is for --device cpu")
        real = federation.autocast_dtype
        federation.autocast_dtype = lambda config, device: (
            torch.bfloat16 if config.precision == "bfloat16" else real(config, device)
        )
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"float32 vs bfloat16 on {where}, torch {torch.__version__}: {args.clip} CLIP at {args.image_size} px, "
          f"tiny preset, {args.rounds} rounds, seed {args.seed}" + (" (CPU autocast forced)" if args.cpu_autocast else ""),
          flush=True)
    with tempfile.TemporaryDirectory(prefix="feddtl-precision-") as tmp:
        clip = build_clip(args.clip, Path(tmp) / "clip", args.image_size)
        runs = {p: run(clip, p, args, Path(tmp) / p) for p in ("float32", "bfloat16")}
        a, b = (load_file(runs[p].pop("weights")) for p in ("float32", "bfloat16"))
    lora_max = max(float((a[k] - b[k]).abs().max()) for k in a)
    lora_scale = max(float(a[k].abs().max()) for k in a)
    print(f"{'precision':<20} {'Base':>6} {'Novel':>6} {'HM':>6} {'Local':>6} {'wall s':>7} {'client s':>9} "
          f"{'eval s':>7}  HM per round")
    for r in runs.values():
        asked = r["precision_asked"] + ("" if r["precision_used"] == r["precision_asked"] else f" -> {r['precision_used']}")
        print(f"{asked:<20} {r['base_acc']:>6.2f} {r['novel_acc']:>6.2f} {r['hm']:>6.2f} {r['local_acc']:>6.2f} "
              f"{r['wall_s']:>7.1f} {r['client_s'] or 0:>9.1f} {r['eval_s'] or 0:>7.1f}  "
              + " ".join(f"{h:.1f}" for h in r["hm_per_round"]))
    same = all(runs["float32"][k] == runs["bfloat16"][k] for k in FIELDS)
    print(f"final LoRA weights: max |float32 - bfloat16| = {lora_max:.3g} (largest |weight| {lora_scale:.3g}); "
          f"accuracies {'identical' if same else 'differ'}")
    if args.json:
        args.json.write_text(json.dumps({"device": where, "torch": torch.__version__, "clip": args.clip,
                                         "image_size": args.image_size, "runs": runs, "lora_max_abs_diff": lora_max,
                                         "lora_max_abs": lora_scale, "accuracies_identical": same}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
