"""The offline `lite` backbone's zero-shot bridge works on real images (a figure of the order the issue measured)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from feddtl.algorithm.encoding import text_embeddings
from feddtl.backbones.lite import LiteBackbone
from feddtl.data import DataConfig, cap_per_class, dataset_to_tensor, load_dataset
from feddtl.federation import prompt_features


@pytest.mark.slow
def test_lite_zero_shot_fashion_mnist_beats_chance_at_224px():
    # prepare: 30 test images per class of Fashion-MNIST's 10 classes, 224 px, top-10 bridge
    try:
        ds = load_dataset("fashion-mnist", DataConfig(), seed=0).test
    except ValueError as exc:
        pytest.skip(str(exc))
    idx = cap_per_class(ds.labels, np.arange(len(ds)), 30, seed=0)
    backbone = LiteBackbone(image_size=224, bridge_top_k=10)
    T = text_embeddings(backbone, prompt_features(backbone, ds.classnames, "a photo of a {}.")).detach()
    # execute
    correct = 0
    with torch.no_grad():
        for i, x in enumerate(dataset_to_tensor(ds, idx, 224, backbone.image_mean, backbone.image_std, batch_size=100)):
            z = F.normalize(backbone.image_tail(backbone.image_trunk(x)), dim=-1)
            correct += ((z @ T.T).argmax(-1) == torch.as_tensor(ds.labels[idx[i * 100 : (i + 1) * 100]])).sum().item()
    acc = 100.0 * correct / len(idx)
    # assert: well above chance (10 %), of the order measured (20.7 % on 1000 images here; 27.6 % in the issue)
    assert 15.0 < acc < 40.0, acc
