#!/usr/bin/env bash
# Kernel checks and measurements on one CUDA device, in one go, from the repository root:
#
#   OUT=kernel_run bash benchmarks/run_kernels_on_device.sh [SECTIONS] [PYTEST_SCOPE]
#
# 1. the Triton kernel tests on the GPU (every test of the three files: the gpu-marked real
#    shapes and the small-shape tests on CUDA tensors), with every direct launch checked against
#    triton's own specialisation (BLIP_FAST_TRITON_CHECK_LAUNCH=1), 8 processes;
# 2. python -m benchmarks --kernels (SECTIONS: comma-separated, default all) into $OUT.
# PYTEST_SCOPE: "all" (default), "gpu" (gpu-marked only) or "none".
# Needs no network and no install (the source tree is put on PYTHONPATH).
set -u
OUT=${OUT:-kernel_run}
SECTIONS=${1:-env,graph_dropout,host,sweeps,crossover,attention,layer_norm,gelu,cross_entropy}
SCOPE=${2:-all}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/blip_fast_triton_cache}
# A compile cache from an earlier run (optional): TRITON_CACHE_TGZ=path/to/triton_cache.tgz
if [ -n "${TRITON_CACHE_TGZ:-}" ] && [ -f "$TRITON_CACHE_TGZ" ]; then
  mkdir -p "$TRITON_CACHE_DIR" && tar xzf "$TRITON_CACHE_TGZ" -C "$TRITON_CACHE_DIR"
fi
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv;
  python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
TESTS="tests/test_triton_attention.py tests/test_triton_norm_gelu_ce.py tests/test_triton_launch_ops.py"
if [ "$SCOPE" != none ]; then
  MARK=(); [ "$SCOPE" = gpu ] && MARK=(-m gpu)
  BLIP_FAST_TRITON_CHECK_LAUNCH=1 timeout "${PYTEST_TIMEOUT:-240}" python -m pytest -q -p no:cacheprovider \
    -n "${PYTEST_WORKERS:-8}" "${MARK[@]}" $TESTS -rf > "$OUT/pytest.txt" 2>&1
  echo "pytest exit $?" >> "$OUT/pytest.txt"
  tail -25 "$OUT/pytest.txt"
fi
timeout "${BENCH_TIMEOUT:-330}" python -m benchmarks --kernels --out "$OUT" --sections "$SECTIONS" ${BENCH_ARGS:-} \
  > "$OUT/bench_log.txt" 2>&1
echo "bench exit $?" >> "$OUT/bench_log.txt"
tail -5 "$OUT/bench_log.txt"
# Keep the compile cache for a next run when it is small enough to bring back (< 15 MB).
if [ -n "${SAVE_TRITON_CACHE:-}" ]; then
  tar czf /tmp/triton_cache.tgz -C "$TRITON_CACHE_DIR" . 2>/dev/null
  [ "$(stat -c %s /tmp/triton_cache.tgz)" -lt 15000000 ] && cp /tmp/triton_cache.tgz "$OUT/"
  ls -la /tmp/triton_cache.tgz
fi
