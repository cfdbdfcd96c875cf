"""Local-training throughput with the frozen-trunk cache vs without it, side by side in one process.

For each backbone (``lite``: EfficientNet-Lite0 + MiniLM; ``vit-b16``: a random-weight CLIP with
ViT-B/16's image tower, loaded through ``HFClipBackbone``) and image size, it times the project's own
SFT step (``feddtl.algorithm.client.sft_epochs``: image tail forward + backward through the LoRA tail,
Adam step) reading trunk features from

- ``cached``: a ``TrunkCache`` in-memory store (trunk run once, beforehand): on CUDA it sits on the device
  (``cache.device_budget_mb``), on a CPU in RAM;
- ``cached_ram`` (CUDA only): the same store kept in RAM (``cache.device_budget_mb = 0``), copied to the
  device batch by batch, as every CUDA run did before the device placement; and
- ``uncached``: a ``PixelStore`` (every step loads the images, resizes, normalises, runs the frozen
  trunk, then the same tail step): what ``cache.enabled = false`` does.

LoRA sits on the backbone's default tail (lite: blocks 14-15 of 16; ViT-B/16: blocks 10-11 of 12,
the paper's l = 10). Images are synthetic 32x32 RGB, resized like the datasets. ``--demo`` also times
``make demo``'s commands end to end (zero-shot reference, FedDTL run, report).

    python benchmarks/cache_speed.py [--quick] [--device cuda] [--demo]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # random weights only: never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np
import torch
import torch.nn.functional as F

from feddtl.algorithm.client import ClientData, sft_epochs
from feddtl.config.client_config import ClientConfig
from feddtl.backbones.base import Backbone
from feddtl.config.lora_config import LoraConfig
from feddtl.cache import CacheConfig, TrunkCache
from feddtl.data import ImageDataset

NUM_CLASSES = 5


def build_backbone(name: str, workdir: Path) -> Backbone:
    """The named backbone with LoRA on its default tail, in eval mode."""
    torch.manual_seed(0)
    if name == "lite":
        from feddtl.backbones.lite import LiteBackbone

        backbone: Backbone = LiteBackbone(image_size=224)
    elif name == "vit-b16":
        from feddtl.backbones.hf_clip import HFClipBackbone
        from feddtl.backbones.tiny_clip import build_tiny_clip

        # ViT-B/16's image tower exactly (width 768, 12 blocks, 12 heads, MLP 3072, patch 16, 224 px);
        # the text tower gets the same width (it plays no part in these timings).
        path = build_tiny_clip(
            workdir / "vit-b16", image_size=224, patch_size=16, hidden_size=768, num_layers=12, num_heads=12,
            projection_dim=512,
        )
        backbone = HFClipBackbone(str(path), image_size=224)
    else:
        raise ValueError(f"unknown backbone {name!r}; allowed: lite, vit-b16")
    backbone.add_lora(LoraConfig())
    return backbone


def synthetic_images(n: int, seed: int = 0) -> ImageDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    return ImageDataset(rng.integers(0, NUM_CLASSES, size=n), [str(c) for c in range(NUM_CLASSES)], images=images)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_images_per_s(
    backbone: Backbone, data: ClientData, batch_size: int, min_time: float, max_steps: int, warmup: int
) -> tuple[float, int]:
    """Images/s of SFT steps over ``data`` (one full batch per step), after ``warmup`` steps."""
    device = next(backbone.parameters()).device
    generator = torch.Generator().manual_seed(0)
    T = F.normalize(torch.randn(NUM_CLASSES, backbone.info.embed_dim, generator=generator), dim=-1)
    params = backbone.image_lora_parameters()
    config = ClientConfig(batch_size=batch_size)

    def step() -> None:  # one epoch over exactly one batch = one optimiser step
        sft_epochs(backbone, data, T, params, 1, config, generator)

    for _ in range(warmup):
        step()
    _sync(device)
    steps, started = 0, time.perf_counter()
    while steps < max_steps and (steps == 0 or time.perf_counter() - started < min_time):
        step()
        steps += 1
    _sync(device)
    return steps * len(data) / (time.perf_counter() - started), steps


def measure(
    backbone: Backbone,
    size: int,
    batch_size: int,
    workdir: Path,
    min_time: float = 8.0,
    max_steps: int = 200,
    repeats: int = 3,
) -> dict[str, float | int]:
    """Cached vs uncached images/s at one image size, plus the one-off trunk (cache fill) rate.

    The two modes take turns ``repeats`` times (one warm-up step each before the first turn; a turn
    runs steps until ``min_time / repeats`` seconds or ``max_steps`` have passed); each mode's best
    turn counts, so other processes that share the CPU for a while bias neither side.
    """
    device = next(backbone.parameters()).device
    dataset = synthetic_images(batch_size)
    indices = np.arange(batch_size)
    labels = torch.from_numpy(dataset.labels)
    out: dict[str, float | int] = {}
    caches, data = {}, {}
    modes = ("cached", "cached_ram", "uncached") if device.type == "cuda" else ("cached", "uncached")
    for mode in modes:
        caches[mode] = TrunkCache(
            CacheConfig(enabled=mode != "uncached", batch_size=batch_size,
                        device_budget_mb=0.0 if mode == "cached_ram" else None),
            backbone, size, run_dir=workdir, log_fn=lambda s: None,
        )
        if mode == "cached":  # a first, untimed fill warms the trunk up (kernel choice, allocations)
            caches[mode].store("warm-up", dataset, indices)
        _sync(device)
        started = time.perf_counter()
        features = caches[mode].store("bench", dataset, indices)
        _sync(device)
        if mode == "cached":
            out["fill_img_s"] = batch_size / (time.perf_counter() - started)
        data[mode] = ClientData(client_id=0, features=features, labels=labels)
    for mode in data:
        out[f"{mode}_img_s"], out[f"{mode}_steps"] = 0.0, 0
    for turn in range(repeats):
        for mode in data:
            rate, steps = train_images_per_s(
                backbone, data[mode], batch_size, min_time=min_time / repeats, max_steps=max_steps,
                warmup=1 if turn == 0 else 0,
            )
            out[f"{mode}_img_s"] = max(out[f"{mode}_img_s"], rate)
            out[f"{mode}_steps"] += steps
    for cache in caches.values():
        cache.close()
    out["ratio"] = out["cached_img_s"] / out["uncached_img_s"]
    return out


def time_demo(workdir: Path, uncached: bool = False) -> dict[str, float]:
    """Wall time of `make demo`'s three commands (installation excluded), each in a fresh process.

    ``uncached``: also time the FedDTL run again with ``cache.enabled=false`` (not part of the total).
    """
    exe = [sys.executable, "-m", "feddtl"]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    zs, fd = workdir / "demo" / "zeroshot", workdir / "demo" / "feddtl"
    steps = [
        ("zeroshot", exe + ["run", "--config", "demo", "--set", "method=zeroshot", "--out", str(zs), "--quiet"]),
        ("feddtl", exe + ["run", "--config", "demo", "--out", str(fd), "--quiet"]),
        ("report", exe + ["report", str(zs), str(fd)]),
    ]
    if uncached:
        off = workdir / "demo" / "feddtl-uncached"
        steps.append(
            ("feddtl_uncached", exe + ["run", "--config", "demo", "--set", "cache.enabled=false", "--out", str(off),
                                       "--quiet"])
        )
    times: dict[str, float] = {}
    for name, cmd in steps:
        started = time.perf_counter()
        subprocess.run(cmd, check=True, env=env)
        times[f"demo_{name}_s"] = time.perf_counter() - started
    times["demo_total_s"] = sum(times[f"demo_{n}_s"] for n in ("zeroshot", "feddtl", "report"))
    results = json.loads((fd / "results.json").read_text())
    for key in ("upload_per_client_round_bytes", "upload_fraction_of_backbone", "backbone_param_bytes", "wall_s",
                "setup_s", "time_client_s_total", "time_server_s_total", "time_eval_s_total", "peak_rss_mb"):
        times[f"feddtl_{key}"] = results[key]
    return times


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--quick", action="store_true", help="fewer timed steps (about 2 s per cell)")
    parser.add_argument("--backbones", default="lite,vit-b16", help="comma list of lite, vit-b16")
    parser.add_argument("--sizes", default="96,224", help="comma list of image sizes")
    parser.add_argument("--batch-size", type=int, default=None, help="images per step (default: 64 lite, 32 vit-b16)")
    parser.add_argument("--repeats", type=int, default=3, help="turns per mode and cell; the best turn counts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--demo", action="store_true", help="also time the demo preset end to end")
    parser.add_argument("--demo-uncached", action="store_true", help="with --demo: also time its FedDTL run uncached")
    parser.add_argument("--no-speed", action="store_true", help="skip the img/s table (e.g. only --demo)")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this JSON file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    names = [] if args.no_speed else [b.strip() for b in args.backbones.split(",") if b.strip()]
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"feddtl trunk-cache benchmark on {where}, torch {torch.__version__}{' (quick)' if args.quick else ''}; "
          f"load average {_load()} (other processes on the CPUs slow these timings down)")
    header = f"{'backbone':<8} {'px':>4} {'tail':>7} {'batch':>5} {'cached img/s':>13} {'uncached img/s':>15} " \
             f"{'ratio':>7} {'fill img/s':>11} {'RAM-cached img/s':>17}"
    rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="feddtl-bench-") as tmp:
        workdir = Path(tmp)
        print(header)
        for name in names:
            backbone = build_backbone(name, workdir).to(device)
            info = backbone.info
            tail = f"{backbone.image_start_block}-{info.num_image_blocks - 1}/{info.num_image_blocks}"
            batch = args.batch_size or (64 if name == "lite" else 32)
            for size in sizes:
                r = measure(backbone, size, batch, workdir, repeats=args.repeats,
                            **(dict(min_time=2.0, max_steps=20) if args.quick else {}))
                rows.append({"backbone": name, "image_size": size, "tail_blocks": tail, "batch_size": batch, **r})
                ram = f"{r['cached_ram_img_s']:>17.1f}" if "cached_ram_img_s" in r else f"{'-':>17}"
                print(
                    f"{name:<8} {size:>4} {tail:>7} {batch:>5} {r['cached_img_s']:>13.1f} {r['uncached_img_s']:>15.1f} "
                    f"{r['ratio']:>6.1f}x {r['fill_img_s']:>11.1f} {ram}",
                    flush=True,
                )
            del backbone
        print(f"(tail: LoRA blocks / image blocks; fill: the one-off trunk pass that fills the cache; RAM-cached "
              f"(CUDA only): the store in RAM, copied to the device per batch; "
              f"{time.perf_counter() - started:.0f} s; load average now {_load()})")
        report: dict = {"device": where, "torch": torch.__version__, "quick": args.quick, "rows": rows}
        if args.demo:
            print("timing the demo preset (zero-shot reference + FedDTL run + report) ...", flush=True)
            demo = time_demo(workdir, uncached=args.demo_uncached)
            report["demo"] = demo
            print(
                f"demo wall time: {demo['demo_total_s']:.0f} s end to end (zero-shot {demo['demo_zeroshot_s']:.0f} s, "
                f"FedDTL {demo['demo_feddtl_s']:.0f} s, report {demo['demo_report_s']:.0f} s); upload per client per "
                f"round {demo['feddtl_upload_per_client_round_bytes'] / 1024:.1f} KiB = "
                f"{100 * demo['feddtl_upload_fraction_of_backbone']:.3f} % of the backbone's "
                f"{demo['feddtl_backbone_param_bytes'] / 2**20:.1f} MiB; load average now {_load()}"
            )
            if args.demo_uncached:
                print(f"FedDTL demo run with cache.enabled=false: {demo['demo_feddtl_uncached_s']:.0f} s "
                      f"({demo['demo_feddtl_uncached_s'] / demo['demo_feddtl_s']:.1f}x the cached run)")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
