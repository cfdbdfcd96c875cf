"""Communication bytes per round and message field; peak RSS per phase."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from feddtl.algorithm.messages import ClientTask, ClientUpdate
from feddtl.server.accounting import (
    MemoryMeter,
    _reset_high_water_mark,
    communication_summary,
    current_rss_mb,
    round_communication,
)


def _task() -> ClientTask:
    return ClientTask(
        round=1,
        stage="rl",
        image_lora={"a": torch.zeros(4, 10), "b": torch.zeros(10, 4)},  # 80 floats = 320 bytes
        class_embeddings=torch.zeros(5, 8),  # 160 bytes
        sft_reference_lora={"a": torch.zeros(4, 10), "b": torch.zeros(10, 4)},  # 320 bytes
    )


def _update(client_id: int, n: int) -> ClientUpdate:
    return ClientUpdate(
        client_id=client_id,
        num_samples=n,
        image_lora={"a": torch.zeros(4, 10), "b": torch.zeros(10, 4)},  # 320 bytes
        embeddings=torch.zeros(n, 8),  # 32 n bytes
        labels=torch.zeros(n, dtype=torch.long),  # 8 n bytes
    )


def test_round_communication_counts_each_field_and_client():
    # execute
    row = round_communication(_task(), [_update(0, 3), _update(1, 5)])
    # assert
    assert row["bytes_down_per_client"] == 320 + 160 + 320
    assert row["bytes_down"] == 2 * 800
    assert row["bytes_down_parts"] == {"image_lora": 640, "class_embeddings": 320, "sft_reference_lora": 640}
    up = [320 + 40 * 3, 320 + 40 * 5]
    assert row["bytes_up"] == sum(up)
    assert row["bytes_up_per_client"] == sum(up) / 2
    assert row["bytes_up_max_client"] == max(up)
    assert row["bytes_up_parts"] == {"image_lora": 640, "embeddings": 32 * 8, "labels": 8 * 8}


def test_communication_summary_is_per_client_round_and_relative_to_the_backbone():
    # prepare: two rounds with different uploads
    rows = [round_communication(_task(), [_update(0, 3), _update(1, 5)]),
            round_communication(_task(), [_update(0, 1)])]
    # execute
    summary = communication_summary(rows, backbone_param_bytes=100_000)
    # assert
    mean_up = (rows[0]["bytes_up_per_client"] + rows[1]["bytes_up_per_client"]) / 2
    assert summary["upload_per_client_round_bytes"] == pytest.approx(mean_up)
    assert summary["upload_fraction_of_backbone"] == pytest.approx(mean_up / 100_000)
    assert summary["upload_per_client_round_max_bytes"] == 320 + 40 * 5
    total_up = rows[0]["bytes_up"] + rows[1]["bytes_up"]
    assert summary["bytes_up_total_fraction_of_backbone"] == pytest.approx(total_up / 100_000)
    assert sum(summary["bytes_up_parts_total"].values()) == total_up
    assert communication_summary([], 100)["upload_per_client_round_bytes"] == 0.0


@pytest.mark.skipif(current_rss_mb() is None or not _reset_high_water_mark(), reason="needs Linux /proc")
def test_memory_meter_gives_each_phase_its_own_peak():
    # prepare
    meter = MemoryMeter()
    base = current_rss_mb()
    # execute: a phase that touches 200 MB, then a phase that allocates nothing
    meter.start_phase()
    big = np.ones(200 * 2**20 // 8)
    big_peak = meter.end_phase()
    del big
    meter.start_phase()
    small_peak = meter.end_phase()
    # assert
    assert big_peak >= base + 150
    assert small_peak < big_peak - 150  # the second phase does not inherit the first one's peak
    assert meter.run_peak() >= big_peak
