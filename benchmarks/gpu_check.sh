#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU machine (run from the repo root; $OUT collects results).
# Needs python3 with torch (CUDA), transformers, peft, safetensors, scikit-learn, matplotlib, tqdm.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"
# 1. cached vs uncached local training at ViT-B/16 size (random weights), 96 and 224 px
python3 benchmarks/cache_speed.py --device cuda --backbones vit-b16 --sizes 96,224 --json "$OUT/gpu_cache_speed.json" 2>&1 | tee "$OUT/gpu_cache_speed.txt"
# 2. a whole federated run on CUDA through the hf-clip path (tiny local CLIP), twice: same results?
python3 -c "from feddtl.backbones.tiny_clip import build_tiny_clip; build_tiny_clip('/tmp/tc')"
for r in a b; do
  python3 -m feddtl run --config tiny --set 'backbone="hf-clip:/tmp/tc"' --set device=cuda --out "/tmp/cuda-$r" --quiet 2>&1 | tail -3 | tee -a "$OUT/cuda_run.txt"
done
python3 - <<'PY' 2>&1 | tee -a "$OUT/cuda_run.txt"
import json
from feddtl.rundir import result_fields
a = result_fields(json.load(open("/tmp/cuda-a/results.json")))
b = result_fields(json.load(open("/tmp/cuda-b/results.json")))
print("CUDA runs identical:", a == b, {k: (a[k], b[k]) for k in a if a[k] != b.get(k)})
PY
cp /tmp/cuda-a/results.json "$OUT/cuda_results.json"
