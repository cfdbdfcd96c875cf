"""``hf-clip`` exports: a merged ``CLIPModel`` + ``CLIPProcessor`` (save_pretrained) and two peft adapters.

Folder layout::

    config.json, model.safetensors        the CLIPModel with both LoRAs merged into q_proj / v_proj
    preprocessor_config.json, tokenizer*  the processor: feddtl's resize and normalisation, CLIP's tokenizer
    adapters/image/, adapters/text/       each LoRA as a peft adapter folder for the *base* CLIP
    feddtl_export.json                    template, logit scale, image size, invert, source run (manifest.py)

The merged model's ``logit_scale`` holds log(s) for feddtl's s (a config override included), so
``logits_per_image`` is evaluation's logits. When the run's image size differs from CLIP's native one,
feddtl interpolates the position embeddings on every call; the export stores the interpolated table
(computed by transformers' own ``interpolate_pos_encoding``) and the new size in the config, so the
saved model takes images of the run's size without ``interpolate_pos_encoding=True``.
"""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from feddtl.backbones.hf_clip import HFClipBackbone
from feddtl.config.lora_config import LoraConfig
from feddtl.export.manifest import ExportError

HF_PREFIX = "hf-clip:"
ADAPTER_DIRS = {"image": "adapters/image", "text": "adapters/text"}
RESAMPLE = "bilinear"
"""feddtl's resize filter (data/transforms.py: PIL bilinear); the image processor uses the same."""


def without_lora(model: nn.Module, merge: bool) -> nn.Module:
    """A copy of ``model`` with every LoRA wrapper (feddtl.backbones.lora) replaced by its base layer;
    ``merge``: with W + scale * B A in the weights (computed as peft's merge), else the untouched base weights."""
    from feddtl.backbones.lora import LoraWrapper

    clone = copy.deepcopy(model)
    wrapped = [(name, m) for name, m in clone.named_modules() if isinstance(m, LoraWrapper)]
    for name, module in wrapped:
        base = module.merged_base_layer() if merge else module.base_layer
        parent, _, child = name.rpartition(".")
        setattr(clone.get_submodule(parent) if parent else clone, child, base)
    return clone


def bake_position_embeddings(model: nn.Module, image_size: int) -> None:
    """Store the vision tower's position table interpolated to ``image_size`` (in place); a no-op at the
    native size. The table is what ``interpolate_pos_encoding`` computes for that size, so the model then
    gives, without interpolation, what it gave with it."""
    embeddings = model.vision_model.embeddings
    if image_size == embeddings.image_size:
        return
    grid = image_size // embeddings.patch_size
    if grid < 1:
        raise ExportError(f"data.image_size={image_size} is smaller than CLIP's patch size {embeddings.patch_size}")
    dim = embeddings.position_embedding.weight.shape[1]
    with torch.no_grad():
        dummy = torch.zeros(1, grid * grid + 1, dim, dtype=embeddings.position_embedding.weight.dtype)
        table = embeddings.interpolate_pos_encoding(dummy, image_size, image_size)[0].clone()
    embeddings.position_embedding = nn.Embedding(grid * grid + 1, dim).to(table.dtype)
    with torch.no_grad():
        embeddings.position_embedding.weight.copy_(table)
    embeddings.image_size = image_size
    embeddings.num_patches = grid * grid
    embeddings.num_positions = grid * grid + 1
    embeddings.register_buffer("position_ids", torch.arange(grid * grid + 1).expand((1, -1)), persistent=False)
    model.config.vision_config.image_size = image_size


def image_processor(image_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Any:
    """CLIP's image processor set to feddtl's preprocessing: RGB, bilinear resize of both sides to
    ``image_size`` (no aspect-preserving resize, no centre crop), /255, (x - mean) / std."""
    from PIL import Image

    try:  # transformers >= 5: the PIL backend has its own class (the default one needs torchvision)
        from transformers import CLIPImageProcessorPil as Processor
    except ImportError:  # transformers 4.x: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as Processor
    return Processor(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        resample=Image.Resampling.BILINEAR,
        do_center_crop=False,
        crop_size={"height": image_size, "width": image_size},  # unused (no crop); not CLIP's 224 to mislead
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(mean),
        image_std=list(std),
        do_convert_rgb=True,
    )


def _save_adapter(
    base: nn.Module, lora: dict[str, torch.Tensor], config: LoraConfig, base_name: str, folder: Path
) -> None:
    """One tower's LoRA as a peft adapter folder for ``base`` (a CLIPModel without LoRA).

    ``lora`` is keyed by backbone parameter name (``model.<module>.lora_A.default.weight``); the
    CLIPModel is the backbone's ``model``, so the adapter targets ``<module>``."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = sorted({k[len("model.") :].split(".lora_")[0] for k in lora})
    peft_config = PeftLoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets, bias="none"
    )
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5; nothing to act on
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(copy.deepcopy(base), peft_config)
    params = dict(peft_model.named_parameters())
    names = {k: "base_model.model." + k[len("model.") :] for k in lora}
    missing = sorted(set(names.values()) - set(params))
    lora_params = {n for n in params if ".lora_" in n}
    if missing or lora_params != set(names.values()):
        raise ExportError(f"LoRA weights do not map onto the peft adapter: {missing[:3] or sorted(lora_params)[:3]}")
    with torch.no_grad():
        for key, value in lora.items():
            params[names[key]].copy_(value)
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    peft_model.save_pretrained(str(folder))


def write_hf_export(
    backbone: HFClipBackbone,
    image_lora: dict[str, torch.Tensor] | None,
    text_lora: dict[str, torch.Tensor] | None,
    lora_config: LoraConfig,
    base_name: str,
    folder: Path,
) -> dict[str, Any]:
    """Write the merged model, the processor and (for trained runs) the two adapters into ``folder``;
    returns the manifest fields this kind adds. ``backbone`` holds the run's final LoRA."""
    from transformers import CLIPProcessor

    merged = without_lora(backbone.model, merge=True)
    with torch.no_grad():
        merged.logit_scale.fill_(math.log(backbone.logit_scale))
    bake_position_embeddings(merged, backbone.info.image_size)
    merged.save_pretrained(str(folder))
    del merged  # a ViT-B/16 copy less in memory while the adapters are built
    processor = CLIPProcessor(
        image_processor=image_processor(backbone.info.image_size, backbone.image_mean, backbone.image_std),
        tokenizer=backbone.tokenizer,
    )
    processor.save_pretrained(str(folder))
    processor.image_processor.save_pretrained(str(folder))  # preprocessor_config.json, for transformers 4.x
    adapters = None
    if image_lora is not None and text_lora is not None:
        base = without_lora(backbone.model, merge=False)
        for tower, lora in (("image", image_lora), ("text", text_lora)):
            _save_adapter(base, lora, lora_config, base_name, folder / ADAPTER_DIRS[tower])
        adapters = {**ADAPTER_DIRS, "base_model": base_name}
    return {"adapters": adapters, "resample": RESAMPLE, "image_processor_backend": "pil"}


def load_hf_export(folder: Path, manifest: dict[str, Any]) -> HFClipBackbone:
    """The merged model of an ``hf-clip`` export as a feddtl backbone (no LoRA: it is in the weights)."""
    backbone = HFClipBackbone(str(folder), image_size=int(manifest["image_size"]))
    backbone.logit_scale = float(manifest["logit_scale"])
    backbone.image_mean = tuple(manifest["image_mean"])
    backbone.image_std = tuple(manifest["image_std"])
    return backbone
