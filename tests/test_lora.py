"""feddtl's LoRA layers compute what peft's compute: same names, initial weights, outputs and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from feddtl.backbones.lora import inject_lora, lora_parameters
from feddtl.config.lora_config import LoraConfig

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.head = nn.Conv2d(8, 6, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.depthwise(torch.relu(self.conv(x))))
        return self.fc(self.head(x).mean((2, 3)))


TARGETS = ["conv", "depthwise", "head", "fc"]


def _peft_inject(model: nn.Module, targets: list[str], config: LoraConfig) -> None:
    pattern = "^(" + "|".join(targets) + ")$"
    cfg = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=pattern, bias="none")
    peft.inject_adapter_in_model(cfg, model)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)


def _random_lora_b(model: nn.Module) -> None:
    """The same non-zero LoRA B in every model (B starts at zero, which would hide differences)."""
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn_like(p))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_lora_matches_peft_bit_for_bit(dropout) -> None:
    # prepare: one model, two copies; each gets its LoRA from the same seed; B made non-zero the same way;
    # with dropout, the LoRA dropout modules in training mode (as Backbone.lora_dropout puts them)
    torch.manual_seed(0)
    base = Net()
    config = LoraConfig(rank=4, alpha=8.0, dropout=dropout)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(1)
    inject_lora(ours, TARGETS, config)
    torch.manual_seed(1)
    _peft_inject(theirs, TARGETS, config)
    for model in (ours, theirs):
        _random_lora_b(model)
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.train(True)
    x = torch.randn(3, 4, 9, 9)
    # execute
    torch.manual_seed(3)
    out_ours = ours(x)
    torch.manual_seed(3)
    out_theirs = theirs(x)
    out_ours.square().sum().backward()
    out_theirs.square().sum().backward()
    # assert: parameter names and order, trainable set, values, output and gradients, all exactly equal
    named_ours, named_theirs = list(ours.named_parameters()), list(theirs.named_parameters())
    assert [n for n, _ in named_ours] == [n for n, _ in named_theirs]
    assert [p.requires_grad for _, p in named_ours] == [p.requires_grad for _, p in named_theirs]
    assert list(lora_parameters(ours, tuple(TARGETS))) == list(lora_parameters(theirs, tuple(TARGETS)))
    for (name, a), (_, b) in zip(named_ours, named_theirs):
        assert torch.equal(a, b), name
        if a.requires_grad:
            assert torch.equal(a.grad, b.grad), name
    assert torch.equal(out_ours, out_theirs)
    assert dropout == 0 or any(isinstance(m, nn.Dropout) for m in ours.modules())


def test_lora_rejects_a_rank_that_does_not_divide_the_groups() -> None:
    model = Net()
    with pytest.raises(ValueError, match="divisible"):
        inject_lora(model, ["depthwise"], LoraConfig(rank=3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_merged_weights_match_peft_merge(dtype) -> None:
    # prepare: one linear and one 1x1 conv with non-zero LoRA B, ours and peft's from one seed
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 5), nn.Conv2d(5, 7, 1)).to(dtype)
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(1)
    inject_lora(ours, ["0", "1"], LoraConfig(rank=2, alpha=8.0))
    torch.manual_seed(1)
    _peft_inject(theirs, ["0", "1"], LoraConfig(rank=2, alpha=8.0))
    for model in (ours, theirs):
        _random_lora_b(model)
    # execute
    merged = [ours[k].merged_base_layer().weight for k in range(2)]
    for k in range(2):
        theirs[k].merge(safe_merge=True, adapter_names=["default"])
    # assert
    for k in range(2):
        assert torch.equal(merged[k], theirs[k].get_base_layer().weight), k
