"""Loading the typed config: a TOML file or preset, ``--set key=value`` overrides, and TOML out.

Validated on load: an unknown key, a wrong type or a bad value is an error that names the key and
what is allowed. ``to_toml`` writes the resolved configuration that every run directory keeps.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal

from feddtl.config.errors import ConfigError
from feddtl.config.experiment import ExperimentConfig

NONE_WORDS = ("none", "null")


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; int -> float and "none" -> None are allowed."""
    origin = typing.get_origin(tp)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in NONE_WORDS)):
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_tp)}, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}={value!r} is not allowed; allowed: {_type_name(tp)[len('one of ') :]}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _build(cls: type, values: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(f"unknown config key {full!r}; allowed keys{' in ' + prefix[:-1] if prefix else ''}: {allowed}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{full} is a section ([{full}]); got {value!r}")
            kwargs[key] = _build(tp, value, prefix=f"{full}.")
        else:
            if isinstance(value, dict):
                raise ConfigError(f"{full} is a value, not a section")
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: take it as a string
    return key.split("."), value


def preset_dir() -> Path:
    """The presets shipped as package data (``feddtl/presets/*.toml``)."""
    return Path(__file__).resolve().parent.parent / "presets"


def available_presets() -> list[str]:
    return sorted(p.stem for p in preset_dir().glob("*.toml"))


def find_toml(name_or_path: str, folder: Path) -> Path | None:
    """A TOML file by path, or by name (without .toml) in ``folder``; None if neither exists."""
    for path in (Path(name_or_path), folder / f"{name_or_path}.toml"):
        if path.is_file():
            return path
    return None


def resolve_config_path(name_or_path: str) -> Path:
    path = find_toml(name_or_path, preset_dir())
    if path is not None:
        return path
    raise ConfigError(
        f"config {name_or_path!r} is neither a file nor a preset; presets: {', '.join(available_presets())}"
    )


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a TOML file or preset (None: all defaults), apply ``key=value`` overrides, validate."""
    values: dict[str, Any] = {}
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        try:
            values = tomllib.loads(path.read_text(encoding="utf-8"))  # TOML is UTF-8, whatever the locale says
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not a TOML file (not UTF-8 text: byte {exc.start} is {exc.object[exc.start]:#04x})") from None
        except OSError as exc:
            raise ConfigError(f"{path} cannot be read: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for item in overrides:
        keys, value = _parse_override(item)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {k} is a value, not a section")
        node[keys[-1]] = value
    config = _build(ExperimentConfig, values)
    config.validate()
    return config


def loads_config(text: str, source: str = "<config text>") -> ExperimentConfig:
    """Parse and validate a TOML document (what ``to_toml`` writes), e.g. a config sent to a Flower client."""
    try:
        values = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    config = _build(ExperimentConfig, values)
    config.validate()
    return config


def toml_value(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def to_toml(config: ExperimentConfig) -> str:
    """The resolved configuration as TOML that ``load_config`` reads back to an equal config."""
    top, sections = [], []
    for key, value in config.to_dict().items():
        if isinstance(value, dict):
            body = "\n".join(f"{k} = {toml_value(v)}" for k, v in value.items())
            sections.append(f"[{key}]\n{body}\n")
        else:
            top.append(f"{key} = {toml_value(value)}")
    return "\n".join(top) + "\n\n" + "\n".join(sections)
