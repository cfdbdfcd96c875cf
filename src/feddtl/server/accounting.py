"""Communication and memory accounting of a run: bytes on the wire per round, RSS per phase.

Bytes count the tensors inside the messages (what any wire format carries, headers aside), split
by message field: LoRA weights, class text embeddings, uploaded image embeddings and labels.
"""

from __future__ import annotations

import os
import platform
import resource
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from feddtl.algorithm.messages import ClientTask, ClientUpdate

MB = 2**20


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors inside a message (what a wire format would carry, headers aside)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (ClientTask, ClientUpdate)):
        return sum(tensor_bytes(v) for v in vars(obj).values())
    return 0


def message_parts(message: ClientTask | ClientUpdate) -> dict[str, int]:
    """Bytes per message field that carries tensors (fields that carry nothing are left out)."""
    parts = {name: tensor_bytes(value) for name, value in vars(message).items()}
    return {name: n for name, n in parts.items() if n > 0}


def _sum_parts(parts: Sequence[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in parts:
        for k, v in p.items():
            out[k] = out.get(k, 0) + v
    return out


def round_communication(
    task: ClientTask,
    updates: Sequence[ClientUpdate],
    asks: int | None = None,
    sent: Sequence[ClientTask] | None = None,
) -> dict[str, Any]:
    """One round's traffic: totals (all selected clients), per client, and per message field.

    Every ask (``asks``, default one per update; retries ask again) receives the same task; each
    update received was uploaded. ``sent``: the task of every ask, for methods that send each client
    its own (``Method.client_task``); then the download figures are theirs (per client: the mean per ask).
    """
    n = len(updates)
    up = [tensor_bytes(u) for u in updates]
    if sent is None:
        asks = n if asks is None else asks
        down_per_client: float = tensor_bytes(task)
        down = down_per_client * asks
        down_parts = {k: v * asks for k, v in message_parts(task).items()}
    else:
        down = sum(tensor_bytes(t) for t in sent)
        down_per_client = down / len(sent) if sent else 0.0
        down_parts = _sum_parts([message_parts(t) for t in sent])
    return {
        "bytes_down": down,
        "bytes_up": sum(up),
        "bytes_down_per_client": down_per_client,
        "bytes_up_per_client": sum(up) / n if n else 0.0,
        "bytes_up_max_client": max(up, default=0),
        "bytes_down_parts": down_parts,
        "bytes_up_parts": _sum_parts([message_parts(u) for u in updates]),
    }


def communication_summary(rows: Sequence[dict[str, Any]], backbone_param_bytes: int) -> dict[str, Any]:
    """results.json's communication figures, also as fractions of the backbone's parameter bytes."""
    rounds = [r for r in rows if "bytes_up" in r]
    up_total = sum(r["bytes_up"] for r in rounds)
    down_total = sum(r["bytes_down"] for r in rounds)
    up_client = float(np.mean([r["bytes_up_per_client"] for r in rounds])) if rounds else 0.0
    up_client_max = max((r["bytes_up_max_client"] for r in rounds), default=0)
    down_client = float(np.mean([r["bytes_down_per_client"] for r in rounds])) if rounds else 0.0
    frac = (lambda b: b / backbone_param_bytes) if backbone_param_bytes > 0 else (lambda b: float("nan"))
    return {
        "bytes_up_total": up_total,
        "bytes_down_total": down_total,
        "backbone_param_bytes": backbone_param_bytes,
        "upload_per_client_round_bytes": up_client,
        "upload_per_client_round_max_bytes": up_client_max,
        "upload_fraction_of_backbone": frac(up_client),
        "upload_max_fraction_of_backbone": frac(up_client_max),
        "download_per_client_round_bytes": down_client,
        "download_fraction_of_backbone": frac(down_client),
        "bytes_up_total_fraction_of_backbone": frac(up_total),
        "bytes_down_total_fraction_of_backbone": frac(down_total),
        "bytes_up_parts_total": _sum_parts([r.get("bytes_up_parts", {}) for r in rounds]),
        "bytes_down_parts_total": _sum_parts([r.get("bytes_down_parts", {}) for r in rounds]),
    }


def phase_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Total wall time and highest peak RSS per phase over all rounds."""
    out: dict[str, Any] = {}
    for phase in ("client", "server", "eval"):
        out[f"time_{phase}_s_total"] = sum(r.get(f"time_{phase}_s", 0.0) for r in rows)
        peaks = [r[f"rss_peak_{phase}_mb"] for r in rows if r.get(f"rss_peak_{phase}_mb") is not None]
        out[f"rss_peak_{phase}_mb"] = max(peaks) if peaks else None
    return out


# ----- memory ------------------------------------------------------------------------------------


def current_rss_mb() -> float | None:
    """Resident set size now (Linux /proc/self/statm; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / MB


def peak_rss_mb() -> float:
    """The process's peak RSS since start (or since the last high-water-mark reset)."""
    # Linux: VmHWM, not getrusage, whose maxrss carries over the parent's peak across fork + exec.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 1024.0 if platform.system() == "Linux" else kb / 1024.0 / 1024.0


def _reset_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryMeter:
    """Wall time and peak RSS per phase of a run (client, server, eval) and per round, plus the peak over
    the whole run.

    On Linux each phase resets the kernel's high-water mark (VmHWM), so a phase's peak is its own;
    the run's peak is kept here. Elsewhere a phase's peak is the process peak so far.
    """

    def __init__(self) -> None:
        self._run_peak = peak_rss_mb()
        self._can_reset = platform.system() == "Linux"
        self._round_start = time.perf_counter()

    def start_round(self) -> None:
        self._round_start = time.perf_counter()

    @contextmanager
    def phase(self, row: dict[str, Any], name: str) -> Iterator[None]:
        """Measure the block as phase ``name``: ``time_<name>_s`` and ``rss_peak_<name>_mb`` go into ``row``
        (nothing when the block raises)."""
        self.start_phase()
        start = time.perf_counter()
        yield
        row[f"time_{name}_s"] = time.perf_counter() - start
        row[f"rss_peak_{name}_mb"] = self.end_phase()

    def end_round(self, row: dict[str, Any]) -> None:
        """The round's wall time, the RSS now and the run's peak so far, into ``row``."""
        row["time_round_s"] = time.perf_counter() - self._round_start
        row["rss_mb"] = current_rss_mb()
        row["peak_rss_mb"] = self.run_peak()

    def start_phase(self) -> None:
        self._run_peak = max(self._run_peak, peak_rss_mb())
        if self._can_reset:
            self._can_reset = _reset_high_water_mark()

    def end_phase(self) -> float:
        """Peak RSS (MB) since ``start_phase``."""
        peak = peak_rss_mb()
        self._run_peak = max(self._run_peak, peak)
        return peak

    def run_peak(self) -> float:
        """Peak RSS (MB) of the process so far."""
        self._run_peak = max(self._run_peak, peak_rss_mb())
        return self._run_peak
