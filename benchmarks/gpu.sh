#!/usr/bin/env bash
# One complete GPU session for the Triton engine: its tests on the GPU, then every benchmark
# the engine's targets need, each table written as JSON (and PNG) under $1 (default gpu-runs/).
#
#   bash benchmarks/gpu.sh [OUT_DIR]
#
# Run from the repository root after `make venv` on a Linux machine with a CUDA GPU and torch's
# CUDA build (set TORCH_VERSION / the index as your platform needs). Timings use CUDA events
# against torch.nn (cuDNN) in the same run; see src/rnnkit/bench/runner.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${1:-gpu-runs}"
mkdir -p "$out"
py=.venv/bin/python
rnnkit=.venv/bin/rnnkit

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
$py -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__)" | tee -a "$out/gpu.txt"

# correctness on the GPU: the engine's grid, autocast against cuDNN, memory at L = 100,000
$py -m pytest -q -p no:cacheprovider tests/engines/test_triton.py tests/engines/test_engines.py \
    tests/engines/test_engine_variants.py -k triton 2>&1 | tee "$out/tests.txt"
$py -m pytest -q -p no:cacheprovider tests/test_amp.py tests/test_memory.py \
    tests/test_reliability.py 2>&1 | tee -a "$out/tests.txt"

# the targets: bfloat16 and float32, persistent kernels where they fit and per-step only
for dtype in bfloat16 float32; do
    $rnnkit bench --device cuda --dtype "$dtype" --engines triton --no-progress \
        --json "$out/bench-$dtype.json" --plot "$out/bench-$dtype.png" | tee "$out/bench-$dtype.txt"
    RNNKIT_TRITON_PERSISTENT=0 $rnnkit bench --device cuda --dtype "$dtype" --engines triton \
        --no-progress --json "$out/bench-$dtype-per-step.json" | tee "$out/bench-$dtype-per-step.txt"
done
# variants against plain cuDNN (float32: the engine runs variants in float32 and float64)
$rnnkit bench --device cuda --engines triton --no-progress \
    --variants layer_norm,zoneout,peephole --json "$out/bench-variants.json" \
    | tee "$out/bench-variants.txt"
