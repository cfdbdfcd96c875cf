"""The method registry: name -> "module:Class". Adding a method is one file plus one entry here.

Data only: config validates method names against it without importing the methods (they sit far
above config in the import order); ``feddtl.methods.get_method`` imports the class on demand.
"""

from __future__ import annotations

METHODS: dict[str, str] = {
    "feddtl": "feddtl.methods.feddtl:FedDTL",
    "feddtl-decoupled": "feddtl.methods.feddtl_decoupled:FedDTLDecoupled",
    "feddtl-twostage": "feddtl.methods.feddtl_twostage:FedDTLTwoStage",
    "fedlora": "feddtl.methods.fedlora:FedLoRA",
    "fedpgp": "feddtl.methods.fedpgp:FedPGP",
    "promptfl": "feddtl.methods.promptfl:PromptFL",
    "zeroshot": "feddtl.methods.zeroshot:ZeroShot",
}


def available_methods() -> list[str]:
    return sorted(METHODS)
