"""Evaluation on the SuperNodes <-> Flower records, checked on arrival (a ``node-local`` run's evaluation).

Server -> node (an EVALUATE message): the configuration and the run's class names, the global model's image
LoRA, and the class text embeddings (base, novel, and the node's own base embeddings for a personalised
method). Node -> server: per-class correct / total counts of Base, Novel and Local on the node's own test
images (``evaluation.EvalCounts``), never an image or an embedding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from flwr.app import ConfigRecord, RecordDict

from feddtl.evaluation import ClassCounts, EvalCounts
from feddtl.flower.records import (
    RecordError,
    TensorSpec,
    array_record,
    check_finite,
    checked_state,
    record_to_tensors,
    tensors_to_record,
)

EVAL = "feddtl.eval"
"""ConfigRecord: experiment (the resolved config as TOML), classes (the run's class names), round."""
EVAL_IMAGE_LORA = "feddtl.eval.image_lora"
EVAL_TEXT = "feddtl.eval.text"
"""ArrayRecord: base (C_base, D), novel (C_novel, D) and, for a personalised method, local (C_base, D)."""
EVAL_COUNTS = "feddtl.eval.counts"
"""ArrayRecord of the reply: {base,novel,local}_{correct,total}, int64 per class."""
GROUPS = ("base", "novel", "local")


def eval_to_records(
    experiment_toml: str, classes: Sequence[str], round_num: int, image_lora: Mapping[str, torch.Tensor],
    base_T: torch.Tensor, novel_T: torch.Tensor, local_T: torch.Tensor | None = None,
) -> RecordDict:
    content = RecordDict()
    content[EVAL] = ConfigRecord({"experiment": experiment_toml, "classes": list(classes), "round": round_num})
    content[EVAL_IMAGE_LORA] = tensors_to_record(image_lora)
    text = {"base": base_T, "novel": novel_T, **({"local": local_T} if local_T is not None else {})}
    content[EVAL_TEXT] = tensors_to_record(text)
    return content


def eval_from_records(
    content: RecordDict, image_lora: TensorSpec, num_base: int, num_novel: int, embed_dim: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(image LoRA, base_T, novel_T, local_T or None), checked against the node's model and the run's classes."""
    image = array_record(content, EVAL_IMAGE_LORA)
    lora = {} if len(image) == 0 else checked_state(image, image_lora, EVAL_IMAGE_LORA)
    text = record_to_tensors(array_record(content, EVAL_TEXT), EVAL_TEXT)
    out = []
    for name, rows, required in (("base", num_base, True), ("novel", num_novel, True), ("local", num_base, False)):
        T = text.get(name)
        if T is None and not required:
            out.append(None)
            continue
        if T is None or tuple(T.shape) != (rows, embed_dim) or not T.is_floating_point():
            got = "nothing" if T is None else f"{tuple(T.shape)} {T.dtype}"
            raise RecordError(f"{EVAL_TEXT}[{name!r}] must be a float ({rows}, {embed_dim}) array, got {got}")
        check_finite(T, f"{EVAL_TEXT}[{name!r}]")
        out.append(T)
    return lora, out[0], out[1], out[2]


def counts_to_records(counts: EvalCounts) -> RecordDict:
    content = RecordDict()
    content[EVAL_COUNTS] = tensors_to_record({
        f"{g}_{what}": getattr(getattr(counts, g), what) for g in GROUPS for what in ("correct", "total")
    })
    return content


def counts_from_records(content: RecordDict, num_base: int, num_novel: int) -> EvalCounts:
    """A node's counts, checked: int64 per class of the right length, 0 <= correct <= total."""
    got = record_to_tensors(array_record(content, EVAL_COUNTS), EVAL_COUNTS)
    groups = {}
    for g, length in (("base", num_base), ("novel", num_novel), ("local", num_base)):
        pair = []
        for what in ("correct", "total"):
            t = got.get(f"{g}_{what}")
            if t is None or t.dtype != torch.int64 or tuple(t.shape) != (length,) or bool((t < 0).any()):
                shown = "nothing" if t is None else f"{tuple(t.shape)} {t.dtype}"
                raise RecordError(f"{EVAL_COUNTS}[{g + '_' + what!r}] must be {length} int64 counts >= 0, got {shown}")
            pair.append(t)
        if bool((pair[0] > pair[1]).any()):
            raise RecordError(f"{EVAL_COUNTS}: more {g} images correct than there are, for some class")
        groups[g] = ClassCounts(*pair)
    return EvalCounts(**groups)
