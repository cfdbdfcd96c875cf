"""A Deployment Engine federation on one machine (loopback), with TLS and SuperNode authentication.

Starts the real executables (``flower-superlink``, ``flower-supernode``, ``flwr``) as separate OS
processes, the way docs/flower.md's loopback trial does by hand; the deployment test and the engine
benchmark use it. ``stop()`` ends every process it started and their children, also after errors.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

FINISHED = "finished"
COMPLETED = "finished:completed"


def flower_bin_dir() -> Path:
    """Folder of the Flower executables: the one of the running Python (the project's venv)."""
    return Path(sys.executable).parent


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_flower_process(pid: int) -> bool:
    """Whether ``pid`` still runs a Flower executable (guards against signalling a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"flower" in cmdline or b"flwr" in cmdline

def _signal(groups: set[int], pids: list[int], sig: signal.Signals) -> None:
    """Send ``sig`` to the process groups and to those of ``pids`` that are still Flower processes."""
    for pgid in groups:
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
    for pid in pids:
        if is_flower_process(pid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass



def descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively (Linux /proc; elsewhere none are found)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class LocalDeployment:
    """A SuperLink and SuperNodes on 127.0.0.1 with TLS and node authentication, driven through the CLI.

    ``folder`` receives the state database, the logs and ``flwr-home`` (the ``flwr`` CLI's
    ``FLWR_HOME``, holding the connection profile); ``certs`` is a folder written by
    ``feddtl flower-certs`` (ca.crt, server.crt/.key, node<K>/.pub).
    """

    PROFILE = "loopback"

    def __init__(self, folder: Path, certs: Path, env: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.certs = certs
        self.folder.mkdir(parents=True, exist_ok=True)
        self.bin = flower_bin_dir()
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.flwr_home = folder / "flwr-home"
        self.env = {
            **os.environ,
            **(env or {}),
            # flower-superlink / -supernode start flower-superexec and flwr-* by name.
            "PATH": f"{self.bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._logs: list[IO[bytes]] = []

    # ----- processes ------------------------------------------------------------------------------
    def _start(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = (self.folder / f"{name}.log").open("wb")
        self._logs.append(log)
        # A session of its own: stop() can signal the whole group.
        proc = subprocess.Popen(
            args, cwd=self.folder, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs[name] = proc
        return proc

    def log_tail(self, name: str, chars: int = 3000) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def start_superlink(self, timeout: float = 60.0) -> None:
        c = self.certs
        self._start(
            "superlink",
            [
                str(self.bin / "flower-superlink"),
                "--ssl-ca-certfile", str(c / "ca.crt"),
                "--ssl-certfile", str(c / "server.crt"),
                "--ssl-keyfile", str(c / "server.key"),
                "--enable-supernode-auth",
                "--disable-runtime-dependency-installation",
                # a file database: ":memory:" failed under concurrent requests with flwr 1.42
                "--database", str(self.folder / "state.db"),
                "--host", "127.0.0.1",
                "--port", str(self.port),
            ],
        )
        self.write_profile()
        self._wait_superlink(timeout)

    def _wait_superlink(self, timeout: float) -> None:
        import ssl

        import httpx

        trust = ssl.create_default_context(cafile=str(self.certs / "ca.crt"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.procs["superlink"].poll() is not None:
                raise RuntimeError(f"flower-superlink exited early:\n{self.log_tail('superlink')}")
            try:
                if httpx.get(f"https://{self.address}/health", verify=trust, timeout=2).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"SuperLink not healthy after {timeout:.0f} s:\n{self.log_tail('superlink')}")

    def write_profile(self) -> None:
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{self.PROFILE}"\n\n'
            f'[superlink.{self.PROFILE}]\naddress = "{self.address}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n'
        )

    def flwr(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.bin / "flwr"), *args], cwd=self.folder, env=self.env, capture_output=True, text=True,
            timeout=timeout,
        )

    def register(self, public_key: Path) -> None:
        out = self.flwr("supernode", "register", str(public_key), self.PROFILE)
        if out.returncode != 0:
            raise RuntimeError(f"flwr supernode register {public_key} failed:\n{out.stdout}\n{out.stderr}")

    def start_supernode(
        self, partition_id: int, num_partitions: int, private_key: Path, name: str | None = None,
        root_certificates: Path | None = None, node_config: str = "",
    ) -> subprocess.Popen[bytes]:
        """``node_config``: more ``key=value`` node-config items, e.g. ``cache-dir="/path"`` (TOML values)."""
        return self._start(
            name or f"supernode{partition_id}",
            [
                str(self.bin / "flower-supernode"),
                "--superlink", self.address,
                "--root-certificates", str(root_certificates or self.certs / "ca.crt"),
                "--auth-supernode-private-key", str(private_key),
                "--node-config", f"partition-id={partition_id} num-partitions={num_partitions} {node_config}".strip(),
                # each SuperNode serves its own ClientApp runtime API: one port per node on one machine
                "--port", str(free_port()),
            ],
        )

    def online_nodes(self) -> int:
        out = self.flwr("supernode", "ls", self.PROFILE, "--format", "json")
        if out.returncode != 0:
            raise RuntimeError(f"flwr supernode ls failed:\n{out.stdout}\n{out.stderr}")
        return sum(1 for node in json.loads(out.stdout).get("nodes", []) if node.get("status") == "online")

    # ----- runs -----------------------------------------------------------------------------------
    def submit(self, app: Path, run_config: str) -> int:
        """``flwr run APP PROFILE --run-config ...``; returns the run id."""
        out = self.flwr("run", str(app), self.PROFILE, "--run-config", run_config, "--format", "json")
        try:
            payload: dict[str, Any] = json.loads(out.stdout)
        except json.JSONDecodeError:
            payload = {}
        if out.returncode != 0 or not payload.get("success"):
            raise RuntimeError(f"flwr run failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return int(payload["run-id"])

    def run_status(self, run_id: int) -> dict[str, Any]:
        out = self.flwr("ls", self.PROFILE, "--run-id", str(run_id), "--format", "json")
        if out.returncode != 0:
            raise RuntimeError(f"flwr ls failed:\n{out.stdout}\n{out.stderr}")
        runs = json.loads(out.stdout)["runs"]
        return runs[0]

    def wait_run(self, run_id: int, timeout: float) -> dict[str, Any]:
        """Wait until the run finished; returns its `flwr ls` row (check ``status``: `flwr run` exits 0
        even for a run that failed)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.run_status(run_id)
            if str(row["status"]).startswith(FINISHED):
                return row
            for name, proc in self.procs.items():
                if proc.poll() is not None and name.startswith(("superlink", "supernode")):
                    raise RuntimeError(f"{name} exited with {proc.returncode} during run {run_id}:\n{self.log_tail(name)}")
            time.sleep(1.0)
        raise TimeoutError(f"run {run_id} not finished after {timeout:.0f} s:\n{self.log_tail('superlink')}")

    def run_log(self, run_id: int) -> str:
        out = self.flwr("log", str(run_id), self.PROFILE, "--show", timeout=60)
        return out.stdout + out.stderr

    # ----- teardown -------------------------------------------------------------------------------
    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM every started process group and the children that left it; SIGKILL what remains."""
        # Children started with a session of their own (flower-superexec, flwr-serverapp, flwr-clientapp)
        # are not in our groups: collect them while their parents still live.
        targets = [pid for proc in self.procs.values() for pid in descendants(proc.pid)]
        groups = {proc.pid for proc in self.procs.values()}
        _signal(groups, targets, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        _signal(groups, targets, signal.SIGKILL)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for log in self._logs:
            log.close()
        self._logs.clear()

    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
