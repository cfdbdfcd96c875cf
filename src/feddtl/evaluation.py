"""Base-to-novel evaluation (DESIGN.md, "Evaluation protocol").

Base: test images of base classes, classified among base classes. Novel: test images of novel
classes among novel classes, with text embeddings from the trained server text encoder.
Local: for each client, test images of the classes in its training data, classified among those
classes; averaged over clients (personalised methods: each client with its own class embeddings).
HM = 2 B N / (B + N).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from feddtl.algorithm.encoding import TrunkFeatures, image_embeddings
from feddtl.backbones.base import Backbone


@dataclass
class EvalSet:
    """Cached trunk features of the test images, split by base / novel classes."""

    base_features: TrunkFeatures
    base_labels: torch.Tensor
    """(N_b,) base-class indices."""
    novel_features: TrunkFeatures
    novel_labels: torch.Tensor
    """(N_n,) novel-class indices."""
    client_classes: list[list[int]]
    """Base-class indices present in each client's training data."""
    domain_names: list[str] | None = None
    """Feature-shift datasets: the domains' names; None for datasets without domains."""
    base_domains: torch.Tensor | None = None
    """(N_b,) domain id of each base test image (with ``domain_names``)."""
    novel_domains: torch.Tensor | None = None
    """(N_n,) domain id of each novel test image (with ``domain_names``)."""


def harmonic_mean(base: float, novel: float) -> float:
    return 0.0 if base + novel <= 0 else 2 * base * novel / (base + novel)


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * (logits.argmax(-1) == labels).float().mean().item() if len(labels) else float("nan")


def local_accuracy(
    base_logits: torch.Tensor,
    labels: torch.Tensor,
    client_classes: Sequence[Sequence[int]],
    client_logits: Sequence[torch.Tensor] | None = None,
) -> list[float]:
    """Per client: accuracy on its classes' test images, classified among its own classes.

    ``client_logits``: per client, its own base-class logits of every test image (personalised methods);
    None: every client is scored with ``base_logits``.
    """
    if client_logits is not None and len(client_logits) != len(client_classes):
        raise ValueError(f"{len(client_logits)} clients' logits for {len(client_classes)} clients")
    out = []
    for i, classes in enumerate(client_classes):
        cls = torch.tensor(sorted(classes), dtype=torch.long)
        mask = torch.isin(labels, cls)
        if not mask.any():
            out.append(float("nan"))
            continue
        logits = base_logits if client_logits is None else client_logits[i]
        sub = logits[mask][:, cls]
        # map labels to positions within the client's class list
        pos = torch.searchsorted(cls, labels[mask])
        out.append(accuracy(sub, pos))
    return out


@torch.no_grad()
def evaluate(
    backbone: Backbone,
    eval_set: EvalSet,
    base_T: torch.Tensor,
    novel_T: torch.Tensor,
    batch_size: int,
    client_base_T: Sequence[torch.Tensor] | None = None,
) -> dict[str, Any]:
    """Base / Novel / Local accuracy and HM (percent) of the model loaded in ``backbone``; with domains,
    also ``per_domain_acc`` (domain -> base / novel / hm).

    ``client_base_T``: per client, the base-class text embeddings its Local accuracy uses (personalised
    methods, ``Method.prepare_local_eval``); None: ``base_T`` for every client.
    """
    zb = image_embeddings(backbone, eval_set.base_features, batch_size)
    zn = image_embeddings(backbone, eval_set.novel_features, batch_size)
    base_logits = zb @ base_T.T
    novel_logits = zn @ novel_T.T
    base_acc = accuracy(base_logits, eval_set.base_labels)
    novel_acc = accuracy(novel_logits, eval_set.novel_labels)
    client_logits = None if client_base_T is None else [zb @ T.T for T in client_base_T]
    per_client = local_accuracy(base_logits, eval_set.base_labels, eval_set.client_classes, client_logits)
    valid = [a for a in per_client if a == a]
    out: dict[str, Any] = {
        "base_acc": base_acc,
        "novel_acc": novel_acc,
        "hm": harmonic_mean(base_acc, novel_acc),
        "local_acc": sum(valid) / len(valid) if valid else float("nan"),
        "local_acc_per_client": per_client,
    }
    if eval_set.domain_names is not None and eval_set.base_domains is not None and eval_set.novel_domains is not None:
        out["per_domain_acc"] = per_domain_accuracy(
            base_logits, eval_set.base_labels, eval_set.base_domains,
            novel_logits, eval_set.novel_labels, eval_set.novel_domains, eval_set.domain_names,
        )
    return out


def per_domain_accuracy(
    base_logits: torch.Tensor, base_labels: torch.Tensor, base_domains: torch.Tensor,
    novel_logits: torch.Tensor, novel_labels: torch.Tensor, novel_domains: torch.Tensor, names: Sequence[str],
) -> dict[str, dict[str, float]]:
    """Per domain: Base and Novel accuracy on that domain's test images, and their HM."""
    out = {}
    for d, name in enumerate(names):
        b_mask, n_mask = base_domains == d, novel_domains == d
        b = accuracy(base_logits[b_mask], base_labels[b_mask])
        n = accuracy(novel_logits[n_mask], novel_labels[n_mask])
        out[name] = {"base": b, "novel": n, "hm": harmonic_mean(b, n) if b == b and n == n else float("nan")}
    return out


# ----- evaluation by counts: each SuperNode on its own test images, pooled on the server -------------------


@dataclass
class ClassCounts:
    """Correct and total test images per class of one group (base or novel classes, or a client's Local)."""

    correct: torch.Tensor
    """(C,) int64."""
    total: torch.Tensor
    """(C,) int64."""

    @classmethod
    def zeros(cls, num_classes: int) -> ClassCounts:
        return cls(torch.zeros(num_classes, dtype=torch.long), torch.zeros(num_classes, dtype=torch.long))

    def accuracy(self) -> float:
        """Percent of all counted images (NaN when there are none)."""
        total = int(self.total.sum())
        return 100.0 * int(self.correct.sum()) / total if total else float("nan")

    def __add__(self, other: ClassCounts) -> ClassCounts:
        return ClassCounts(self.correct + other.correct, self.total + other.total)


@dataclass
class EvalCounts:
    """One node's evaluation: per-class counts of Base (base test images among the base classes), Novel
    (novel among novel) and Local (its own training classes' test images among those classes, indexed by
    base class)."""

    base: ClassCounts
    novel: ClassCounts
    local: ClassCounts


def class_counts(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> ClassCounts:
    """Per true class: how many of ``labels`` the ``predicted`` classes got right, and how many there are."""
    hit = (predicted == labels).double()
    return ClassCounts(
        torch.bincount(labels, weights=hit, minlength=num_classes).round().long(),
        torch.bincount(labels, minlength=num_classes).long(),
    )


@torch.no_grad()
def evaluate_counts(
    backbone: Backbone,
    eval_set: EvalSet,
    base_T: torch.Tensor,
    novel_T: torch.Tensor,
    batch_size: int,
    local_T: torch.Tensor | None = None,
) -> EvalCounts:
    """``evaluate``'s Base / Novel / Local as counts, for one client's test images (``eval_set``, whose
    ``client_classes`` holds that one client's classes). ``local_T``: the client's own base-class embeddings
    (personalised methods); None: ``base_T``."""
    if len(eval_set.client_classes) != 1:
        raise ValueError(f"evaluate_counts scores one client, got {len(eval_set.client_classes)}")
    zb = image_embeddings(backbone, eval_set.base_features, batch_size)
    zn = image_embeddings(backbone, eval_set.novel_features, batch_size)
    num_base, labels = len(base_T), eval_set.base_labels
    own = torch.tensor(sorted(eval_set.client_classes[0]), dtype=torch.long)
    mask = torch.isin(labels, own)
    # Local: among the client's own classes, as ``local_accuracy``; counted by base class
    among_own = own[(zb[mask] @ (base_T if local_T is None else local_T).T)[:, own].argmax(-1)]
    return EvalCounts(
        base=class_counts((zb @ base_T.T).argmax(-1), labels, num_base),
        novel=class_counts((zn @ novel_T.T).argmax(-1), eval_set.novel_labels, len(novel_T)),
        local=class_counts(among_own, labels[mask], num_base),
    )


def pool_counts(
    per_client: dict[int, EvalCounts], num_clients: int, base_names: Sequence[str], novel_names: Sequence[str]
) -> dict[str, Any]:
    """The clients' counts summed, class by class: Base, Novel and Local accuracy are correct / total over
    every client's images (each image counts once, whichever client holds it), HM of Base and Novel;
    ``local_acc_per_client`` each client's own (NaN for one that did not report); and ``eval_counts``,
    the per-class and per-client counts themselves."""
    groups = {"base": len(base_names), "novel": len(novel_names), "local": len(base_names)}
    pooled = {g: ClassCounts.zeros(n) for g, n in groups.items()}
    for counts in per_client.values():
        for g in groups:
            pooled[g] = pooled[g] + getattr(counts, g)
    names = {"base": list(base_names), "novel": list(novel_names), "local": list(base_names)}
    base, novel = pooled["base"].accuracy(), pooled["novel"].accuracy()
    return {
        "base_acc": base,
        "novel_acc": novel,
        "hm": harmonic_mean(base, novel),
        "local_acc": pooled["local"].accuracy(),
        "local_acc_per_client": [
            per_client[k].local.accuracy() if k in per_client else float("nan") for k in range(num_clients)
        ],
        "evaluation": "nodes",
        "eval_counts": {
            "per_class": {
                g: {"classes": names[g], "correct": c.correct.tolist(), "total": c.total.tolist()}
                for g, c in pooled.items()
            },
            "per_client": {
                str(k): {g: [int(getattr(c, g).correct.sum()), int(getattr(c, g).total.sum())] for g in groups}
                for k, c in sorted(per_client.items())
            },
        },
    }
