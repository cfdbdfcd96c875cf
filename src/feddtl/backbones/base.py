"""The backbone interface: a dual encoder split into a frozen trunk and a LoRA-trainable tail.

Every tower is ``embedding = tail(trunk(input))``. The trunk (blocks ``< l``) never trains, so its
output can be computed once and cached; the tail (blocks ``>= l``) carries the LoRA adapters. The
algorithm only ever calls ``image_tail`` / ``text_tail`` on trunk features, which keeps that boundary
explicit and makes the cache a pure optimisation.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from feddtl.backbones.lora import inject_lora, load_lora_state, lora_parameters, lora_state_dict
from feddtl.config.lora_config import LoraConfig

LORA_DROPOUT_SEED_SALT = 0x10D0
"""XORed into the seed of ``Backbone.lora_dropout``: callers pass the seed of their own step generator,
and the salt keeps the dropout masks from replaying that generator's stream (both are Mersenne Twisters)."""


class BackboneError(RuntimeError):
    """A backbone cannot be built (missing weights or packages); the message says how to fix it."""


TextFeatures = dict[str, torch.Tensor]
"""Trunk output of the text tower for a batch of prompts: tensors whose first dimension is the prompt."""


@dataclass(frozen=True)
class BackboneInfo:
    """Static facts about a backbone, used for validation and reporting."""

    name: str
    embed_dim: int
    image_size: int
    num_image_blocks: int
    num_text_blocks: int
    default_image_start_block: int
    default_text_start_block: int


class Backbone(nn.Module, abc.ABC):
    """A CLIP-style dual encoder with an explicit trunk/tail split per tower.

    Subclasses build their modules in ``__init__`` and set ``self.info``, ``self.image_mean``,
    ``self.image_std`` (per-channel normalisation applied by the data pipeline) and
    ``self.logit_scale`` (CLIP's 1/τ).
    """

    info: BackboneInfo
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    logit_scale: float

    supports_autocast: bool = False
    """Whether the towers honour ``set_precision`` (hf-clip); the others always run in float32."""

    def __init__(self) -> None:
        super().__init__()
        self.image_start_block: int = 0
        self.text_start_block: int = 0
        self.autocast_dtype: torch.dtype | None = None

    # ----- mixed precision -----------------------------------------------------------------------
    def set_precision(self, dtype: torch.dtype | None) -> None:
        """Run the towers under ``torch.autocast(dtype)`` on their device (None: plain float32). The weights,
        the LoRA parameters and every tower output stay float32; only the arithmetic inside changes."""
        if dtype is not None and not self.supports_autocast:
            raise ValueError(f"backbone {self.info.name!r} runs in float32 only (no mixed precision)")
        self.autocast_dtype = dtype

    @property
    def precision(self) -> str:
        """"float32", or the autocast dtype's name (e.g. "bfloat16")."""
        return "float32" if self.autocast_dtype is None else str(self.autocast_dtype).removeprefix("torch.")

    def autocast(self) -> contextlib.AbstractContextManager:
        """The towers' mixed-precision region: ``torch.autocast`` when ``set_precision`` chose a dtype, else
        nothing at all (the float32 path is the code that ran before mixed precision existed)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device = next(self.parameters()).device
        return torch.autocast(device_type=device.type, dtype=self.autocast_dtype)

    # ----- image tower -------------------------------------------------------------------------
    @abc.abstractmethod
    def image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen part of the image tower: normalised pixels (B, 3, H, W) -> trunk features (B, ...)."""

    @abc.abstractmethod
    def image_tail(self, feats: torch.Tensor) -> torch.Tensor:
        """Trainable part of the image tower: trunk features -> unnormalised embedding (B, D)."""

    # ----- text tower --------------------------------------------------------------------------
    @abc.abstractmethod
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenise prompts into the tensors ``text_trunk`` takes."""

    @abc.abstractmethod
    def text_trunk(self, tokens: dict[str, torch.Tensor]) -> TextFeatures:
        """Frozen part of the text tower: tokens -> trunk features (hidden states plus masks)."""

    @abc.abstractmethod
    def text_tail(self, feats: TextFeatures) -> torch.Tensor:
        """Trainable part of the text tower: trunk features -> unnormalised embedding (P, D)."""

    # ----- text tower from input embeddings (prompt learning) ----------------------------------
    def text_token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The text tower's word (token) embeddings of ``input_ids`` (P, S, H), without positions."""
        raise NotImplementedError(f"backbone {self.info.name!r} does not support prompt learning")

    def text_from_token_embeddings(self, embeds: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        """The whole text tower (trunk and tail, with grad) from word embeddings (P, S, H) that may hold
        learned context vectors in place of some tokens; ``tokens`` are the prompts' ``tokenize`` output
        (masks, and the ids some towers pool by). ``text_from_token_embeddings(text_token_embeddings(ids),
        tokens)`` equals ``text_tail(text_trunk(tokens))``: positions are added inside, as usual."""
        raise NotImplementedError(f"backbone {self.info.name!r} does not support prompt learning")

    # ----- what a build computes -----------------------------------------------------------------
    def derived_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors the build computed from the weights (not loaded from them), e.g. the lite backbone's
        text bridge: a node may keep them on disk and pass them back to ``build_backbone(derived=...)``
        to skip the computation. Default: none."""
        return {}

    @property
    def has_text_tower(self) -> bool:
        """False for a backbone built without its text tower (``build_backbone(text_tower=False)``)."""
        return True

    # ----- LoRA --------------------------------------------------------------------------------
    @abc.abstractmethod
    def lora_targets(self, image_start: int, text_start: int) -> tuple[list[str], list[str]]:
        """Full module names LoRA wraps in the image tail and the text tail."""

    def set_split(self, image_start: int | None, text_start: int | None) -> None:
        """Choose the trunk/tail boundary ``l`` of each tower (None: the backbone's default)."""
        info = self.info
        self.image_start_block = (
            info.default_image_start_block if image_start is None else int(image_start)
        )
        self.text_start_block = info.default_text_start_block if text_start is None else int(text_start)
        if not 0 <= self.image_start_block < info.num_image_blocks:
            raise ValueError(
                f"lora.image_start_block={self.image_start_block} is out of range for backbone "
                f"{info.name!r}: allowed 0..{info.num_image_blocks - 1}"
            )
        if not 0 <= self.text_start_block < info.num_text_blocks:
            raise ValueError(
                f"lora.text_start_block={self.text_start_block} is out of range for backbone "
                f"{info.name!r}: allowed 0..{info.num_text_blocks - 1}"
            )

    def add_lora(self, config: LoraConfig) -> None:
        """Freeze every weight, then wrap the tail modules of both towers with LoRA adapters."""
        self.set_split(config.image_start_block, config.text_start_block)
        for p in self.parameters():
            p.requires_grad_(False)
        image_targets, text_targets = self.lora_targets(self.image_start_block, self.text_start_block)
        inject_lora(self, image_targets + text_targets, config)
        self._image_lora_prefixes = tuple(image_targets)
        self._text_lora_prefixes = tuple(text_targets)
        self.eval()  # BatchNorm statistics and dropout stay as pretrained: only LoRA trains

    def image_lora_state(self) -> dict[str, torch.Tensor]:
        """Current image-tower LoRA weights (detached copies), keyed by parameter name."""
        return lora_state_dict(self, self._image_lora_prefixes)

    def text_lora_state(self) -> dict[str, torch.Tensor]:
        """Current text-tower LoRA weights (detached copies), keyed by parameter name."""
        return lora_state_dict(self, self._text_lora_prefixes)

    def load_image_lora(self, state: dict[str, torch.Tensor]) -> None:
        """Set the image-tower LoRA weights (keys and shapes must match exactly)."""
        load_lora_state(self, self._image_lora_prefixes, state)

    def load_text_lora(self, state: dict[str, torch.Tensor]) -> None:
        """Set the text-tower LoRA weights (keys and shapes must match exactly)."""
        load_lora_state(self, self._text_lora_prefixes, state)

    def image_lora_parameters(self) -> list[nn.Parameter]:
        return list(lora_parameters(self, self._image_lora_prefixes).values())

    def text_lora_parameters(self) -> list[nn.Parameter]:
        return list(lora_parameters(self, self._text_lora_prefixes).values())

    def parameter_bytes(self) -> int:
        """Bytes of all backbone weights (frozen and LoRA), for communication ratios."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    @contextlib.contextmanager
    def lora_dropout(self, seed: int) -> Iterator[None]:
        """Inside the block, ``lora.dropout`` acts on the LoRA branch of both towers; nothing else changes.

        Only the LoRA dropout modules enter training mode (the towers' own dropout, BatchNorm and
        drop-connect stay in eval mode) and they are put back on exit. The masks are drawn from the
        global RNG re-seeded with ``seed`` (salted) inside a fork of it, so a step is reproducible from
        its seed whatever ran before it in the process, and the RNG state outside the block is untouched.
        With ``lora.dropout = 0`` the LoRA layers hold no dropout modules and the block does nothing at all.
        """
        dropouts = [
            module
            for layer in self.modules()
            if isinstance(getattr(layer, "lora_dropout", None), nn.ModuleDict)
            for module in layer.lora_dropout.values()
            if isinstance(module, nn.Dropout) and module.p > 0
        ]
        if not dropouts:
            yield
            return
        device = next(self.parameters()).device
        # Dropout draws from the default generator of the tensor's device: fork (and seed) that one.
        accelerator = None if device.type == "cpu" else torch.get_device_module(device.type)
        forked = [] if accelerator is None else list(range(accelerator.device_count()))
        with torch.random.fork_rng(devices=forked, device_type=None if accelerator is None else device.type):
            salted = seed ^ LORA_DROPOUT_SEED_SALT
            torch.random.default_generator.manual_seed(salted)
            if accelerator is not None:
                accelerator.manual_seed_all(salted)
            before = [module.training for module in dropouts]
            try:
                for module in dropouts:
                    module.train(True)
                yield
            finally:
                for module, mode in zip(dropouts, before):
                    module.train(mode)

    def train(self, mode: bool = True) -> "Backbone":
        # Frozen towers always run in eval mode (BatchNorm running stats, no dropout). LoRA dropout is
        # switched on only inside ``lora_dropout`` (the SFT steps), never through train().
        return super().train(False)
