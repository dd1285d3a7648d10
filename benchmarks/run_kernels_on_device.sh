#!/usr/bin/env bash
# Kernel checks and measurements on one CUDA device, in one go, from the repository root:
#
#   OUT=kernel_run bash benchmarks/run_kernels_on_device.sh [SECTIONS] [PYTEST_SCOPE]
#
# 1. the Triton kernel tests on the GPU, with every direct launch checked against triton's own
#    specialisation (BLIP_FAST_TRITON_CHECK_LAUNCH=1), in parallel processes, while
# 2. every kernel the benchmarks launch is compiled in parallel processes (untimed), then
# 3. python -m benchmarks --kernels (SECTIONS: comma-separated, default all) times them alone.
# PYTEST_SCOPE: "gpu" (gpu-marked tests, default), "all" (the small-shape tests on CUDA too)
# or "none". Needs no network and no install (the source tree is put on PYTHONPATH).
set -u
OUT=${OUT:-kernel_run}
SECTIONS=${1:-env,graph_dropout,host,sweeps,crossover,attention,layer_norm,gelu,cross_entropy}
SCOPE=${2:-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/blip_fast_triton_cache}
# A copy of the tree without .git records its commit in a file named COMMIT.
[ -z "${BLIP_FAST_GIT_COMMIT:-}" ] && [ -f COMMIT ] && export BLIP_FAST_GIT_COMMIT=$(cat COMMIT)
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv;
  python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"
TESTS="tests/test_triton_attention.py tests/test_triton_norm_gelu_ce.py tests/test_triton_launch_ops.py"
PYTEST_PID=
if [ "$SCOPE" != none ]; then
  MARK=(); [ "$SCOPE" = gpu ] && MARK=(-m gpu)
  BLIP_FAST_TRITON_CHECK_LAUNCH=1 timeout "${PYTEST_TIMEOUT:-150}" python -m pytest -v -p no:cacheprovider \
    -n "${PYTEST_WORKERS:-6}" "${MARK[@]}" $TESTS -rf > "$OUT/pytest.txt" 2>&1 &
  PYTEST_PID=$!
fi
timeout "${WARM_TIMEOUT:-120}" python -m benchmarks --kernels --out "$OUT" --sections "$SECTIONS" \
  --warm "${WARM_WORKERS:-8}" --warm-only ${BENCH_ARGS:-} > "$OUT/warm_log.txt" 2>&1
echo "warm exit $?" >> "$OUT/warm_log.txt"
if [ -n "$PYTEST_PID" ]; then
  wait "$PYTEST_PID"; echo "pytest exit $?" >> "$OUT/pytest.txt"
  tail -25 "$OUT/pytest.txt"
fi
tail -3 "$OUT/warm_log.txt"
timeout "${BENCH_TIMEOUT:-240}" python -m benchmarks --kernels --out "$OUT" --sections "$SECTIONS" ${BENCH_ARGS:-} \
  > "$OUT/bench_log.txt" 2>&1
echo "bench exit $?" >> "$OUT/bench_log.txt"
grep "^section" "$OUT/bench_log.txt"
