"""The frozen-trunk activation cache: trunk outputs computed once per run, in memory or on disk."""

from feddtl.config.cache_config import CacheConfig
from feddtl.cache.node_cache import NodeCache
from feddtl.cache.stores import MemmapStore, PixelStore, TensorStore
from feddtl.cache.trunk_cache import TrunkCache, trunk_batches

__all__ = ["CacheConfig", "MemmapStore", "NodeCache", "PixelStore", "TensorStore", "TrunkCache", "trunk_batches"]
