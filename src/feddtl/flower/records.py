"""ClientTask / ClientUpdate <-> Flower records, and validation of what arrives.

Tensors travel as numpy arrays in ``ArrayRecord`` (numpy's own format, never pickle), numbers as
``MetricRecord``, round, stage and the experiment's configuration as ``ConfigRecord``. Whatever
arrives from the other side is checked against what this side expects (keys, shapes, dtypes,
label range, finiteness) before any of it reaches the algorithm.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from feddtl.algorithm.messages import ClientTask, ClientUpdate

# Record names inside a message's RecordDict.
TASK = "feddtl.task"
"""ConfigRecord: round, stage, experiment (the resolved config as TOML), classes (the run's class names: a
node with its own data matches its classes onto them)."""
TASK_IMAGE_LORA = "feddtl.task.image_lora"
TASK_CLASS_EMBEDDINGS = "feddtl.task.class_embeddings"
TASK_SFT_REFERENCE = "feddtl.task.sft_reference_lora"
TASK_EXTRA = "feddtl.task.extra"
"""ArrayRecord of ClientTask.extra (another method's own tensors, e.g. FedLoRA's text LoRA, a prompt
context); absent when empty."""
HELLO = "feddtl.hello"
"""ConfigRecord of the handshake: experiment and the run's class names (query) / partition-id, num-partitions,
classes, num-examples, class-counts, and for a node with its own data: data, excluded, test-base-counts,
test-novel-counts (reply; see ``NodeReport``)."""
HELLO_VERSIONS = "feddtl.hello.versions"
"""ConfigRecord of the handshake reply: the node's feddtl, torch and transformers versions and backbone
weights fingerprint (string values; see flower.versions)."""
UPDATE_INFO = "feddtl.update.info"
"""MetricRecord: client-id, num-examples."""
UPDATE_METRICS = "feddtl.update.metrics"
UPDATE_IMAGE_LORA = "feddtl.update.image_lora"
UPDATE_EMBEDDINGS = "feddtl.update.embeddings"
"""ArrayRecord: embeddings (n, D) float, labels (n,) int64."""
UPDATE_EXTRA = "feddtl.update.extra"
"""ArrayRecord of ClientUpdate.extra; absent when empty. Its names and shapes are the method's business:
the server's update validation checks them (``Method.update_extra_reference``)."""

STAGES = ("sft", "rl")

TensorSpec = Mapping[str, torch.Tensor]
"""Expected tensors by name (their shapes and dtypes are what is checked; values are ignored)."""


class RecordError(ValueError):
    """A message whose records are missing, malformed or inconsistent with what this side expects."""


# ----- tensors <-> ArrayRecord --------------------------------------------------------------------


def tensors_to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in tensors.items()})


def record_to_tensors(record: ArrayRecord, what: str) -> dict[str, torch.Tensor]:
    out = {}
    for key, array in record.items():
        try:
            value = array.numpy()
        except (TypeError, ValueError) as exc:
            raise RecordError(f"{what}[{key!r}] is not a numpy array: {exc}") from None
        out[key] = torch.from_numpy(np.ascontiguousarray(value))
    return out


def check_finite(tensor: torch.Tensor, what: str) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise RecordError(f"{what} holds NaN or infinite values")


def checked_state(record: ArrayRecord, expected: TensorSpec, what: str) -> dict[str, torch.Tensor]:
    """A LoRA state from ``record``, with exactly the expected names, shapes and dtypes, in expected order."""
    got = record_to_tensors(record, what)
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise RecordError(
            f"{what}: tensor names differ from this side's model (missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}): both sides must use the same backbone and LoRA config"
        )
    out = {}
    for name, ref in expected.items():
        value = got[name]
        if tuple(value.shape) != tuple(ref.shape) or value.dtype != ref.dtype:
            raise RecordError(
                f"{what}[{name!r}]: got {tuple(value.shape)} {value.dtype}, expected {tuple(ref.shape)} {ref.dtype}"
            )
        check_finite(value, f"{what}[{name!r}]")
        out[name] = value
    return out


def _extra(content: RecordDict, name: str) -> dict[str, torch.Tensor]:
    """Method-specific tensors of an optional record (empty if absent); float values must be finite."""
    record = content.get(name)
    if record is None:
        return {}
    if not isinstance(record, ArrayRecord):
        raise RecordError(f"{name} must be an ArrayRecord, got {type(record).__name__}")
    extra = record_to_tensors(record, name)
    for key, value in extra.items():
        check_finite(value, f"{name}[{key!r}]")
    return extra


def array_record(content: RecordDict, name: str) -> ArrayRecord:
    record = content.get(name)
    if not isinstance(record, ArrayRecord):
        raise RecordError(f"message lacks the ArrayRecord {name!r}")
    return record


def _int(record: Mapping[str, object], key: str, what: str) -> int:
    value = record.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RecordError(f"{what}[{key!r}] must be an integer, got {value!r}")
    return value


def _str(record: Mapping[str, object], key: str, what: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise RecordError(f"{what}[{key!r}] must be a string, got {type(value).__name__}")
    return value


# ----- server -> client ---------------------------------------------------------------------------


def task_to_records(task: ClientTask, experiment_toml: str, classes: Sequence[str] = ()) -> RecordDict:
    """The round's task plus the resolved configuration and the run's class names (a client needs nothing
    else to train)."""
    content = RecordDict()
    content[TASK] = ConfigRecord(
        {"round": task.round, "stage": task.stage, "experiment": experiment_toml, "classes": list(classes)}
    )
    content[TASK_IMAGE_LORA] = tensors_to_record(task.image_lora)
    content[TASK_CLASS_EMBEDDINGS] = tensors_to_record({"embeddings": task.class_embeddings})
    if task.sft_reference_lora is not None:
        content[TASK_SFT_REFERENCE] = tensors_to_record(task.sft_reference_lora)
    if task.extra:
        content[TASK_EXTRA] = tensors_to_record(task.extra)
    return content


def experiment_of(content: RecordDict, record_name: str = TASK) -> str:
    """The configuration TOML a message carries (task or handshake)."""
    record = content.get(record_name)
    if not isinstance(record, ConfigRecord):
        raise RecordError(f"message lacks the ConfigRecord {record_name!r}")
    return _str(record, "experiment", record_name)


def classes_of(content: RecordDict, record_name: str = TASK) -> list[str]:
    """The run's class names a message carries (task, handshake, evaluation)."""
    record = content.get(record_name)
    if not isinstance(record, ConfigRecord):
        raise RecordError(f"message lacks the ConfigRecord {record_name!r}")
    names = record.get("classes")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RecordError(f"{record_name}['classes'] must be a list of class names, got {names!r}")
    return list(names)


def task_from_records(
    content: RecordDict,
    image_lora: TensorSpec,
    num_classes: int,
    embed_dim: int,
) -> ClientTask:
    """Rebuild and check a ClientTask against the client's own model (LoRA names/shapes, class count, D)."""
    meta = content.get(TASK)
    if not isinstance(meta, ConfigRecord):
        raise RecordError(f"message lacks the ConfigRecord {TASK!r}")
    round_num = _int(meta, "round", TASK)
    if round_num < 1:
        raise RecordError(f"{TASK}['round'] must be >= 1, got {round_num}")
    stage = _str(meta, "stage", TASK)
    if stage not in STAGES:
        raise RecordError(f"{TASK}['stage'] must be one of {STAGES}, got {stage!r}")
    embeddings = record_to_tensors(array_record(content, TASK_CLASS_EMBEDDINGS), TASK_CLASS_EMBEDDINGS)
    T = embeddings.get("embeddings")
    # zero rows: a method whose clients compute the class embeddings themselves (PromptFL, FedPGP)
    if T is None or tuple(T.shape) not in ((num_classes, embed_dim), (0, embed_dim)) or not T.is_floating_point():
        got = "nothing" if T is None else f"{tuple(T.shape)} {T.dtype}"
        raise RecordError(
            f"{TASK_CLASS_EMBEDDINGS}['embeddings'] must be a float ({num_classes}, {embed_dim}) array "
            f"(base classes x embedding size) or (0, {embed_dim}), got {got}"
        )
    check_finite(T, TASK_CLASS_EMBEDDINGS)
    sft = content.get(TASK_SFT_REFERENCE)
    image = array_record(content, TASK_IMAGE_LORA)
    return ClientTask(
        round=round_num,
        stage=stage,  # type: ignore[arg-type]
        # empty: a method that leaves the image tower as shipped (PromptFL, FedPGP) sends no image LoRA
        image_lora={} if len(image) == 0 else checked_state(image, image_lora, TASK_IMAGE_LORA),
        class_embeddings=T,
        sft_reference_lora=None if sft is None else checked_state(sft, image_lora, TASK_SFT_REFERENCE),
        extra=_extra(content, TASK_EXTRA),
    )


# ----- client -> server ---------------------------------------------------------------------------


def update_to_records(update: ClientUpdate) -> RecordDict:
    content = RecordDict()
    content[UPDATE_INFO] = MetricRecord({"client-id": update.client_id, "num-examples": update.num_samples})
    content[UPDATE_METRICS] = MetricRecord({k: float(v) for k, v in update.metrics.items()})
    content[UPDATE_IMAGE_LORA] = tensors_to_record(update.image_lora)
    content[UPDATE_EMBEDDINGS] = tensors_to_record({"embeddings": update.embeddings, "labels": update.labels})
    if update.extra:
        content[UPDATE_EXTRA] = tensors_to_record(update.extra)
    return content


def update_from_records(
    content: RecordDict,
    image_lora: TensorSpec,
    num_classes: int,
    embed_dim: int,
) -> ClientUpdate:
    """Rebuild and check a ClientUpdate against the server's model and class count."""
    info = content.get(UPDATE_INFO)
    if not isinstance(info, MetricRecord):
        raise RecordError(f"reply lacks the MetricRecord {UPDATE_INFO!r}")
    client_id = _int(info, "client-id", UPDATE_INFO)
    num_samples = _int(info, "num-examples", UPDATE_INFO)
    if num_samples < 1:
        raise RecordError(f"{UPDATE_INFO}['num-examples'] must be >= 1, got {num_samples}")
    metrics_record = content.get(UPDATE_METRICS)
    if not isinstance(metrics_record, MetricRecord):
        raise RecordError(f"reply lacks the MetricRecord {UPDATE_METRICS!r}")
    metrics = {}
    for key, value in metrics_record.items():
        if isinstance(value, list):
            raise RecordError(f"{UPDATE_METRICS}[{key!r}] must be a number, got a list")
        metrics[key] = float(value)
    pairs = record_to_tensors(array_record(content, UPDATE_EMBEDDINGS), UPDATE_EMBEDDINGS)
    z, y = pairs.get("embeddings"), pairs.get("labels")
    if z is None or z.ndim != 2 or z.shape[1] != embed_dim or not z.is_floating_point():
        got = "nothing" if z is None else f"{tuple(z.shape)} {z.dtype}"
        raise RecordError(f"{UPDATE_EMBEDDINGS}['embeddings'] must be a float (n, {embed_dim}) array, got {got}")
    if y is None or y.ndim != 1 or y.dtype != torch.int64 or len(y) != len(z):
        got = "nothing" if y is None else f"{tuple(y.shape)} {y.dtype}"
        raise RecordError(f"{UPDATE_EMBEDDINGS}['labels'] must be an int64 ({len(z)},) array, got {got}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise RecordError(f"{UPDATE_EMBEDDINGS}['labels'] must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    check_finite(z, f"{UPDATE_EMBEDDINGS}['embeddings']")
    return ClientUpdate(
        client_id=client_id,
        num_samples=num_samples,
        image_lora=checked_state(array_record(content, UPDATE_IMAGE_LORA), image_lora, UPDATE_IMAGE_LORA),
        embeddings=z,
        labels=y,
        metrics=metrics,
        extra=_extra(content, UPDATE_EXTRA),
    )


# ----- handshake ----------------------------------------------------------------------------------


@dataclass
class NodeReport:
    """What a handshake reply says about a node's data besides its classes and image count."""

    class_counts: list[int]
    """Training images per class of the reply's ``classes`` (same order; ``hello_report``: in the sorted order
    ``parse_hello_reply`` returns them)."""
    source: str | None = None
    """The node's own data (node-config ``data``); None: a partition of the run's dataset."""
    excluded: list[str] = field(default_factory=list)
    """Own data: its class names the run does not know (left out)."""
    test_base_counts: list[int] = field(default_factory=list)
    """Own data: its test images per base class of the run."""
    test_novel_counts: list[int] = field(default_factory=list)
    """Own data: its test images per novel class of the run."""


def hello_query(experiment_toml: str, classes: Sequence[str] = ()) -> RecordDict:
    content = RecordDict()
    content[HELLO] = ConfigRecord({"experiment": experiment_toml, "classes": list(classes)})
    return content


def hello_reply(
    partition_id: int, num_partitions: int, classes: list[int], num_examples: int, report: NodeReport | None = None
) -> RecordDict:
    values: dict[str, object] = {
        "partition-id": partition_id,
        "num-partitions": num_partitions,
        "classes": [int(c) for c in classes],
        "num-examples": num_examples,
    }
    if report is not None:
        values["class-counts"] = [int(c) for c in report.class_counts]
        if report.source is not None:
            values |= {
                "data": report.source,
                "excluded": list(report.excluded),
                "test-base-counts": [int(c) for c in report.test_base_counts],
                "test-novel-counts": [int(c) for c in report.test_novel_counts],
            }
    content = RecordDict()
    content[HELLO] = ConfigRecord(values)  # type: ignore[arg-type]
    return content


def _counts(record: Mapping[str, object], key: str, length: int) -> list[int]:
    value = record.get(key)
    if (
        not isinstance(value, list) or len(value) != length
        or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value)
    ):
        raise RecordError(f"{HELLO}[{key!r}] must be {length} counts (integers >= 0), got {value!r}")
    return list(value)


def hello_report(content: RecordDict, num_base: int, num_novel: int) -> NodeReport | None:
    """The data report of a handshake reply (``parse_hello_reply`` checked the rest); None when the node
    sent none (a feddtl from before it, admitted only with ``flower.allow_version_mismatch``)."""
    record = content.get(HELLO)
    if not isinstance(record, ConfigRecord) or "class-counts" not in record:
        return None
    classes = record.get("classes")
    classes = classes if isinstance(classes, list) else []
    counts = _counts(record, "class-counts", len(classes))
    report = NodeReport([count for _, count in sorted(zip(classes, counts))])  # parse_hello_reply sorts the classes
    source = record.get("data")
    if source is None:
        return report
    if not isinstance(source, str):
        raise RecordError(f"{HELLO}['data'] must be a string, got {source!r}")
    excluded = record.get("excluded")
    if not isinstance(excluded, list) or not all(isinstance(n, str) for n in excluded):
        raise RecordError(f"{HELLO}['excluded'] must be a list of class names, got {excluded!r}")
    report.source, report.excluded = source, list(excluded)
    report.test_base_counts = _counts(record, "test-base-counts", num_base)
    report.test_novel_counts = _counts(record, "test-novel-counts", num_novel)
    return report


def versions_record(versions: Mapping[str, str]) -> ConfigRecord:
    """A node's version report (``flower.versions.Versions.as_dict()``) for its handshake reply."""
    return ConfigRecord({str(k): str(v) for k, v in versions.items()})


def hello_versions(content: RecordDict) -> dict[str, str]:
    """The version report of a handshake reply: its string entries; empty when the node sent none (a
    feddtl from before the check), which the server's comparison then reports field by field."""
    record = content.get(HELLO_VERSIONS)
    if record is None:
        return {}
    if not isinstance(record, ConfigRecord):
        raise RecordError(f"{HELLO_VERSIONS} must be a ConfigRecord, got {type(record).__name__}")
    return {k: v for k, v in record.items() if isinstance(v, str)}


def parse_hello_reply(content: RecordDict, num_classes: int) -> tuple[int, int, list[int], int]:
    """(partition id, num partitions, the client's base-class indices, its training images)."""
    record = content.get(HELLO)
    if not isinstance(record, ConfigRecord):
        raise RecordError(f"handshake reply lacks the ConfigRecord {HELLO!r}")
    pid = _int(record, "partition-id", HELLO)
    n = _int(record, "num-partitions", HELLO)
    num_examples = _int(record, "num-examples", HELLO)
    classes = record.get("classes")
    if not isinstance(classes, list) or not all(isinstance(c, int) and not isinstance(c, bool) for c in classes):
        raise RecordError(f"{HELLO}['classes'] must be a list of integers, got {classes!r}")
    if any(not 0 <= c < num_classes for c in classes):
        raise RecordError(f"{HELLO}['classes'] must lie in [0, {num_classes}), got {classes}")
    return pid, n, sorted(classes), num_examples
