"""LoRA injection through peft and plain-dict access to the adapter weights.

peft wraps the named modules in place; the weights that travel between clients and server are the
``lora_A`` / ``lora_B`` parameters under those modules, addressed by their full parameter names.
"""

from __future__ import annotations

import re

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from torch import nn

from feddtl.config.lora_config import LoraConfig


def inject_lora(model: nn.Module, targets: list[str], config: LoraConfig) -> None:
    """Wrap exactly the modules named in ``targets`` (full dotted names) with LoRA adapters."""
    if not targets:
        raise ValueError("no LoRA target modules: the tail of a tower is empty")
    names = dict(model.named_modules())
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(f"LoRA targets not found in the model: {missing[:5]}")
    pattern = "^(" + "|".join(re.escape(t) for t in targets) + ")$"
    peft_config = PeftLoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=pattern,
        bias="none",
    )
    inject_adapter_in_model(peft_config, model)
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
