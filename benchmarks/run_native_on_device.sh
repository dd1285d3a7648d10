#!/usr/bin/env bash
# The native CUDA extension on one CUDA device, in one go, from the repository root:
#
#   OUT=native_run bash benchmarks/run_native_on_device.sh
#
# 1. builds it with CMake (python -m blip_fast.native build: find_package(Torch), falling back
#    to libtorch's folders from Python) into blip_fast/_native, log in $OUT/build_log.txt, while
#    the Triton kernels the benchmarks compare with are compiled (untimed);
# 2. runs its GPU tests (tests/test_cuda_extension.py -m gpu; a missing extension fails them);
# 3. times it: python -m benchmarks --kernels --sections native_layer_norm,momentum_update,
#    tables in $OUT/kernels.md, every number in $OUT/kernels.json.
# A failed build prints the compiler's errors and the log's tail and stops. Needs no network and
# no install (the source tree is put on PYTHONPATH). About 3-4 minutes on an H100.
set -u
OUT=${OUT:-native_run}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/blip_fast_triton_cache}
[ -z "${BLIP_FAST_GIT_COMMIT:-}" ] && [ -f COMMIT ] && export BLIP_FAST_GIT_COMMIT=$(cat COMMIT)
SECTIONS=native_layer_norm,momentum_update
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,temperature.gpu --format=csv;
  python -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)';
  nvcc --version | tail -2; cmake --version | head -1; ninja --version; } > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"

timeout "${WARM_TIMEOUT:-150}" python -m benchmarks --kernels --out "$OUT/warm" --sections "$SECTIONS" \
  --warm 2 --warm-only > "$OUT/warm_log.txt" 2>&1 &
WARM_PID=$!
START=$(date +%s)
timeout "${BUILD_TIMEOUT:-240}" python -m blip_fast.native build > "$OUT/build_log.txt" 2>&1
BUILD_RC=$?
echo "build exit $BUILD_RC after $(( $(date +%s) - START )) s"
for f in build/native/CMakeCache.txt build/native-paths/CMakeCache.txt; do
  [ -f "$f" ] && cp "$f" "$OUT/$(echo "$f" | tr / _)"
done
if [ "$BUILD_RC" -ne 0 ]; then
  echo "=== build failed: compiler/CMake errors ==="
  grep -n -E "error|Error|FAILED|undefined reference" "$OUT/build_log.txt" | head -60
  echo "=== last 150 lines of $OUT/build_log.txt ==="
  tail -150 "$OUT/build_log.txt"
  kill "$WARM_PID" 2>/dev/null
  exit 1
fi
grep -E "^built |^-- blip_fast|Found Torch" "$OUT/build_log.txt"
ls -la blip_fast/_native/
python -m blip_fast.native info | tee "$OUT/native_info.txt"
wait "$WARM_PID"; echo "warm exit $?" >> "$OUT/warm_log.txt"; tail -3 "$OUT/warm_log.txt"

PARALLEL=(); python -c "import xdist" 2>/dev/null && PARALLEL=(-n "${PYTEST_WORKERS:-4}")
BLIP_FAST_REQUIRE_NATIVE=1 timeout "${PYTEST_TIMEOUT:-150}" python -m pytest -q -p no:cacheprovider \
  "${PARALLEL[@]}" -m gpu tests/test_cuda_extension.py -rf --durations=10 > "$OUT/pytest.txt" 2>&1
echo "pytest exit $?" >> "$OUT/pytest.txt"
tail -40 "$OUT/pytest.txt"

timeout "${BENCH_TIMEOUT:-150}" python -m benchmarks --kernels --out "$OUT" --sections "$SECTIONS" \
  > "$OUT/bench_log.txt" 2>&1
echo "bench exit $?" >> "$OUT/bench_log.txt"
grep -E "^section|failed" "$OUT/bench_log.txt"
cat "$OUT/kernels.md"
