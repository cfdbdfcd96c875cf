"""The whole experiment's typed configuration: top-level keys and one section per component.

Config sits at the bottom of the import order: every section lives in this package (one
``<section>_config.py`` each), so nothing here imports the code that reads it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from feddtl.config.backbone_config import BackboneConfig
from feddtl.config.cache_config import CacheConfig
from feddtl.config.checkpoint_config import CheckpointConfig
from feddtl.config.client_config import ClientConfig
from feddtl.config.data_config import DataConfig
from feddtl.config.errors import ConfigError
from feddtl.config.eval_config import EvalConfig
from feddtl.config.faults_config import FaultConfig
from feddtl.config.fedpgp_config import FedPGPConfig
from feddtl.config.flower_config import FlowerConfig
from feddtl.config.grpo_config import GRPOConfig
from feddtl.config.lora_config import LoraConfig
from feddtl.config.node_data_config import NODE_LOCAL
from feddtl.config.privacy_config import PrivacyConfig
from feddtl.config.promptfl_config import PromptConfig
from feddtl.config.registry import available_methods
from feddtl.config.robustness_config import RobustnessConfig
from feddtl.config.server_config import ServerConfig

__all__ = ["ConfigError", "ExperimentConfig"]


@dataclass
class ExperimentConfig:
    """A whole experiment. Top-level keys are the ones other tools (bench, Flower) rely on."""

    method: str = "feddtl"
    """Method name from the registry (`feddtl methods` lists them)."""
    dataset: str = "fashion-mnist"
    """Dataset name (fashion-mnist, mnist5k, digits, digits-domains), imagefolder:<path>,
    imagefolder-domains:<path>, or hf:<hub id or local path> (a Hugging Face dataset); or "node-local": the
    server holds no data, each Flower SuperNode brings its own (node-config ``data``), the run's classes are
    ``data.class_names_file``'s and evaluation runs on the nodes (Deployment Engine only)."""
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
    """Seed of everything: split (unless base_novel_seed is set), partition, shots, initialisation, batches, noise."""
    alpha: float = 0.1
    """Dirichlet concentration for partition = "dirichlet" (paper: 0.1)."""
    min_partition_size: int = 1
    """Fewest base-class training images a client may get from the partition (before shots): a Dirichlet
    draw ("dirichlet", "domain-dirichlet") that leaves a client below it is redrawn, up to 100 times, then
    an error; "iid" and "pathological" stop with an error ("domain" hands out whole domains and ignores
    it). 1 (default): every client gets at least one image, exactly as before the key existed.
    flwr-datasets' DirichletPartitioner has the same guard (its default is 10)."""
    classes_per_client: int = 2
    """Base classes per client for partition = "pathological"."""
    client_fraction: float = 1.0
    """Fraction of clients selected per round (at least one)."""
    max_train_per_client: int | None = None
    """Full-data cap on training images per client (seeded subsample); None: no cap."""
    base_novel: Literal["half", "random"] = "half"
    """How classes split into base (trained) and novel (held out): first half, or a seeded random half."""
    base_novel_seed: int | None = None
    """Seed of the base_novel = "random" class split, so the split can stay fixed while `seed` varies the
    rest (partition, shots, initialisation, batches, noise). None: the run's `seed`. No effect with "half"."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the towers run; auto picks CUDA when available."""
    precision: Literal["float32", "bfloat16"] = "float32"
    """Arithmetic of the hf-clip towers. "bfloat16": mixed precision on CUDA: the towers' forward and backward
    passes run under torch.autocast(bfloat16) while the LoRA weights, the optimiser, the trunk cache, the losses
    and everything the algorithm computes from the embeddings stay float32 (bfloat16 needs no loss scaling).
    Where the run lands on a CPU (device = "cpu", or "auto" without CUDA) or on a GPU without bfloat16, it
    runs in float32 with a warning; results.json's "precision" (written when bfloat16 is asked for) says what
    was used. Only for hf-clip backbones (lite runs in float32: an error). "float32" (default): as before the
    key existed."""
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
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    flower: FlowerConfig = field(default_factory=FlowerConfig)

    @property
    def clients_per_round(self) -> int:
        """Clients selected each round: ``client_fraction`` of ``num_clients``, rounded, at least one."""
        return min(self.num_clients, max(1, int(round(self.client_fraction * self.num_clients))))

    @property
    def switch_round(self) -> int:
        """M, resolved: rounds <= M run SFT."""
        m = self.client.switch_round
        return self.rounds // 2 if m is None else m

    def validate(self) -> None:
        if self.method not in available_methods():
            raise ConfigError(f"method={self.method!r} is unknown; allowed: {', '.join(available_methods())}")
        if not (self.backbone == "lite" or self.backbone.startswith("hf-clip:")):
            raise ConfigError(f"backbone={self.backbone!r} is unknown; allowed: lite, hf-clip:<hub id or local path>")
        if self.backbone.startswith("hf-clip:") and not self.backbone[len("hf-clip:") :]:
            raise ConfigError("backbone='hf-clip:' needs a hub id or local path after the colon")
        if self.precision != "float32" and not self.backbone.startswith("hf-clip:"):
            raise ConfigError(
                f"precision={self.precision!r} needs an hf-clip backbone (mixed precision of the CLIP towers on CUDA); "
                f"backbone={self.backbone!r} runs in float32: set precision='float32'"
            )
        checks: list[tuple[bool, str]] = [
            (self.num_clients >= 1, f"num_clients must be >= 1, got {self.num_clients}"),
            (self.shots is None or self.shots >= 1, f"shots must be >= 1 or none (full data), got {self.shots}"),
            (self.rounds >= 1, f"rounds must be >= 1, got {self.rounds}"),
            (self.alpha > 0, f"alpha must be > 0 (Dirichlet concentration), got {self.alpha}"),
            (
                self.min_partition_size >= 1,
                f"min_partition_size must be >= 1, got {self.min_partition_size}",
            ),
            (self.classes_per_client >= 1, f"classes_per_client must be >= 1, got {self.classes_per_client}"),
            (
                self.base_novel_seed is None or self.base_novel_seed >= 0,
                f"base_novel_seed must be >= 0 or none, got {self.base_novel_seed}",
            ),
            (0 < self.client_fraction <= 1, f"client_fraction must be in (0, 1], got {self.client_fraction}"),
            (
                self.max_train_per_client is None or self.max_train_per_client >= 1,
                f"max_train_per_client must be >= 1 or none, got {self.max_train_per_client}",
            ),
            (self.eval.every >= 1, f"eval.every must be >= 1, got {self.eval.every}"),
            (self.eval.batch_size >= 1, f"eval.batch_size must be >= 1, got {self.eval.batch_size}"),
            (
                self.eval.validation_per_class >= 1,
                f"eval.validation_per_class must be >= 1, got {self.eval.validation_per_class}",
            ),
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
        if self.dataset == NODE_LOCAL and self.data.class_names_file is None:
            raise ConfigError(
                f"dataset={NODE_LOCAL!r} needs data.class_names_file: the run's class list (one name per line), "
                "onto which every SuperNode's own classes are matched"
            )
        if self.dataset == NODE_LOCAL and self.eval.on == "validation":
            # Nodes evaluate on their own held-out test images; no node carves a validation hold-out.
            raise ConfigError(
                f"eval.on='validation' is not available with dataset={NODE_LOCAL!r}: the nodes evaluate on their "
                "own test images; use eval.on='test'"
            )
        for section in (
            self.data, self.lora, self.client, self.grpo, self.server, self.prompt, self.cache, self.checkpoint,
            self.robustness, self.flower, self.fedpgp,
        ):
            try:
                section.validate()
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        try:
            self.server.validate_round_size(self.clients_per_round)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        try:
            self.faults.validate(self.num_clients, self.rounds, self.robustness)
            self.privacy.validate(self.method)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.privacy.lora_private and self.server.aggregation != "fedavg":
            raise ConfigError(
                f"privacy.lora_epsilon (central DP: a clipped, equal-weight average plus noise) replaces the aggregation "
                f"rule; server.aggregation={self.server.aggregation!r} is not allowed with it; allowed: 'fedavg'"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
