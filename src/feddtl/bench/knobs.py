"""The open knobs of each method: the hyper-parameters a tuning sweep may search (issue 14's list).

Data only, so a suite can be checked without importing the methods. Every registered method has an entry
(tests/test_tuning.py checks it); a method with none (zeroshot) is not tuned.
"""

from __future__ import annotations

OPEN_KNOBS: dict[str, tuple[str, ...]] = {
    "zeroshot": (),
    "fedlora": ("client.lr", "client.text_lr"),
    "promptfl": ("client.lr", "prompt.ctx_init"),
    "fedpgp": ("client.lr", "fedpgp.contrastive_weight", "fedpgp.rank"),
    "feddtl-decoupled": ("client.lr", "server.text_epochs", "server.text_lr"),
    "feddtl-twostage": ("client.lr", "client.switch_round", "client.text_lr"),
    "feddtl": ("client.lr", "server.text_epochs", "server.text_lr", "client.switch_round"),
}
"""Per method, the dotted config keys it may tune. Every method shares the local learning rate; the rest
are what each method adds: FedDTL's server text step (epochs, lr) and switch round M, the ablations the
parts of FedDTL they keep, FedLoRA's local text lr, PromptFL's context (its length, through the words that
initialise it: prompt.ctx_init), FedPGP's lambda and rank. PromptFL's and FedPGP's learning rate is
client.lr (prompt.lr stays none)."""


def tunable(method: str) -> bool:
    return bool(OPEN_KNOBS.get(method))
