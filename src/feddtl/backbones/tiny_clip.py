"""A tiny, randomly initialised CLIP saved in Hugging Face format, for offline tests and smoke runs.

``build_tiny_clip(path)`` writes a ``CLIPModel`` plus a working ``CLIPTokenizer`` to ``path`` with
``save_pretrained``; ``HFClipBackbone(str(path))`` then loads it without any network access. The
weights are random, so the embeddings carry no meaning: this exercises the code path, not accuracy.

The tokenizer is a byte-level BPE with no merges: every byte is its own token (with and without the
``</w>`` end-of-word suffix), so any text tokenises, one token per byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible map from the 256 byte values to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def byte_level_vocab() -> dict[str, int]:
    """CLIP's vocabulary layout without merges: 256 byte chars, their ``</w>`` forms, BOS, EOS."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + [BOS_TOKEN, EOS_TOKEN]
    return {tok: i for i, tok in enumerate(tokens)}


def build_tiny_clip(
    path: str | Path,
    seed: int = 0,
    image_size: int = 32,
    patch_size: int = 8,
    hidden_size: int = 32,
    num_layers: int = 4,
    num_heads: int = 2,
    projection_dim: int = 16,
    max_text_length: int = 77,
) -> Path:
    """Build a tiny random CLIP (both towers ``num_layers`` deep) and save model + tokenizer to ``path``."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = byte_level_vocab()
    bos_id, eos_id = vocab[BOS_TOKEN], vocab[EOS_TOKEN]

    # The tokenizer files in CLIP's original format (vocab.json + merges.txt, merges empty).
    (path / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (path / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=[],
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=max_text_length,
    )
    if tokenizer.pad_token_id != eos_id or tokenizer.bos_token_id != bos_id or tokenizer.eos_token_id != eos_id:
        raise RuntimeError("tiny CLIP tokenizer: special token ids do not match the vocabulary")

    text_config = dict(
        vocab_size=len(vocab),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_text_length,
        projection_dim=projection_dim,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )
    vision_config = dict(
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=projection_dim,
    )
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)

    rng_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = CLIPModel(config)
    finally:
        torch.random.set_rng_state(rng_state)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
