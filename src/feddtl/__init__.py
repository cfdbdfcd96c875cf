"""feddtl: federated decoupled training of CLIP-style vision-language models (FedDTL)."""

__version__ = "0.1.0"
