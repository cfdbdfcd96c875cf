"""Configuration of the frozen-trunk activation cache ([cache] section)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class CacheConfig:
    """Where the frozen trunk's outputs live between uses.

    The trunk (blocks before the paper's l) never trains, so each image's trunk output is computed
    once per run, per client (clients never share a cache), and reused by every local epoch, every
    round and every evaluation. There is no random data augmentation in feddtl; a random augmentation
    would change the trunk input at every use and so would have to run with the cache disabled
    (a deterministic one could be cached once per view).
    """

    enabled: bool = True
    """Cache trunk outputs. false: recompute the image trunk from pixels (load, resize, normalise, trunk
    forward) for every batch that needs it; results equal the cached run's. The text trunk's outputs of
    the class prompts are a few kilobytes and stay cached either way."""
    memory_budget_mb: float = 2048.0
    """RAM the cached trunk outputs of one run may take (all clients and test sets together). A store
    that does not fit the rest of the budget goes to a numpy memmap file on disk instead, written batch
    by batch, so a dataset larger than RAM streams through."""
    dtype: Literal["float32", "float16"] = "float32"
    """Storage precision. float16 halves memory and disk; reads return float32. Results then differ
    from an uncached run by fp16 rounding of the trunk outputs."""
    dir: str | None = None
    """Folder of the disk store. None: <run directory>/cache (a temporary folder when no run directory
    is given). The files are deleted when the run ends."""
    batch_size: int = 256
    """Images per trunk forward pass while the cache is filled (and per image-loading chunk)."""
    device_budget_mb: float | None = None
    """Runs on CUDA: accelerator memory the cached trunk outputs may take. A store that fits the rest of it is
    kept on the device, so a training step reads its batch there instead of copying it from RAM; the others
    go to RAM or disk as above. None: half of the device memory free when the run's cache is created; 0:
    always in RAM. No effect on CPU runs. The stored values are the same wherever they live."""

    def validate(self) -> None:
        if not self.memory_budget_mb >= 0:
            raise ValueError(f"cache.memory_budget_mb must be >= 0, got {self.memory_budget_mb}")
        if self.dtype not in ("float32", "float16"):
            raise ValueError(f"cache.dtype={self.dtype!r} is not allowed; allowed: 'float32', 'float16'")
        if self.dir is not None and not self.dir:
            raise ValueError("cache.dir must be a non-empty path or none")
        if self.batch_size < 1:
            raise ValueError(f"cache.batch_size must be >= 1, got {self.batch_size}")
        if self.device_budget_mb is not None and not self.device_budget_mb >= 0:
            raise ValueError(
                f"cache.device_budget_mb must be >= 0 or none (half the free device memory), got {self.device_budget_mb}"
            )
