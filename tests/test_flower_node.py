"""What a SuperNode keeps in its node cache (feddtl.flower.node): keyed by what it depends on, equal bit for
bit to what an in-process run computes, and loaded by a later message without the dataset or a trunk pass.
Also: the ClientApp module imports only what a message needs."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

import feddtl.flower.node as node_module
from feddtl.backbones.tiny_clip import build_tiny_clip
from feddtl.cache import NodeCache, TrunkCache
from feddtl.config import load_config
from feddtl.federation import build_client, client_partition, make_backbone
from feddtl.flower.node import NodeData, backbone_key, partition_key, trunk_key

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = build_tiny_clip(tmp_path_factory.mktemp("tiny_clip"), seed=0, image_size=32)
    return load_config("tiny", ["num_clients=2", "classes_per_client=3", f"backbone='hf-clip:{path}'"])


def test_keys_change_with_what_the_entries_depend_on_and_nothing_else(config) -> None:
    # prepare: changes that matter to some entries, and changes that matter to none
    backbone = make_backbone(config)
    idx = client_partition(config, _splits(config), 0)[1]

    def keys(c, image_start=backbone.image_start_block, indices=idx):
        return partition_key(c, 0), backbone_key(c), trunk_key(c, image_start, indices)

    base = keys(config)
    unrelated = [
        replace(config, rounds=9), replace(config, method="fedlora"), replace(config, client=replace(config.client, lr=0.5)),
        replace(config, eval=replace(config.eval, every=1)), replace(config, cache=replace(config.cache, memory_budget_mb=1)),
        replace(config, eval=replace(config.eval, validation_per_class=10)),  # unused in test mode
    ]
    # execute / assert: (partition, backbone, trunk) key changes of each input
    for c in unrelated:
        assert keys(c) == base
    assert partition_key(config, 1) != base[0]
    for changed, expect in [
        (replace(config, seed=1), (True, False, False)),
        (replace(config, base_novel="random", base_novel_seed=3), (True, False, False)),
        (replace(config, shots=4), (True, False, False)),
        (replace(config, min_partition_size=2), (True, False, False)),
        (replace(config, partition="iid"), (True, False, False)),
        # the validation hold-out leaves the pool before the partition; trunk indices stay train-split positions
        (replace(config, eval=replace(config.eval, on="validation", validation_per_class=10)), (True, False, False)),
        (replace(config, data=replace(config.data, invert=True)), (True, False, True)),
        (replace(config, data=replace(config.data, image_size=48)), (True, True, True)),
        (replace(config, backbone_options=replace(config.backbone_options, template="a {}")), (False, True, True)),
    ]:
        got = keys(changed)
        assert tuple(g != b for g, b in zip(got, base)) == expect, changed
    assert keys(config, image_start=0)[2] != base[2]
    assert keys(config, indices=idx[:-1])[2] != base[2]


def _splits(config):
    from feddtl.data import load_dataset

    return load_dataset(config.dataset, config.data, seed=config.seed)


def test_node_data_equals_the_inprocess_client_and_a_later_message_loads_it(config, tmp_path, monkeypatch) -> None:
    # prepare: the in-process client 1 (the engine-neutral builder every run uses)
    splits = _splits(config)
    backbone = make_backbone(config)
    cache = TrunkCache(config.cache, backbone, config.data.image_size, config.data.invert, log_fn=lambda s: None)
    expected = build_client(config, 1, backbone, splits, cache)
    # execute: a first message builds the node's entries; a second (a fresh NodeData, as a fresh process
    # has) must find them all: its dataset loader and trunk fail if called
    first = NodeData(config, NodeCache(tmp_path, 2**30))
    _, built = first.client(1, text_tower=True)
    monkeypatch.setattr(node_module, "load_dataset", _fail)
    later = NodeData(config, NodeCache(tmp_path, 2**30))
    _, loaded = later.client(1, text_tower=True)
    # assert: same labels and trunk features, bit for bit; the second message only loaded
    query = torch.arange(len(expected))
    for data in (built, loaded):
        assert torch.equal(data.labels, expected.labels)
        assert torch.equal(data.features[query], expected.features[query])
    assert {e.split(": ")[1].split(" ")[0] for e in later.cache.events} == {"hit"}
    assert sorted(e.kind for e in later.cache.entries()) == ["backbone", "partition", "trunk"]
    part = later.partition(1)
    classes, indices = client_partition(config, splits, 1)
    assert part.indices.tolist() == indices.tolist() and part.base == classes.base and part.base_names == classes.base_names


def test_features_over_the_memory_budget_are_mapped_from_the_entry(config, tmp_path) -> None:
    # prepare: no memory budget at all
    small = replace(config, cache=replace(config.cache, memory_budget_mb=0))
    in_memory = NodeData(config, NodeCache(tmp_path, 2**30)).client(0, text_tower=True)[1]
    # execute
    mapped = NodeData(small, NodeCache(tmp_path, 2**30)).client(0, text_tower=True)[1]
    # assert: read through a memmap of the node cache's own file, same values
    from feddtl.cache import MemmapStore

    assert isinstance(mapped.features, MemmapStore) and mapped.features.path.parent == tmp_path
    q = torch.arange(len(mapped))
    assert torch.equal(mapped.features[q], in_memory.features[q])


def _fail(*args, **kwargs):
    raise AssertionError("the dataset was loaded although the node cache had everything")


def test_client_app_imports_no_server_bench_plotting_or_transformers() -> None:
    # execute: a fresh interpreter, as flwr-clientapp is (torch too is imported by the handlers only: a
    # process that hands its message to the node's warm worker never imports it)
    code = (
        "import sys, feddtl.flower.client_app\n"
        "bad = ['matplotlib', 'feddtl.bench', 'feddtl.flower.server_app', 'feddtl.server.experiment', "
        "'feddtl.reporting', 'transformers', 'peft', 'sklearn', 'ray', 'torch']\n"
        "print(sorted(m for m in bad if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    # assert
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_config_error_is_reported_before_torch_is_imported() -> None:
    code = (
        "import sys\nfrom feddtl.cli import main\n"
        "rc = main(['run', '--config', 'tiny', '--set', 'grpo.noise_space=pixels', '--out', 'x'])\n"
        "print(rc, 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip() == "2 False", out.stdout + out.stderr
    assert "config error: grpo.noise_space='pixels'" in out.stderr


@pytest.mark.slow
def test_lite_without_text_tower_from_the_cached_bridge_computes_what_the_full_build_does(tmp_path) -> None:
    # prepare: the full lite build (~10-20 s: the bridge), its derived tensors through a safetensors file
    from safetensors.torch import load_file

    from feddtl.cache.node_cache import save_tensors

    config = load_config("tiny", [])
    full = make_backbone(config)
    save_tensors(tmp_path / "derived.safetensors", full.derived_tensors())
    g = torch.Generator().manual_seed(0)
    lora = {k: torch.randn(v.shape, generator=g) * 0.1 for k, v in full.image_lora_state().items()}
    pixels = torch.randn(4, 3, 32, 32, generator=g)
    # execute: the image-only build from the file, here and in a fresh interpreter (to see its imports)
    image_only = make_backbone(config, derived=load_file(tmp_path / "derived.safetensors"), text_tower=False)
    code = (
        "import sys\nfrom safetensors.torch import load_file\nfrom feddtl.config import load_config\n"
        "from feddtl.federation import make_backbone\n"
        f"make_backbone(load_config('tiny', []), derived=load_file({str(tmp_path / 'derived.safetensors')!r}), text_tower=False)\n"
        "print(sorted(m for m in ('transformers', 'peft', 'tokenizers') if m in sys.modules))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    results = []
    for backbone in (full, image_only):
        backbone.load_image_lora(lora)
        z = backbone.image_tail(backbone.image_trunk(pixels))
        z.square().sum().backward()
        results.append((z.detach(), [p.grad.clone() for p in backbone.image_lora_parameters()]))
    # assert: same embeddings and LoRA gradients bit for bit; no text tower, no transformers
    assert not image_only.has_text_tower and image_only.info == full.info
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert image_only.text_lora_state() == {}
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


ADAM_STEPS = """
import sys, torch
from safetensors.torch import save_file
patched = sys.argv[2] == "patched"
if patched:
    from feddtl.flower.node import optimizers_without_dynamo
    assert optimizers_without_dynamo()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
x = torch.randn(16, 6)
for _ in range(4):
    loss = model(x).square().mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
assert torch.is_grad_enabled()
save_file({k: v.detach() for k, v in model.state_dict().items()}, sys.argv[1])
print("torch._dynamo" in sys.modules)
"""


def test_optimizers_without_dynamo_give_the_same_steps_and_skip_the_import(tmp_path) -> None:
    # execute: the same Adam steps in two fresh interpreters, torch's wrappers as shipped and replaced
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    runs = {}
    for mode in ("plain", "patched"):
        out = subprocess.run(
            [sys.executable, "-c", ADAM_STEPS, str(tmp_path / f"{mode}.safetensors"), mode],
            capture_output=True, text=True, env=env, timeout=300,
        )
        assert out.returncode == 0, out.stderr
        runs[mode] = out.stdout.strip()
    # assert: identical weights; only the plain run imported torch._dynamo
    from safetensors.torch import load_file

    plain, patched = load_file(tmp_path / "plain.safetensors"), load_file(tmp_path / "patched.safetensors")
    assert plain.keys() == patched.keys() and all(torch.equal(plain[k], patched[k]) for k in plain)
    assert runs == {"plain": "True", "patched": "False"}
