"""Ablation "two-stage only": FedLoRA (both towers local, FedAvg of all LoRA) with FedDTL's local
SFT -> GRPO schedule, and no decoupling (no embedding upload, no server text step).

Rounds <= M run cross-entropy, later rounds the GRPO objective of DESIGN.md with T from the client's
own text tower. The text LoRA gets the RL gradient too (FedLoRA trains both towers locally; only the
objective changes). The KL reference mixes the end-of-SFT model (image and text LoRA at round M,
each with its own T) with the latest global model.
"""

from __future__ import annotations

from feddtl.methods.fedlora import FedLoRA


class FedDTLTwoStage(FedLoRA):
    name = "feddtl-twostage"
    two_stage = True
