"""Method registry: adding a method is one file plus one entry here."""

from __future__ import annotations

from importlib import import_module

# name -> "module:Class", imported lazily so the config module can list names without torch work.
_REGISTRY: dict[str, str] = {
    "feddtl": "feddtl.methods.feddtl:FedDTL",
    "feddtl-decoupled": "feddtl.methods.feddtl_decoupled:FedDTLDecoupled",
    "feddtl-twostage": "feddtl.methods.feddtl_twostage:FedDTLTwoStage",
    "fedlora": "feddtl.methods.fedlora:FedLoRA",
    "fedpgp": "feddtl.methods.fedpgp:FedPGP",
    "promptfl": "feddtl.methods.promptfl:PromptFL",
    "zeroshot": "feddtl.methods.zeroshot:ZeroShot",
}


def available_methods() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> type:
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; allowed: {', '.join(available_methods())}")
    module, cls = _REGISTRY[name].split(":")
    return getattr(import_module(module), cls)
