"""One typed experiment configuration: TOML file or preset + ``--set key=value`` overrides.

Validated on load: an unknown key, a wrong type or a bad value is an error that names the key and
what is allowed. The resolved configuration is written into every run directory.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from feddtl.algorithm.client_config import ClientConfig
from feddtl.algorithm.grpo_config import GRPOConfig
from feddtl.algorithm.server_config import ServerConfig
from feddtl.backbones.lora_config import LoraConfig
from feddtl.cache.cache_config import CacheConfig
from feddtl.checkpoint_config import CheckpointConfig
from feddtl.data.data_config import DataConfig
from feddtl.flower.flower_config import FlowerConfig
from feddtl.methods.fedpgp_config import FedPGPConfig
from feddtl.methods.promptfl_config import PromptConfig
from feddtl.sim.robust_config import FaultConfig, RobustnessConfig


class ConfigError(ValueError):
    """A configuration problem, with a message that names the key."""


@dataclass
class BackboneConfig:
    """Options of the dual-encoder backbone."""

    template: str = "a photo of a {}."
    """Prompt template; {} is replaced by the class name."""
    logit_scale: float | None = None
    """s in softmax(s <z, t>). None: the backbone's own (CLIP's learned 1/tau; 100 for lite)."""
    bridge_top_k: int | None = 10
    """lite only: ImageNet classes kept in the probability-weighted bridge (None: all 1000)."""
    bridge_temperature: float = 1.0
    """lite only: temperature of the ImageNet classifier softmax in the bridge."""


@dataclass
class EvalConfig:
    """When and how the global model is evaluated."""

    every: int = 5
    """Evaluate every this many rounds (and always after the last round)."""
    batch_size: int = 256
    """Batch size of evaluation forward passes (separate from the training batch size)."""


@dataclass
class ExperimentConfig:
    """A whole experiment. Top-level keys are the ones other tools (bench, Flower) rely on."""

    method: str = "feddtl"
    """Method name from the registry (`feddtl methods` lists them)."""
    dataset: str = "fashion-mnist"
    """Dataset name (fashion-mnist, mnist5k, digits) or imagefolder:<path>."""
    backbone: str = "lite"
    """"lite" (offline default) or "hf-clip:<hub id or local path>"."""
    partition: Literal["iid", "dirichlet", "pathological", "domain", "domain-dirichlet"] = "pathological"
    """Label skew across clients over the base classes; "domain" (whole domains per client) and
    "domain-dirichlet" (domains x Dir(alpha)) are feature shift, for datasets with domains (digits-domains)."""
    num_clients: int = 5
    """K, the number of clients (paper: 5)."""
    shots: int | None = 16
    """Few-shot: images per class per client. None: full data."""
    rounds: int = 20
    """T, communication rounds (paper: 20)."""
    seed: int = 0
    """Seed of everything: split, partition, shots, initialisation, batches, noise."""
    alpha: float = 0.1
    """Dirichlet concentration for partition = "dirichlet" (paper: 0.1)."""
    classes_per_client: int = 2
    """Base classes per client for partition = "pathological"."""
    client_fraction: float = 1.0
    """Fraction of clients selected per round (at least one)."""
    max_train_per_client: int | None = None
    """Full-data cap on training images per client (seeded subsample); None: no cap."""
    base_novel: Literal["half", "random"] = "half"
    """How classes split into base (trained) and novel (held out): first half, or a seeded random half."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the towers run; auto picks CUDA when available."""
    data: DataConfig = field(default_factory=DataConfig)
    backbone_options: BackboneConfig = field(default_factory=BackboneConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    fedpgp: FedPGPConfig = field(default_factory=FedPGPConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    robustness: RobustnessConfig = field(default_factory=RobustnessConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)

    @property
    def switch_round(self) -> int:
        """M, resolved: rounds <= M run SFT."""
        m = self.client.switch_round
        return self.rounds // 2 if m is None else m

    def validate(self) -> None:
        from feddtl.methods import available_methods

        if self.method not in available_methods():
            raise ConfigError(f"method={self.method!r} is unknown; allowed: {', '.join(available_methods())}")
        if not (self.backbone == "lite" or self.backbone.startswith("hf-clip:")):
            raise ConfigError(f"backbone={self.backbone!r} is unknown; allowed: lite, hf-clip:<hub id or local path>")
        if self.backbone.startswith("hf-clip:") and not self.backbone[len("hf-clip:") :]:
            raise ConfigError("backbone='hf-clip:' needs a hub id or local path after the colon")
        checks: list[tuple[bool, str]] = [
            (self.num_clients >= 1, f"num_clients must be >= 1, got {self.num_clients}"),
            (self.shots is None or self.shots >= 1, f"shots must be >= 1 or none (full data), got {self.shots}"),
            (self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (self.alpha > 0, f"alpha must be > 0 (Dirichlet concentration), got {self.alpha}"),
            (self.classes_per_client >= 1, f"classes_per_client must be >= 1, got {self.classes_per_client}"),
            (0 < self.client_fraction <= 1, f"client_fraction must be in (0, 1], got {self.client_fraction}"),
            (
                self.max_train_per_client is None or self.max_train_per_client >= 1,
                f"max_train_per_client must be >= 1 or none, got {self.max_train_per_client}",
            ),
            (self.eval.every >= 1, f"eval.every must be >= 1, got {self.eval.every}"),
            (self.eval.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.eval.batch_size}"),
            (
                self.client.switch_round is None or self.client.switch_round <= self.rounds,
                f"client.switch_round must be <= rounds ({self.rounds}), got {self.client.switch_round}",
            ),
            (
                self.backbone_options.bridge_top_k is None or self.backbone_options.bridge_top_k >= 1,
                "backbone_options.bridge_top_k must be >= 1 or none",
            ),
            (self.backbone_options.bridge_temperature > 0, "backbone_options.bridge_temperature must be > 0"),
            (
                self.backbone_options.logit_scale is None or self.backbone_options.logit_scale > 0,
                "backbone_options.logit_scale must be > 0 or none",
            ),
            ("{}" in self.backbone_options.template, "backbone_options.template must contain {} for the class name"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        for section in (
            self.data, self.lora, self.client, self.grpo, self.server, self.prompt, self.cache, self.checkpoint,
            self.robustness, self.flower, self.fedpgp,
        ):
            try:
                section.validate()
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        try:
            self.faults.validate(self.num_clients, self.rounds, self.robustness, self.client)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----- loading ------------------------------------------------------------------------------------

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
    return Path(__file__).resolve().parent / "presets"


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
            values = tomllib.loads(path.read_text())
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


def _toml_value(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} to TOML")


def to_toml(config: ExperimentConfig) -> str:
    """The resolved configuration as TOML that ``load_config`` reads back to an equal config."""
    top, sections = [], []
    for key, value in config.to_dict().items():
        if isinstance(value, dict):
            body = "\n".join(f"{k} = {_toml_value(v)}" for k, v in value.items())
            sections.append(f"[{key}]\n{body}\n")
        else:
            top.append(f"{key} = {_toml_value(value)}")
    return "\n".join(top) + "\n\n" + "\n".join(sections)
