"""LoRA adapters on named ``nn.Linear`` / ``nn.Conv2d`` modules, and plain-dict access to their weights.

The adapters are computed exactly as peft's LoRA layers compute them (peft 0.13-0.21, ``init_lora_weights
= True``, no DoRA / rsLoRA): the same module tree and parameter names (``<target>.base_layer.*``,
``<target>.lora_A.default.weight``, ``<target>.lora_B.default.weight``), the same initialisation drawing
the same random numbers in the same order, and the same forward ``base(x) + B(A(dropout(x))) * alpha / r``.
tests/test_lora.py checks weights, outputs and gradients against peft bit for bit. feddtl does not use peft
itself because importing it imports transformers' modelling code (2-4 s): a Flower ClientApp process pays
that on every message even when its backbone needs no transformers (see docs/flower.md, node cache).

The weights that travel between clients and server are the ``lora_A`` / ``lora_B`` parameters under the
wrapped modules, addressed by their full parameter names.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from feddtl.config.lora_config import LoraConfig

ADAPTER = "default"
"""peft's default adapter name; part of every LoRA parameter name."""


class LoraWrapper(nn.Module):
    """A frozen ``base_layer`` plus the low-rank update ``lora_B(lora_A(dropout(x))) * scaling``.

    Attribute registration order (base_layer, lora_dropout, lora_A, lora_B) is peft's, so parameters
    enumerate in peft's order.
    """

    def __init__(self, base_layer: nn.Module, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        if not isinstance(base_layer, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"LoRA wraps nn.Linear and nn.Conv2d modules, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict({ADAPTER: nn.Dropout(p=dropout) if dropout > 0.0 else nn.Identity()})
        # Creating A then B draws their default initialisation from the global RNG, then A is re-drawn and B
        # zeroed: the random numbers peft consumes, in its order, so a seed gives peft's weights.
        if isinstance(base_layer, nn.Conv2d):
            groups = base_layer.groups
            if rank % groups:
                raise ValueError(f"LoRA rank {rank} must be divisible by the conv layer's groups ({groups})")
            conv = type(base_layer)
            lora_a = conv(
                base_layer.in_channels, rank, base_layer.kernel_size, base_layer.stride, base_layer.padding, bias=False
            )
            lora_b = conv(rank, base_layer.out_channels, (1, 1), (1, 1), groups=groups, bias=False)
        else:
            lora_a = nn.Linear(base_layer.in_features, rank, bias=False)
            lora_b = nn.Linear(rank, base_layer.out_features, bias=False)
        self.lora_A = nn.ModuleDict({ADAPTER: lora_a})
        self.lora_B = nn.ModuleDict({ADAPTER: lora_b})
        nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(lora_b.weight)
        weight = base_layer.weight
        self.lora_A.to(device=weight.device, dtype=weight.dtype)
        self.lora_B.to(device=weight.device, dtype=weight.dtype)
        self.scaling = alpha / rank

    @property
    def weight(self) -> torch.Tensor:
        """The frozen base weight (code that reads ``module.weight`` keeps working, as with peft)."""
        return self.base_layer.weight

    @torch.no_grad()
    def merged_base_layer(self) -> nn.Module:
        """The base layer with ``W + scaling * B A`` in its weight, as peft's ``merge(safe_merge=True)``
        computes it (nn.Linear, 1x1 nn.Conv2d); the wrapper must not be used afterwards."""
        base = self.base_layer
        a, b = self.lora_A[ADAPTER].weight, self.lora_B[ADAPTER].weight
        # peft casts half-precision CPU weights to float32 for the product (slow fp16 matmuls on CPU)
        half_on_cpu = b.device.type == "cpu" and b.dtype in (torch.float16, torch.bfloat16)
        if half_on_cpu:
            a, b = a.float(), b.float()
        if isinstance(base, nn.Linear):
            delta = (b @ a) * self.scaling
        elif base.weight.shape[2:4] == (1, 1):
            delta = (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * self.scaling
        else:
            raise NotImplementedError("merging LoRA into a conv layer with a kernel larger than 1x1")
        if half_on_cpu:
            delta = delta.to(self.lora_B[ADAPTER].weight.dtype)
        weight = base.weight.data.clone()
        weight += delta.to(weight.dtype)
        if not torch.isfinite(weight).all():
            raise ValueError("NaNs or infinities in the merged LoRA weights")
        base.weight.data = weight
        return base

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        result_dtype = result.dtype
        lora_a = self.lora_A[ADAPTER]
        if x.dtype != lora_a.weight.dtype:
            x = x.to(lora_a.weight.dtype)
        result = result + self.lora_B[ADAPTER](lora_a(self.lora_dropout[ADAPTER](x))) * self.scaling
        return result.to(result_dtype)


def inject_lora(model: nn.Module, targets: list[str], config: LoraConfig) -> None:
    """Wrap exactly the modules named in ``targets`` (full dotted names) with LoRA adapters, in the
    model's module order (the order in which the adapters draw their initial weights)."""
    if not targets:
        raise ValueError("no LoRA target modules: the tail of a tower is empty")
    names = dict(model.named_modules())
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"LoRA targets not found in the model: {missing[:5]}")
    wanted = set(targets)
    for name in [n for n, _ in model.named_modules() if n in wanted]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoraWrapper(getattr(parent, child), config.rank, config.alpha, config.dropout))
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return ".lora_" in name and any(name.startswith(p + ".") for p in prefixes)


def lora_parameters(model: nn.Module, prefixes: tuple[str, ...]) -> dict[str, nn.Parameter]:
    """The live LoRA parameters of the modules under ``prefixes``, in a stable order."""
    return {n: p for n, p in model.named_parameters() if _under(n, prefixes)}


def lora_state_dict(model: nn.Module, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Detached copies of the LoRA weights under ``prefixes``."""
    return {n: p.detach().cpu().clone() for n, p in lora_parameters(model, prefixes).items()}


def load_lora_state(model: nn.Module, prefixes: tuple[str, ...], state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the LoRA weights under ``prefixes``; keys and shapes must match exactly."""
    params = lora_parameters(model, prefixes)
    if set(params) != set(state):
        extra, missing = sorted(set(state) - set(params)), sorted(set(params) - set(state))
        raise ValueError(f"LoRA state does not match the model: unexpected {extra[:3]}, missing {missing[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            value = state[name]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"LoRA weight {name}: shape {tuple(value.shape)} != {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))
