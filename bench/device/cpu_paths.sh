#!/bin/bash
# keel's CPU paths on the device machine's host CPU (often AVX-512, unlike the 2-core AVX2 dev machine):
# which ISA builds run, and the kernel, batch-invariance and parity tests on each of them.
# Run from the repo root with the pure-Python extras in .devcarry/site (bench/device/make_carry.sh builds it):
#   bash bench/device/cpu_paths.sh   (results under $OUT, or ./device-out)
OUT=${OUT:-device-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD/.devcarry/site:$PWD KEEL_CACHE_DIR=/tmp/keel-cache PYTHONUNBUFFERED=1
export CUDA_VISIBLE_DEVICES="" # the CPU paths only
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
{
  lscpu | grep -E "Model name|^CPU\(s\)"
  grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -E "^(avx|amx|fma|f16c)" | tr '\n' ' '; echo
  python -V
  python -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  python -c "from keel.kernels.cpu import runnable_isas, kernels; r = runnable_isas(); print('runnable', r); print({i: kernels(i) is not None for i in r})"
} 2>&1 | tee "$OUT/machine.txt"
T="tests/models/test_parity.py tests/engine/test_gemm_kernel.py tests/engine/test_decode_kernels.py tests/engine/test_batch_invariance.py tests/unit/test_device.py tests/models/test_fused_decode.py tests/quant/test_layers.py"
timeout 300 python -m pytest -q -p no:cacheprovider -m "not slow" $T 2>&1 | tail -25 | tee "$OUT/tests-auto.txt"
for isa in avx2 avx512; do
  KEEL_CPU_ISA=$isa timeout 120 python -m pytest -q -p no:cacheprovider -m "not slow" \
    tests/engine/test_batch_invariance.py tests/models/test_fused_decode.py 2>&1 | tail -6 | tee "$OUT/tests-$isa.txt"
done
if [ -n "$WITH_DECODE_BENCH" ]; then
  timeout 300 python bench/device/cpu_decode.py "$OUT/cpu_decode.json" 2>&1 | grep -v -i -E "warn|shards|Loading" | tee "$OUT/cpu_decode.txt"
fi
