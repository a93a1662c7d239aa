#!/usr/bin/env bash
# GPU check of the gradient datastore, as one short script for a lent GPU machine
# (no model/data packages, no Dagster there): the CUDA tests, then the side-by-side
# benchmark on SmolLM2-135M's architecture with random weights and pre-tokenized examples.
# Prepare on a CPU machine with the project installed:
#   mkdir -p .gpu/model && cp storage/models/converted/*/config.json .gpu/model/
#   .venv/bin/python bench/gradients.py --export-examples .gpu/examples.jsonl --n-examples 256 --n-targets 8
# then run `bash bench/gpu_check.sh OUTDIR` on the GPU machine with .gpu/ beside it.
set -uo pipefail
out=${1:-gpu-check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$out/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}
python3 bench/gradients.py --device cuda --random-weights --model-config .gpu/model \
    --examples-file .gpu/examples.jsonl --n-examples 256 --n-targets 8 --batch-size 32 --repeats 3 \
    --ours-exact-cache-gb 32 2>&1 | tee "$out/bench_gpu.log"
bench_rc=${PIPESTATUS[0]}
echo "gpu tests rc=$tests_rc, bench rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
