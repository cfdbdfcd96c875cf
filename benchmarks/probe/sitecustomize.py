"""Per-phase timing of Flower ClientApp processes, from outside the ClientApp (benchmarks/node_messages.py).

Put this folder first on PYTHONPATH of the SuperNodes and set FEDDTL_PROBE_LOG=<file>: every
``flwr-clientapp`` process then appends one JSON line to the file at exit. It changes nothing the
process computes, and needs nothing of the feddtl code under test, so one probe times any version of it
(main's code and a branch alike). Other processes ignore it.

Marks, in seconds on CLOCK_BOOTTIME (the clock the kernel's process start time is on):
- ``start``: the kernel's start time of the process (10 ms resolution);
- ``python``: the interpreter ran site (this file);
- ``run``: Flower's ``run_clientapp`` entered (flwr-clientapp's own imports done);
- ``pulled``: the task, its context and the message pulled from the SuperNode;
- ``fab``: the app (FAB) unpacked and installed;
- ``import``: the first ``feddtl`` module was looked up (Flower now loads the ClientApp);
- ``call`` / ``call_end``: ClientApp.__call__ entered / returned (the handler);
- ``step`` / ``step_end``: the method's ``client_step`` entered / returned (train messages);
- ``exit``: atexit, after the reply was pushed.

A node's warm worker (``feddtl.flower.warm_worker``, started by a ClientApp process with this environment) runs
the client steps of the messages it is handed: there the probe appends one line per message, at its end, with
the message's id and the worker's ``call`` / ``step`` / ``step_end`` / ``call_end`` marks
(benchmarks/node_messages.py joins it to the line of the ClientApp process that handed the message over).
"""

from __future__ import annotations

import os
import sys


def _install() -> None:
    import atexit
    import json
    import time

    def now() -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    marks: dict[str, float] = {"python": now()}
    info: dict[str, object] = {"pid": os.getpid()}
    try:
        fields = open(f"/proc/{os.getpid()}/stat").read().rsplit(")", 1)[1].split()
        marks["start"] = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass

    def patch_client_step(module) -> None:
        original = module.get_method

        def get_method(name):
            cls = original(name)

            def client_step(*args, **kwargs):
                marks["step"] = now()
                try:
                    return cls.client_step(*args, **kwargs)
                finally:
                    marks["step_end"] = now()

            return type(cls.__name__, (cls,), {"client_step": staticmethod(client_step)})

        module.get_method = get_method

    def patch_call() -> None:
        from flwr.clientapp.client_app import ClientApp

        original = ClientApp.__call__

        def __call__(self, message, context):
            marks["call"] = now()
            info["type"] = message.metadata.message_type
            info["group"] = message.metadata.group_id
            info["partition"] = context.node_config.get("partition-id")
            info["message"] = message.metadata.message_id
            app_module = sys.modules.get("feddtl.flower.client_app")
            if app_module is not None and hasattr(app_module, "get_method"):
                patch_client_step(app_module)
            try:
                return original(self, message, context)
            finally:
                marks["call_end"] = now()

        ClientApp.__call__ = __call__

    class FirstFeddtlImport:
        def find_spec(self, name, path=None, target=None):
            if name == "feddtl" or name.startswith("feddtl."):
                marks.setdefault("import", now())
                sys.meta_path.remove(self)
                patch_call()
            return None

    sys.meta_path.insert(0, FirstFeddtlImport())

    def timed(function, before: str | None, after: str | None):
        def wrapper(*args, **kwargs):
            if before:
                marks[before] = now()
            try:
                return function(*args, **kwargs)
            finally:
                if after:
                    marks[after] = now()

        return wrapper

    class FlowerRuntime:
        """Wraps three functions of flwr's run_clientapp module right after it executes (before the CLI
        binds them): the entry of run_clientapp, pulling the task, installing the FAB."""

        NAME = "flwr.supernode.runtime.run_clientapp"

        def find_spec(self, name, path=None, target=None):
            if name != self.NAME:
                return None
            sys.meta_path.remove(self)
            import importlib.util

            spec = importlib.util.find_spec(name)
            if spec is None or spec.loader is None:
                return spec
            exec_module = spec.loader.exec_module

            def patched(module) -> None:
                exec_module(module)
                for attr, before, after in (
                    ("run_clientapp", "run", None), ("pull_task_input", None, "pulled"), ("install_from_fab", None, "fab"),
                ):
                    if callable(getattr(module, attr, None)):
                        setattr(module, attr, timed(getattr(module, attr), before, after))

            spec.loader.exec_module = patched
            return spec

    sys.meta_path.insert(0, FlowerRuntime())

    def write() -> None:
        marks["exit"] = now()
        try:
            import resource

            info["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        except ImportError:
            pass
        info["wall"] = time.time()
        line = json.dumps({**info, "marks": marks}) + "\n"
        with open(os.environ["FEDDTL_PROBE_LOG"], "a") as f:
            f.write(line)  # one short write in append mode: lines of concurrent processes do not interleave

    atexit.register(write)


def _install_worker() -> None:
    """In a warm worker: one line per message served (the worker lives on; nothing waits for its exit)."""
    import json
    import resource
    import time

    def now() -> float:
        return time.clock_gettime(time.CLOCK_BOOTTIME)

    current: dict[str, float] = {}

    def rss_mib() -> float | None:
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) / 1024.0 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration, ValueError):
            return None

    def patch() -> None:
        from flwr.clientapp.client_app import ClientApp

        original_call = ClientApp.__call__
        patched_methods: set[int] = set()

        def __call__(self, message, context):
            current.clear()
            current["call"] = now()
            held = rss_mib()  # what the worker held between messages
            app_module = sys.modules.get("feddtl.flower.client_app")
            if app_module is not None and id(app_module) not in patched_methods and hasattr(app_module, "get_method"):
                patched_methods.add(id(app_module))
                original = app_module.get_method

                def get_method(name):
                    cls = original(name)

                    def client_step(*args, **kwargs):
                        current["step"] = now()
                        try:
                            return cls.client_step(*args, **kwargs)
                        finally:
                            current["step_end"] = now()

                    return type(cls.__name__, (cls,), {"client_step": staticmethod(client_step)})

                app_module.get_method = get_method
            try:
                return original_call(self, message, context)
            finally:
                current["call_end"] = now()
                line = {
                    "pid": os.getpid(), "worker": True, "message": message.metadata.message_id,
                    "type": message.metadata.message_type, "group": message.metadata.group_id,
                    "partition": context.node_config.get("partition-id"), "wall": time.time(),
                    "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "held_rss_mib": held,
                    "marks": dict(current),
                }
                with open(os.environ["FEDDTL_PROBE_LOG"], "a") as f:
                    f.write(json.dumps(line) + "\n")

        ClientApp.__call__ = __call__

    class FirstFeddtlImport:
        def find_spec(self, name, path=None, target=None):
            if name == "feddtl" or name.startswith("feddtl."):
                sys.meta_path.remove(self)
                patch()
            return None

    sys.meta_path.insert(0, FirstFeddtlImport())


if os.environ.get("FEDDTL_PROBE_LOG") and sys.argv and sys.argv[0].endswith("flwr-clientapp"):
    _install()
elif os.environ.get("FEDDTL_PROBE_LOG") and any("feddtl.flower.warm_worker" in a for a in getattr(sys, "orig_argv", [])):
    _install_worker()
