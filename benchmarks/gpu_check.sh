#!/usr/bin/env bash
# The GPU checks as one prepared command, for a lent GPU machine (a few minutes). Run from the repository root:
#   bash benchmarks/gpu_check.sh              # on a CUDA machine
#   bash benchmarks/gpu_check.sh --cpu-dry    # every step on the CPU with small sizes: checks this script runs
# Steps: 1. trunk cache speed (cached on the device / cached in RAM / uncached) at ViT-B/16 size; 2. the real
# paper-clip suite on local stand-ins (tiny CLIP with ViT-B/16's patch grid at 224 px, digits saved as EuroSAT's
# hub copy), float32 and bfloat16; 3. float32 against bfloat16 on the same seed (ViT-B/16-shaped CLIP, 224 px);
# 4. the same CUDA run twice. Text and JSON go to $OUT (default /tmp/gpu-check); failures are listed at the end
# and in $OUT/failures.txt, exit status 1. Offline throughout: random weights and scikit-learn's digits.
# Needs python with torch (CUDA), transformers, peft, safetensors, datasets, scikit-learn, matplotlib, tqdm
# ($PYTHON, default python3).
set -uo pipefail
MODE=gpu
case "${1:-}" in
  --cpu-dry) MODE=cpu-dry ;;
  "") ;;
  *) echo "usage: $0 [--cpu-dry]" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/gpu-check}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/feddtl-gpu-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"
rm -f "$OUT/failures.txt"
export PYTHONPATH=$PWD/src HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_PROGRESS_BARS=1 \
  TRANSFORMERS_VERBOSITY=error FLWR_TELEMETRY_ENABLED=0
started=$SECONDS
status=0
step() { echo; echo "=== $* [$((SECONDS - started)) s]"; }
fail() { echo "FAILED: $*" | tee -a "$OUT/failures.txt"; status=1; }

if [[ $MODE == gpu ]]; then
  DEVICE=cuda PX=224 ROUNDS=4 METHODS=zeroshot,fedlora,feddtl
  SPEED=(--device cuda --backbones vit-b16 --sizes 96,224)
  PREC=(--device cuda --clip vit-b16 --image-size 224)
  nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt" || fail "nvidia-smi"
else
  DEVICE=cpu PX=64 ROUNDS=2 METHODS=zeroshot,feddtl
  SPEED=(--device cpu --backbones vit-b16 --sizes 32 --quick --repeats 1 --batch-size 8)
  PREC=(--device cpu --clip tiny --image-size 32 --cpu-autocast)
  echo "CPU dry run of benchmarks/gpu_check.sh: every step with small sizes; no figure here is a GPU figure" \
    | tee "$OUT/gpu.txt"
fi
$PY -c "import torch, transformers, peft, datasets; print('torch', torch.__version__, 'transformers', \
transformers.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__, 'cuda', torch.cuda.is_available(), \
'bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())" | tee -a "$OUT/gpu.txt" || fail "imports"

step "1/4 trunk cache speed: on the device, in RAM, uncached"
$PY benchmarks/cache_speed.py "${SPEED[@]}" --json "$OUT/cache_speed.json" 2>&1 | tee "$OUT/cache_speed.txt" \
  || fail "cache speed"

step "2/4 the paper-clip suite on the tiny CLIP at $PX px (digits as EuroSAT), float32 then bfloat16"
$PY benchmarks/paper_clip_local.py "$WORK/pc" | tee "$OUT/paper_clip.txt" || fail "paper-clip stand-ins"
export FEDDTL_CLIP_DIR=$WORK/pc/clip FEDDTL_DATA_ROOT=$WORK/pc/data
SEL=(--scenarios eurosat-fs-path,eurosat-fs-dir --methods "$METHODS" --seeds 1 --set "rounds=$ROUNDS"
     --set eval.every=2 --set "data.image_size=$PX" --set "device=$DEVICE")
$PY -m feddtl bench --suite paper-clip --dry-run "${SEL[@]}" 2>&1 | tee -a "$OUT/paper_clip.txt" \
  || fail "paper-clip dry run"
for precision in float32 bfloat16; do
  $PY -m feddtl bench --suite paper-clip --out "$WORK/pc/$precision" "${SEL[@]}" --set "precision=$precision" 2>&1 \
    | tee -a "$OUT/paper_clip.txt" || fail "paper-clip bench ($precision)"
  cat "$WORK/pc/$precision"/jobs/*.log >> "$OUT/paper_clip.txt" 2>/dev/null
  cp "$WORK/pc/$precision/table.md" "$OUT/paper_clip_table_$precision.md" 2>/dev/null || fail "paper-clip table ($precision)"
  $PY - "$WORK/pc/$precision" "$precision" "$DEVICE" <<'PY' 2>&1 | tee -a "$OUT/paper_clip.txt" || fail "paper-clip results ($precision)"
import json, sys
from pathlib import Path
out, asked, device = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
# results.json records "precision" when a run asks for bfloat16 (absent: float32, the default)
used = {json.loads(p.read_text()).get("precision", "float32") for p in out.glob("runs/*/*/seed0/results.json")}
expected = {asked if device == "cuda" else "float32"}  # bfloat16 falls back to float32 off CUDA
print(f"{asked}: results.json precision {sorted(used)} (expected {sorted(expected)})")
sys.exit(0 if used == expected else 1)
PY
done

step "3/4 float32 vs bfloat16, same seed"
$PY benchmarks/precision_check.py "${PREC[@]}" --json "$OUT/precision.json" 2>&1 | tee "$OUT/precision.txt" \
  || fail "precision check"

step "4/4 the same run twice (hf-clip path, $DEVICE): identical results?"
$PY -c "from feddtl.backbones.tiny_clip import build_tiny_clip; build_tiny_clip('$WORK/tc')" || fail "tiny CLIP"
for r in a b; do
  $PY -m feddtl run --config tiny --set "backbone=\"hf-clip:$WORK/tc\"" --set "device=$DEVICE" \
    --out "$WORK/twice/$r/tiny-clip" --quiet 2>&1 | tail -3 | tee -a "$OUT/same_run.txt" || fail "run $r"
done
$PY benchmarks/compare_runs.py "$WORK/twice/a" "$WORK/twice/b" 2>&1 | tee -a "$OUT/same_run.txt" || fail "same run twice"
cp "$WORK/twice/a/tiny-clip/results.json" "$OUT/same_run_results.json" 2>/dev/null

echo
echo "=== done in $((SECONDS - started)) s ($MODE); results in $OUT"
[[ -s $OUT/failures.txt ]] && cat "$OUT/failures.txt"
exit $status
