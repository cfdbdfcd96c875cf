"""The `feddtl` command line: run an experiment, list methods and presets, tabulate results, export the
tuned model and classify images with it."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from feddtl.config import ConfigError, ExperimentConfig, available_presets, load_config


def _check_run_args(args: argparse.Namespace) -> None:
    """The combinations of `feddtl run` options that make no sense, refused before anything is read."""
    if args.resume is None:
        if args.restart:
            raise ConfigError("--restart goes with --resume DIR (a run with --out always starts at round 1)")
        if args.out is None:
            raise ConfigError("feddtl run needs --out DIR (or --resume DIR to continue a stopped run)")
        return
    if args.config is not None:
        raise ConfigError("--config cannot be combined with --resume: a resumed run keeps the config.toml of its directory")
    if args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
        raise ConfigError("--out must be left out with --resume (the run continues in its own directory)")


def _run_target(args: argparse.Namespace) -> tuple[ExperimentConfig, str]:
    """(config, run directory) of `feddtl run`: fresh, resumed, or restarted (``--resume DIR --restart``)."""
    if args.resume is None:
        return load_config(args.config, args.set or []), args.out
    from feddtl.server.checkpoint import load_run_config  # imports torch: resumed runs only

    return load_run_config(args.resume, args.set or []), args.resume


_HF_QUIET_ENV = {"HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}
"""The same switches for the processes a run starts (Flower's simulation workers), read at their import."""


@contextlib.contextmanager
def _quiet_hf() -> Iterator[None]:
    """transformers' and huggingface_hub's progress bars ("Loading weights" when a backbone is built,
    downloads) and their info and warning logs off inside the block; all put back after (tests call main)."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    bars, hub_bars_off = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    verbosity = hf_logging.get_verbosity()
    env = {key: os.environ.get(key) for key in _HF_QUIET_ENV}
    os.environ.update(_HF_QUIET_ENV)
    hf_logging.disable_progress_bar()  # transformers' bars and huggingface_hub's
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        # The environment first: huggingface_hub keeps its bars off while its variable is set.
        for key, value in env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        hf_logging.set_verbosity(verbosity)
        (hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)()
        if hub_utils.are_progress_bars_disabled() != hub_bars_off:
            (hub_utils.disable_progress_bars if hub_bars_off else hub_utils.enable_progress_bars)()


def _summary(results: dict) -> str:
    on = " on the validation hold-out" if results.get("eval_on") == "validation" else ""
    return (
        f"{results['method']} on {results['dataset']} ({results['partition']}, {results['rounds']} rounds){on}: "
        f"Base {results['base_acc']:.2f}  Novel {results['novel_acc']:.2f}  HM {results['hm']:.2f}  "
        f"Local {results['local_acc']:.2f}"
    )


def _cmd_run(args: argparse.Namespace) -> int:
    # A fresh run's config is read and validated before anything heavy is imported: a bad key is reported
    # in a fraction of a second instead of after torch, transformers and the server code loaded (7-18 s).
    try:
        _check_run_args(args)
        fresh = _run_target(args) if args.resume is None else None
    except ConfigError as exc:
        print(f"feddtl: config error: {exc}", file=sys.stderr)
        return 2
    from feddtl.backbones.base import BackboneError
    from feddtl.server.checkpoint import CheckpointError
    from feddtl.data import DatasetError
    from feddtl.federation import check_image_size
    from feddtl.server.experiment import run_experiment
    from feddtl.server.robust import RoundFailed
    from feddtl.server.rundir import RunDir, RunDirError, read_results
    from feddtl.server.stop import RunStopped, StopRequest, stop_on_signals

    try:
        if args.resume is not None and not args.restart:
            # A finished run is reported and left alone, whatever engine wrote it: resuming it would
            # only rewrite its results (and relabel their engine).
            finished = read_results(args.resume)
            if finished is not None:
                print(
                    f"{args.resume} is finished ({_summary(finished)}; engine {finished.get('engine')}): nothing "
                    f"to resume, nothing changed. `feddtl run --resume {args.resume} --restart` runs it again"
                )
                return 0
        config, out = fresh or _run_target(args)
        check_image_size(config)  # every engine: before the Flower simulation starts, too
        RunDir(out)  # --out at a file, below one or where nothing can be written: one line, before the setup
    except ConfigError as exc:
        print(f"feddtl: config error: {exc}", file=sys.stderr)
        return 2
    except RunDirError as exc:
        print(f"feddtl: {exc}", file=sys.stderr)
        return 2
    log = (lambda s: None) if args.quiet else (lambda s: print(s, flush=True))
    # --restart is a fresh run into the directory: its config.toml, round 1, the earlier state replaced
    resume = args.resume is not None and not args.restart
    try:
        with _quiet_hf() if args.quiet else contextlib.nullcontext():
            if args.engine == "flower-sim":
                if resume:
                    raise ConfigError(
                        "--resume works with --engine inprocess only (--resume DIR --restart may use flower-sim)"
                    )
                from feddtl.flower.simulation import run_flower_simulation

                results = run_flower_simulation(config, out, log_fn=log)
            else:
                with stop_on_signals(StopRequest()) as stop:
                    results = run_experiment(
                        config, out, progress=not args.quiet, log_fn=log, resume=resume, stop=stop
                    )
    except RoundFailed as exc:
        print(
            f"feddtl: {exc}. The run stopped with a checkpoint after round {exc.round - 1}; continue it with "
            f"`feddtl run --resume {out}` (robustness.* and faults.* may be changed with --set)",
            file=sys.stderr,
        )
        return 3
    except RunStopped as exc:
        print(f"feddtl: {exc.reason} received: stopped at round {exc.round}; resume with `feddtl run --resume {out}`",
              file=sys.stderr)
        return 3
    except KeyboardInterrupt:  # a second Ctrl-C: stopped at once, like a kill
        print(f"\nfeddtl: interrupted; `feddtl run --resume {out}` continues from the last checkpoint", file=sys.stderr)
        return 130
    except (ConfigError, DatasetError, BackboneError, CheckpointError, RunDirError) as exc:
        print(f"feddtl: {exc}", file=sys.stderr)
        return 2
    print(f"{_summary(results)}  [{results['wall_s']:.0f} s] -> {out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from feddtl.reporting.table import load_results, results_table

    rows, skipped = load_results([Path(d) for d in args.dirs])
    for folder, why in skipped:
        print(f"feddtl report: skipping {folder}: {why}", file=sys.stderr)
    if not rows:
        print(
            f"feddtl report: nothing to report: none of the {len(args.dirs)} folder(s) given holds a finished run "
            "(a results.json)",
            file=sys.stderr,
        )
        return 2
    print(results_table(rows))
    return 0


def _cmd_flower_certs(args: argparse.Namespace) -> int:
    from feddtl.flower.certs import write_dev_pki

    try:
        paths = write_dev_pki(Path(args.dir), nodes=args.nodes, hosts=args.host)
    except (ValueError, FileExistsError) as exc:
        print(f"feddtl: {exc}", file=sys.stderr)
        return 2
    for what, path in paths.items():
        print(f"{what:<16} {path}")
    return 0


def _node_cache(args: argparse.Namespace):
    from feddtl.cache.node_cache import NodeCache
    from feddtl.config.node_cache_config import NodeCacheConfig

    settings = NodeCacheConfig(dir=args.dir)
    return NodeCache(settings.folder(), settings.max_bytes)


def _cmd_cache_ls(args: argparse.Namespace) -> int:
    import time

    cache = _node_cache(args)
    entries = cache.entries()
    print(f"node cache {cache.root}: {len(entries)} entries, {sum(e.nbytes for e in entries) / 2**20:.1f} MiB")
    if entries:
        print(f"{'entry':<42} {'MiB':>9}  {'last used':<19}  what")
    for e in reversed(entries):  # most recently used first
        used = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.last_used))
        print(f"{e.name:<42} {e.nbytes / 2**20:>9.2f}  {used:<19}  {_describe_entry(e.kind, e.key)}")
    return 0


def _describe_entry(kind: str, key: dict) -> str:
    """A few words on what a node-cache entry holds (its key has everything; see feddtl.flower.node)."""
    try:
        if kind == "backbone":
            return f"backbone {key['backbone']} (derived tensors)"
        if kind in ("partition", "holdout") and "run_classes" in key:  # a SuperNode's own data
            what = "training images" if kind == "partition" else "test images"
            return f"{key['dataset']}: own data of partition {key['client_id']}, {what} ({len(key['run_classes'])} run classes)"
        if kind == "partition":
            return f"{key['dataset']} partition {key['client_id']} of {key['num_clients']} ({key['partition']}, seed {key['seed']})"
        if kind == "trunk":
            return (
                f"trunk features: {key['backbone']['backbone']} up to block {key['image_start_block']}, "
                f"{key['images']} {key['dataset']} images"
            )
    except (KeyError, TypeError):
        pass
    return kind


def _cmd_cache_clear(args: argparse.Namespace) -> int:
    from feddtl.flower.warm_protocol import stop_workers

    cache = _node_cache(args)
    # First: a warm worker holds the entries' values in memory; once unreachable, the next message starts a
    # fresh one, which reads the cache anew.
    workers = stop_workers(cache.root)
    removed, freed, kept = cache.clear()
    busy = f"; {kept} in use by a running process kept" if kept else ""
    warm = f"; {workers} warm worker(s) stopped" if workers else ""
    print(f"node cache {cache.root}: removed {removed} entries ({freed / 2**20:.1f} MiB){busy}{warm}")
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from feddtl.methods import available_methods

    print("\n".join(available_methods()))
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    print("\n".join(available_presets()))
    return 0


def _csv(text: str | None) -> list[str] | None:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


def _cmd_bench(args: argparse.Namespace) -> int:
    from feddtl.bench.plan import format_plan, make_plan
    from feddtl.bench.runner import run_suite
    from feddtl.bench.suite import SuiteError, load_suite

    if args.out is None and not args.dry_run:
        print("feddtl bench: --out DIR is required (or --dry-run to list the cells and what is missing)", file=sys.stderr)
        return 2
    try:
        suite = load_suite(args.suite, tuned=args.tuned, overrides=args.set or []).select(_csv(args.scenarios), _csv(args.methods))
        if args.dry_run:
            out = None if args.out is None else Path(args.out)
            print(format_plan(make_plan(suite, suite.cells(args.seeds), out=out), out=out))
            return 0
        counts = run_suite(suite, args.out, seeds=args.seeds, jobs=args.jobs, log_fn=lambda s: print(s, flush=True))
    except SuiteError as exc:
        print(f"feddtl bench: {exc}", file=sys.stderr)
        return 2
    print(
        f"suite {suite.name}: {counts['cells']} cells, {counts['finished_before']} already finished, "
        f"{counts['ran']} ran now, {counts['failed']} unfinished -> {Path(args.out) / 'table.md'}"
    )
    return 0 if counts["failed"] == 0 else 1


def _cmd_tune(args: argparse.Namespace) -> int:
    from feddtl.bench.errors import SuiteError
    from feddtl.bench.tune import run_tuning
    from feddtl.bench.tuning import load_tuning_suite

    try:
        tsuite = load_tuning_suite(args.suite)
        counts = run_tuning(tsuite, args.out, jobs=args.jobs, log_fn=lambda s: print(s, flush=True))
    except SuiteError as exc:
        print(f"feddtl tune: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if counts["failed"]:
        print(
            f"tuning suite {tsuite.name}: {counts['failed']} of {counts['cells']} cells unfinished (see {out / 'jobs'}); "
            "no tuned.toml written: run the same command again to finish them",
            file=sys.stderr,
        )
        return 1
    print((out / "tuned.md").read_text(), end="")
    print(
        f"tuning suite {tsuite.name}: {counts['cells']} cells, {counts['finished_before']} already finished, "
        f"{counts['ran']} ran now -> {out / 'tuned.toml'}, {out / 'tuned.md'}"
    )
    return 0


def _cmd_bench_report(args: argparse.Namespace) -> int:
    from feddtl.bench.report import write_report

    try:
        written = write_report(args.dir, echo=print)
    except FileNotFoundError as exc:
        print(f"feddtl bench-report: {exc}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in written))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from feddtl.backbones.base import BackboneError
    from feddtl.export import MANIFEST_NAME, ExportError, export_run

    try:
        with _quiet_hf():  # no "Loading weights" / "Writing model shards" bars: the summary line says it all
            manifest = export_run(args.run, args.out, force=args.force, log_fn=lambda s: print(s, file=sys.stderr))
    except (ExportError, ConfigError, BackboneError) as exc:
        print(f"feddtl export: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if manifest["kind"] == "hf-clip":
        adapters = manifest["adapters"]
        contents = "merged CLIPModel + CLIPProcessor" + (
            f", peft adapters {out / adapters['image']} and {out / adapters['text']}" if adapters else ""
        )
    else:
        contents = "lite LoRA + bridge tensors"
    print(f"exported the {manifest['method']} run {args.run} -> {out} ({contents}; {MANIFEST_NAME})")
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from feddtl.backbones.base import BackboneError
    from feddtl.export import ExportError, collect_images, load_tuned_model, parse_classes, predict_to_file

    def warn(message: str) -> None:
        tqdm.write(f"feddtl predict: {message}", file=sys.stderr)  # above the progress bar, not through it

    out = None if args.out is None else Path(args.out)
    try:
        if args.top_k < 1 or args.batch_size < 1:
            raise ExportError(f"--top-k and --batch-size must be >= 1, got {args.top_k} and {args.batch_size}")
        classes = parse_classes(args.classes, args.classes_file)
        files = collect_images(args.images, warn)
        if not files:
            raise ExportError(f"no image files in {' '.join(args.images)}")
        with _quiet_hf():  # our own progress bar is the one that counts images
            model = load_tuned_model(args.model, device=args.device)
            summary = predict_to_file(
                model, files, classes, out, top_k=args.top_k, batch_size=args.batch_size, progress=not args.quiet,
                warn=warn,
            )
    except (ExportError, ConfigError, BackboneError) as exc:
        print(f"feddtl predict: {exc}", file=sys.stderr)
        return 2
    if summary.predicted == 0:
        print(f"feddtl predict: none of the {len(files)} files could be read as an image; no CSV written", file=sys.stderr)
        return 2
    print(
        f"feddtl predict: {summary.predicted} images among {len(classes)} classes with the {model.source}"
        f"{f', {summary.skipped} unreadable skipped' if summary.skipped else ''} -> {out or 'stdout'}",
        file=sys.stderr,
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="feddtl", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run",
        help="run one experiment into a run directory",
        epilog="exit status: 0 done (or already finished, with --resume), 2 bad config / data / checkpoint / run "
        "directory, 3 stopped on failing clients or on SIGTERM / SIGINT (resumable with --resume), 130 a second "
        "Ctrl-C (stopped at once)",
    )
    run.add_argument("--config", default=None, help="TOML file or preset name (see `feddtl presets`)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    run.add_argument("--out", default=None, help="run directory to write")
    run.add_argument(
        "--resume",
        metavar="DIR",
        default=None,
        help="continue the stopped run in DIR from its last checkpoint (its config.toml is used; --set may "
        "change only robustness.*, faults.*, checkpoint.*)",
    )
    run.add_argument(
        "--restart",
        action="store_true",
        help="with --resume DIR: start the run in DIR again from round 1 with its config.toml, replacing its "
        "checkpoint, metrics and results (e.g. after its checkpoint was lost)",
    )
    run.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bars (ours, transformers', huggingface_hub's) or per-round lines: only the summary",
    )
    run.add_argument(
        "--engine",
        choices=["inprocess", "flower-sim"],
        default="inprocess",
        help="inprocess (default, one machine) or flower-sim (Flower's Simulation Engine, one SuperNode per client)",
    )
    run.set_defaults(func=_cmd_run)
    report = sub.add_parser(
        "report",
        help="print a results table of finished run directories (others are skipped with a warning)",
        epilog="exit status: 0 table printed, 2 no folder holds a finished run",
    )
    report.add_argument("dirs", nargs="+")
    report.set_defaults(func=_cmd_report)
    bench = sub.add_parser(
        "bench",
        help="run a benchmark suite (methods x scenarios x seeds), resumable",
        epilog="exit status: 0 every cell finished (or --dry-run printed its table), 1 some cells failed, 2 the "
        "suite is malformed or needs something this machine lacks (listed, before any work)",
    )
    bench.add_argument("--suite", required=True, help="suite name (smoke, paper-lite, paper-lite-v2, paper-clip) or TOML path")
    bench.add_argument("--out", default=None, help="output folder; finished cells in it are skipped")
    bench.add_argument("--seeds", type=int, default=None, help="seeds per cell (default: the suite's)")
    bench.add_argument("--jobs", type=int, default=1, help="worker processes at once (default 1)")
    bench.add_argument(
        "--dry-run",
        action="store_true",
        help="run nothing: list every cell, the data set and weights it reads (local path) or fetches (hub id), "
        "and what is missing here; with --out, which cells are finished there",
    )
    bench.add_argument(
        "--set", action="append", metavar="KEY=VALUE",
        help="override a config key in every cell, after the suite's own overrides (repeatable), e.g. rounds=2",
    )
    bench.add_argument("--scenarios", metavar="A,B", default=None, help="only these scenarios (comma-separated)")
    bench.add_argument("--methods", metavar="X,Y", default=None, help="only these methods (comma-separated)")
    bench.add_argument(
        "--tuned", default=None, metavar="TUNED.toml",
        help="run with the values `feddtl tune` chose (its tuned.toml), in place of the suite's `tuned` key",
    )
    bench.set_defaults(func=_cmd_bench)
    tune = sub.add_parser(
        "tune",
        help="tune every method's open knobs on a tuning split and a validation hold-out (resumable); writes tuned.toml",
        epilog="exit status: 0 done (DIR/tuned.toml, DIR/tuned.md written), 1 some cells failed (rerun to finish), "
        "2 bad suite or missing data",
    )
    tune.add_argument("--suite", required=True, help="tuning suite name (tune-lite) or TOML path")
    tune.add_argument("--out", required=True, help="output folder; finished cells in it are skipped")
    tune.add_argument("--jobs", type=int, default=1, help="worker processes at once (default 1)")
    tune.set_defaults(func=_cmd_tune)
    bench_report = sub.add_parser("bench-report", help="rebuild a suite's table and plots from its output folder")
    bench_report.add_argument("dir")
    bench_report.set_defaults(func=_cmd_bench_report)
    certs = sub.add_parser(
        "flower-certs",
        help="write a development CA, a SuperLink TLS certificate and SuperNode keys (local trials only)",
    )
    certs.add_argument("dir", help="folder to write into (must not hold earlier keys)")
    certs.add_argument("--nodes", type=int, default=2, help="SuperNode key pairs to write (default 2)")
    certs.add_argument(
        "--host",
        action="append",
        help="the SuperLink's IP address or DNS name as SuperNodes reach it (repeatable; 127.0.0.1 and localhost are always in)",
    )
    certs.set_defaults(func=_cmd_flower_certs)
    export = sub.add_parser(
        "export",
        help="write a finished run's tuned model to a folder of its own (docs/export.md)",
        epilog="hf-clip runs: a merged CLIPModel + CLIPProcessor (save_pretrained) and the two LoRAs as peft "
        "adapters; lite runs: LoRA and bridge tensors. Exit status: 0 done, 2 not a finished run of a LoRA "
        "method or zeroshot, or --out in the way",
    )
    export.add_argument("run", metavar="RUN", help="a finished run folder (feddtl run --out RUN)")
    export.add_argument("--out", required=True, metavar="DIR", help="folder to write (new or empty)")
    export.add_argument("--force", action="store_true", help="replace DIR if it exists and is not empty")
    export.set_defaults(func=_cmd_export)
    predict = sub.add_parser(
        "predict",
        help="classify image files among any class names with a tuned model, to CSV (docs/export.md)",
        epilog="CSV columns: file, top1, p1, ..., topK, pK. Unreadable files are reported and skipped. "
        "Exit status: 0 done, 2 bad input or no readable image",
    )
    predict.add_argument("model", metavar="EXPORT_OR_RUN", help="an export folder (feddtl export) or a finished run folder")
    predict.add_argument("--images", nargs="+", required=True, metavar="DIR|FILE", help="image files, or folders searched recursively")
    names = predict.add_mutually_exclusive_group(required=True)
    names.add_argument("--classes", metavar='"a,b,c"', help="comma-separated class names")
    names.add_argument("--classes-file", metavar="F", help="text file with one class name per line")
    predict.add_argument("--out", metavar="preds.csv", default=None, help="CSV file to write (default: stdout)")
    predict.add_argument("--top-k", type=int, default=5, help="classes per image, most probable first (default 5, at most the class count)")
    predict.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    predict.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="where the model runs (default auto)")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.set_defaults(func=_cmd_predict)
    cache = sub.add_parser(
        "cache",
        help="list or clear a Flower SuperNode's node cache (backbone, partition and trunk features kept between messages)",
    )
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    dir_help = (
        "the node cache folder (default: as a SuperNode started here resolves it: $FEDDTL_NODE_CACHE_DIR, "
        "else $FLWR_HOME/feddtl-node-cache, else ./feddtl-node-cache)"
    )
    cache_ls = cache_sub.add_parser("ls", help="list the entries, most recently used first")
    cache_ls.add_argument("--dir", default=None, help=dir_help)
    cache_ls.set_defaults(func=_cmd_cache_ls)
    cache_clear = cache_sub.add_parser("clear", help="remove every entry (entries a running message holds stay) and stop the folder's warm workers")
    cache_clear.add_argument("--dir", default=None, help=dir_help)
    cache_clear.set_defaults(func=_cmd_cache_clear)
    sub.add_parser("methods", help="list methods").set_defaults(func=_cmd_methods)
    sub.add_parser("presets", help="list preset configs").set_defaults(func=_cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
