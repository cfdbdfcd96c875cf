"""A real CLIP (e.g. ``openai/clip-vit-base-patch16``) through transformers' ``CLIPModel``.

Each tower is split at a block index into a frozen trunk and a LoRA-trainable tail; the pieces call the
model's own submodules in the order ``CLIPVisionModel`` / ``CLIPTextModel`` do, so
``tail(trunk(x))`` equals ``CLIPModel.get_image_features`` / ``get_text_features`` for any split.
The model runs with eager attention, fed explicit 4D additive masks (causal + padding for text).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from feddtl.backbones.base import Backbone, BackboneError, BackboneInfo, TextFeatures
from feddtl.backbones.lite import run_layer

CLIP_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def causal_padding_mask_4d(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) 1/0 key mask -> (B, 1, S, S) additive mask: 0 where query i may attend key j (j <= i and
    j is a real token), the dtype's minimum elsewhere (the same values transformers' eager mask holds)."""
    seq = mask.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=mask.device).tril()
    allowed = causal[None, None, :, :] & mask[:, None, None, :].bool()
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _load_clip(path_or_id: str, attn_implementation: str) -> tuple[nn.Module, object]:
    from transformers import CLIPModel, CLIPTokenizer

    local = Path(path_or_id).expanduser()
    is_dir = local.is_dir()
    source = str(local) if is_dir else path_or_id
    kwargs = {"local_files_only": True} if is_dir else {}
    try:
        model = CLIPModel.from_pretrained(
            source, attn_implementation=attn_implementation, dtype=torch.float32, **kwargs
        )
        tokenizer = CLIPTokenizer.from_pretrained(source, **kwargs)
    except Exception as exc:  # OSError, HF validation/network errors: all mean "no usable weights"
        where = f"local directory {str(local)!r}" if is_dir else f"{path_or_id!r}"
        raise BackboneError(
            f"hf-clip backbone: the CLIP weights/tokenizer for {where} could not be found locally or "
            f"downloaded ({type(exc).__name__}: {exc}). Fix: pass a local directory that holds a "
            "CLIPModel saved with save_pretrained (config.json, model.safetensors, tokenizer files), or "
            "pre-download the hub model, e.g. `huggingface-cli download openai/clip-vit-base-patch16 "
            "--local-dir <dir>` (newer huggingface_hub: `hf download ...`), and pass that directory "
            "(offline machines: set HF_HUB_OFFLINE=1)."
        ) from exc
    return model, tokenizer


def clip_patch_size(path_or_id: str) -> int | None:
    """The vision tower's patch size from the model's config alone (cheap: no weights are loaded); None if
    the config cannot be read now (the loaded model is checked then)."""
    try:
        from transformers import CLIPConfig

        local = Path(path_or_id).expanduser()
        source = str(local) if local.is_dir() else path_or_id
        config = CLIPConfig.from_pretrained(source, local_files_only=local.is_dir())
        return int(config.vision_config.patch_size)
    except Exception:  # missing, offline, not a CLIP: the full load reports it properly
        return None


def check_patch_grid(image_size: int, patch_size: int, name: str) -> None:
    """An image side below one patch gives an empty patch grid: BackboneError naming the minimum."""
    if image_size < patch_size:
        raise BackboneError(
            f"{name}: image_size {image_size} is too small; the vision tower cuts {patch_size} x {patch_size} "
            f"patches, so the minimum is {patch_size} px"
        )


class HFClipBackbone(Backbone):
    """transformers' CLIPModel with a trunk/tail split in both towers (see module docstring).

    Every tower method runs inside ``self.autocast()`` (mixed precision when ``set_precision`` chose it) and
    returns float32, so callers, the trunk cache and the losses never see another dtype."""

    supports_autocast = True

    def __init__(
        self,
        path_or_id: str,
        image_size: int | None = None,
        template: str = "a photo of a {}.",
        attn_implementation: str = "eager",
    ) -> None:
        super().__init__()
        self.model, self.tokenizer = _load_clip(str(path_or_id), attn_implementation)
        self.template = template  # kept for parity with other backbones; prompts are built by the caller
        config = self.model.config
        vision_config, text_config = config.vision_config, config.text_config
        self.logit_scale = float(self.model.logit_scale.detach().exp())
        self.image_mean = CLIP_IMAGE_MEAN
        self.image_std = CLIP_IMAGE_STD
        self.max_text_length = int(min(self.tokenizer.model_max_length, text_config.max_position_embeddings))
        num_image = len(self.model.vision_model.encoder.layers)
        num_text = len(self.model.text_model.encoder.layers)
        check_patch_grid(int(image_size or vision_config.image_size), int(vision_config.patch_size), f"hf-clip:{path_or_id}")
        self.info = BackboneInfo(
            name=f"hf-clip:{path_or_id}",
            embed_dim=int(config.projection_dim),
            image_size=int(image_size or vision_config.image_size),
            num_image_blocks=num_image,
            num_text_blocks=num_text,
            default_image_start_block=max(num_image - 2, 0),
            default_text_start_block=max(num_text - 2, 0),
        )
        self.set_split(None, None)
        self.eval()

    # ----- image tower ---------------------------------------------------------------------------
    def image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        vision = self.model.vision_model
        native = vision.config.image_size
        interpolate = tuple(pixels.shape[-2:]) != (native, native)
        with self.autocast():
            hidden = vision.embeddings(pixels, interpolate_pos_encoding=interpolate)
            hidden = vision.pre_layrnorm(hidden)
            for layer in vision.encoder.layers[: self.image_start_block]:
                hidden = run_layer(layer, hidden, None)
        return hidden.float()  # float32 already without autocast: .float() returns the tensor itself

    def image_tail(self, feats: torch.Tensor) -> torch.Tensor:
        vision = self.model.vision_model
        hidden = feats
        with self.autocast():
            for layer in vision.encoder.layers[self.image_start_block :]:
                hidden = run_layer(layer, hidden, None)
            pooled = vision.post_layernorm(hidden[:, 0, :])
            out = self.model.visual_projection(pooled)
        return out.float()

    # ----- text tower ----------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def text_trunk(self, tokens: dict[str, torch.Tensor]) -> TextFeatures:
        text = self.model.text_model
        device = text.embeddings.token_embedding.weight.device
        input_ids = tokens["input_ids"].to(device)
        mask = tokens.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask.to(device)
        with self.autocast():
            hidden = text.embeddings(input_ids=input_ids)
            mask4d = causal_padding_mask_4d(mask, hidden.dtype)
            for layer in text.encoder.layers[: self.text_start_block]:
                hidden = run_layer(layer, hidden, mask4d)
        return {"hidden": hidden.float(), "attention_mask": mask, "input_ids": input_ids}

    def text_tail(self, feats: TextFeatures) -> torch.Tensor:
        text = self.model.text_model
        hidden, mask, input_ids = feats["hidden"], feats["attention_mask"], feats["input_ids"]
        with self.autocast():
            mask4d = causal_padding_mask_4d(mask, hidden.dtype)
            for layer in text.encoder.layers[self.text_start_block :]:
                hidden = run_layer(layer, hidden, mask4d)
            hidden = text.final_layer_norm(hidden)
            ids = input_ids.to(dtype=torch.int, device=hidden.device)
            if text.eos_token_id == 2:
                # legacy configs (before transformers PR #24773): EOS is the highest id in each sequence
                eos_pos = ids.argmax(dim=-1)
            else:
                # first EOS of each sequence (the pad token may equal EOS)
                eos_pos = (ids == text.eos_token_id).int().argmax(dim=-1)
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), eos_pos]
            out = self.model.text_projection(pooled)
        return out.float()

    def text_token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        text = self.model.text_model
        return text.embeddings.token_embedding(input_ids.to(text.embeddings.token_embedding.weight.device))

    def text_from_token_embeddings(self, embeds: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        text = self.model.text_model
        input_ids = tokens["input_ids"].to(embeds.device)
        mask = tokens.get("attention_mask")
        mask = torch.ones_like(input_ids) if mask is None else mask.to(embeds.device)
        with self.autocast():
            hidden = text.embeddings(inputs_embeds=embeds)  # + position embeddings
            mask4d = causal_padding_mask_4d(mask, hidden.dtype)
            for layer in text.encoder.layers[: self.text_start_block]:
                hidden = run_layer(layer, hidden, mask4d)
        return self.text_tail({"hidden": hidden.float(), "attention_mask": mask, "input_ids": input_ids})

    # ----- LoRA ------------------------------------------------------------------------------------
    def lora_targets(self, image_start: int, text_start: int) -> tuple[list[str], list[str]]:
        def targets(tower: str, start: int) -> list[str]:
            layers = getattr(self.model, tower).encoder.layers
            return [
                f"model.{tower}.encoder.layers.{i}.self_attn.{proj}"
                for i in range(start, len(layers))
                for proj in ("q_proj", "v_proj")
            ]

        return targets("vision_model", image_start), targets("text_model", text_start)
