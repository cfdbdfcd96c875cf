"""Ablation "decoupled only": FedDTL's decoupled training with SFT in every round (no RL stage).

Image LoRA on clients with cross-entropy, text LoRA on the server from the uploaded embeddings:
FedDTL with M = rounds, whatever ``client.switch_round`` says.
"""

from __future__ import annotations

from feddtl.methods.feddtl import FedDTL


class FedDTLDecoupled(FedDTL):
    name = "feddtl-decoupled"

    def stage(self, round_num: int) -> str:
        return "sft"
