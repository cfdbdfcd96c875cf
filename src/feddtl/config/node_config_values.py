"""Reading one key of a SuperNode's node config, checked: the node-config sections share these so that a
bad value gets the same one-line error whatever the section."""

from __future__ import annotations

from collections.abc import Mapping

from feddtl.config.errors import ConfigError


def node_string(node_config: Mapping[str, object], key: str, must_be: str) -> str | None:
    """``node_config[key]`` if it is a string; None when absent; else ConfigError '... must be <must_be>'."""
    value = node_config.get(key)
    if value is not None and not isinstance(value, str):
        raise ConfigError(f"node config {key}={value!r} must be {must_be}")
    return value


def node_number(node_config: Mapping[str, object], key: str, must_be: str) -> float | None:
    """``node_config[key]`` as a float if it is an int or float (not a bool); None when absent."""
    value = node_config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"node config {key}={value!r} must be {must_be}")
    return float(value)


def node_bool(node_config: Mapping[str, object], key: str, must_be: str) -> bool | None:
    """``node_config[key]`` if it is a bool; None when absent."""
    value = node_config.get(key)
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"node config {key}={value!r} must be {must_be}")
    return value
