"""The methods: one file each; their names are registered in ``feddtl.config.registry``."""

from __future__ import annotations

from importlib import import_module

from feddtl.config.registry import METHODS, available_methods

__all__ = ["available_methods", "get_method"]


def get_method(name: str) -> type:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(available_methods())}")
    module, cls = METHODS[name].split(":")
    return getattr(import_module(module), cls)
