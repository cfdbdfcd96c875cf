import pytest
import torch

from feddtl.algorithm.aggregation import weighted_average


def test_weighted_average_by_sample_count():
    a = {"w": torch.tensor([1.0, 0.0])}
    b = {"w": torch.tensor([0.0, 4.0])}
    out = weighted_average([a, b], [30, 10])
    assert torch.allclose(out["w"], torch.tensor([0.75, 1.0]))


def test_weighted_average_rejects_mismatched_keys_and_empty():
    with pytest.raises(ValueError, match="different keys"):
        weighted_average([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [1, 1])
    with pytest.raises(ValueError, match="at least one"):
        weighted_average([], [])
    with pytest.raises(ValueError, match="sum to > 0"):
        weighted_average([{"a": torch.zeros(1)}], [0])
