#!/usr/bin/env bash
# Paper-scale (7B) gradient datastore on one lent GPU: random-weight Llama-2-7B architecture,
# 256 pre-tokenized pool examples (bench/gpu_scale_examples.npz, in the repository), LoRA r=128,
# the default feature recipe (whole-sequence loss, sgd) in device and fast mode, LESS's (response, adam),
# 8192 dims. Needs python3 with torch, transformers, peft and numpy; no model files, no network.
# Sized for under 5 minutes on an H100/H200. Usage: bash bench/gpu_scale.sh [OUTDIR]
set -uo pipefail
out=${1:-gpu-scale}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
timeout 540 python3 bench/gpu_scale.py --device cuda 2>&1 | tee "$out/gpu_scale.log"
exit "${PIPESTATUS[0]}"
