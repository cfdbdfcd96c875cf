"""Server-side checks of a client update before aggregation: pure functions, no server state.

One malformed or hostile update must neither crash the server nor poison the global model, so every
update is checked against what the server sent and what it knows about the client; a failing update
is excluded with the reason. The in-process simulator and the Flower server call the same functions.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from feddtl.algorithm.messages import ClientUpdate

NORM_TOLERANCE = 1e-3
"""How far an uploaded embedding's L2 norm may be from 1."""


@dataclass(frozen=True)
class UpdateSpec:
    """What the server expects from one client in one round."""

    reference: Mapping[str, torch.Tensor]
    """The global image LoRA the client was sent: the update must have its keys, shapes and dtypes, and
    its distance from it is the update norm."""
    embed_dim: int
    """D, the dimension of the shared embedding space."""
    num_classes: int
    """Base classes: labels must lie in [0, num_classes)."""
    client_classes: Sequence[int] | None = None
    """Base-class indices the client holds (None: not known, only the range is checked)."""
    cap_per_class: int | None = None
    """Most embeddings one class may have (client.upload_cap_per_class; 1 for prototypes; None: no cap)."""
    max_norm: float | None = None
    """Bound on the update norm; None: no bound."""
    client_id: int | None = None
    """The id the server asked; an update that claims another one is rejected."""
    max_samples: int | None = None
    """The client's known number of training images, if the server knows it: a larger num_samples claim
    (which would inflate its aggregation weight) is rejected."""
    extra_reference: Mapping[str, torch.Tensor] | None = None
    """The method-specific tensors the update must carry in ``extra`` (``Method.update_extra_reference``:
    e.g. FedLoRA's text LoRA, PromptFL's context, FedPGP's sigma and personal U, V), with the values the
    client was sent; they are checked like the LoRA states and count in the update norm. None: the update
    must carry no ``extra`` tensors (FedDTL)."""


def _check_state(name: str, state: object, reference: Mapping[str, torch.Tensor]) -> str | None:
    if not isinstance(state, Mapping):
        return f"{name} is not a mapping of tensors"
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        return f"{name} keys differ from the global model: missing {missing[:3]}, unexpected {extra[:3]}"
    for key, ref in reference.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            return f"{name}[{key}] is not a tensor"
        if tuple(value.shape) != tuple(ref.shape):
            return f"{name}[{key}] has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        if value.dtype != ref.dtype:
            return f"{name}[{key}] has dtype {value.dtype}, expected {ref.dtype}"
        if not torch.isfinite(value).all():
            return f"{name}[{key}] holds non-finite values (NaN or inf)"
    return None


def update_norm(state: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of (state - reference) over all tensors (keys and shapes already checked)."""
    total = torch.zeros((), dtype=torch.float64)
    for key in sorted(reference):  # a fixed order: the float sum must not depend on dict order
        diff = state[key].detach().to(torch.float64).cpu() - reference[key].detach().to(torch.float64).cpu()
        total += diff.square().sum()
    return float(total.sqrt())


def _check_embeddings(update: ClientUpdate, spec: UpdateSpec) -> str | None:
    emb, labels = update.embeddings, update.labels
    if not isinstance(emb, torch.Tensor) or not isinstance(labels, torch.Tensor):
        return "embeddings and labels must be tensors"
    if labels.ndim != 1:
        return f"labels have shape {tuple(labels.shape)}, expected (n,)"
    if len(labels) == 0 and emb.numel() == 0:
        return None  # nothing uploaded (methods without a server text step)
    if emb.ndim != 2 or emb.shape[1] != spec.embed_dim:
        return f"embeddings have shape {tuple(emb.shape)}, expected (n, {spec.embed_dim}) (wrong dimension)"
    if len(emb) != len(labels):
        return f"{len(emb)} embeddings but {len(labels)} labels"
    if not emb.dtype.is_floating_point:
        return f"embeddings have dtype {emb.dtype}, expected a float type"
    if labels.dtype != torch.long:
        return f"labels have dtype {labels.dtype}, expected int64"
    if not torch.isfinite(emb).all():
        return "embeddings hold non-finite values (NaN or inf)"
    norms = emb.detach().to(torch.float64).norm(dim=1)
    if ((norms - 1).abs() > NORM_TOLERANCE).any():
        worst = float(norms[(norms - 1).abs().argmax()])
        return f"embeddings are not L2-normalised (a norm of {worst:.4g})"
    if labels.min() < 0 or labels.max() >= spec.num_classes:
        return f"labels outside [0, {spec.num_classes}): range [{int(labels.min())}, {int(labels.max())}]"
    if spec.client_classes is not None:
        foreign = sorted(set(labels.tolist()) - set(int(c) for c in spec.client_classes))
        if foreign:
            return f"labels {foreign[:5]} are not classes of this client (it holds {sorted(spec.client_classes)})"
    if spec.cap_per_class is not None:
        counts = torch.bincount(labels, minlength=spec.num_classes)
        worst = int(counts.argmax())
        if counts[worst] > spec.cap_per_class:
            return f"{int(counts[worst])} embeddings of class {worst}, more than the cap of {spec.cap_per_class} per class"
    if len(labels) > update.num_samples:
        return f"{len(labels)} embeddings uploaded from {update.num_samples} images"
    return None


def validate_update(update: ClientUpdate, spec: UpdateSpec) -> str | None:
    """The reason ``update`` must be excluded from aggregation, or None if it passes every check.

    Never raises: whatever a client sends, the server gets a reason, not an exception.
    """
    try:
        return _validate(update, spec)
    except Exception as exc:  # a malformed object the checks did not foresee
        return f"malformed update ({type(exc).__name__}: {exc})"


def _validate(update: ClientUpdate, spec: UpdateSpec) -> str | None:
    if not isinstance(update, ClientUpdate):
        return f"not a client update ({type(update).__name__})"
    if spec.client_id is not None and update.client_id != spec.client_id:
        return f"update claims client id {update.client_id!r}, expected {spec.client_id}"
    n = update.num_samples
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        return f"num_samples must be an integer >= 1, got {n!r}"
    if spec.max_samples is not None and n > spec.max_samples:
        return f"num_samples={n} exceeds the client's {spec.max_samples} training images"
    reason = _check_state("image_lora", update.image_lora, spec.reference)
    if reason is None and spec.extra_reference is not None:
        reason = _check_state("extra", update.extra, spec.extra_reference)
    elif reason is None and update.extra:
        reason = f"unexpected extra tensors in the update: {sorted(update.extra)[:3]}"
    if reason is not None:
        return reason
    if spec.max_norm is not None:
        norm = update_norm(update.image_lora, spec.reference)
        if spec.extra_reference is not None:
            norm = (norm**2 + update_norm(update.extra, spec.extra_reference) ** 2) ** 0.5
        if not norm <= spec.max_norm:
            return f"update norm {norm:.4g} is above the bound {spec.max_norm:.4g} (robustness.max_update_norm)"
    return _check_embeddings(update, spec)
