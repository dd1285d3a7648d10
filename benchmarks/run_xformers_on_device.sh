#!/usr/bin/env bash
# The xformers (and flash-attn, where importable) attention backends on one CUDA device, in one go,
# from the repository root, with the xformers wheel carried in .whl/:
#
#   OUT=xformers_run bash benchmarks/run_xformers_on_device.sh
#
# 1. installs the wheel into /tmp/site (no index, no dependencies) and puts it and the source
#    tree on PYTHONPATH; writes `python -m xformers.info` to $OUT/xformers_info.txt;
# 2. runs the backends' tests (tests/test_attention_backends_gpu.py, tests/test_attention_backends.py)
#    while the Triton kernels the benchmark launches compile in parallel processes;
# 3. times attention at BLIP's shapes (python -m benchmarks --kernels --sections attention):
#    xformers / flash-attn next to triton, every torch SDPA backend and the reference, forward and
#    forward+backward, eager and CUDA graph; writes kernels.json, kernels.md,
#    attention_timings.json (the rows blip_fast.ops.measured reads) and xformers_summary.md.
# QUICK=0 for the full-length timings. Under 4 minutes on an H100.
set -u
OUT=${OUT:-xformers_run}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1 TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/blip_fast_triton_cache}
[ -z "${BLIP_FAST_GIT_COMMIT:-}" ] && [ -f COMMIT ] && export BLIP_FAST_GIT_COMMIT=$(cat COMMIT)
{ date -u; nvidia-smi --query-gpu=name,driver_version --format=csv;
  python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'; } > "$OUT/device.txt" 2>&1
python -m xformers.info > "$OUT/xformers_info.txt" 2>&1
echo "xformers.info exit $?" >> "$OUT/xformers_info.txt"
python -c 'import blip_fast
for name, reason in blip_fast.available_backends().items(): print(name + ":", reason or "available")' >> "$OUT/device.txt" 2>&1
cat "$OUT/device.txt"; head -40 "$OUT/xformers_info.txt"

QUICK_ARG=--quick; [ "${QUICK:-1}" = 0 ] && QUICK_ARG=
timeout "${PYTEST_TIMEOUT:-120}" python -m pytest -v -p no:cacheprovider -n "${PYTEST_WORKERS:-4}" -rfs \
  tests/test_attention_backends_gpu.py tests/test_attention_backends.py > "$OUT/pytest.txt" 2>&1 &
PYTEST_PID=$!
timeout "${WARM_TIMEOUT:-90}" python -m benchmarks --kernels --out "$OUT" --sections attention $QUICK_ARG \
  --warm "${WARM_WORKERS:-8}" --warm-only > "$OUT/warm_log.txt" 2>&1
echo "warm exit $?" >> "$OUT/warm_log.txt"
wait "$PYTEST_PID"; echo "pytest exit $?" >> "$OUT/pytest.txt"
tail -30 "$OUT/pytest.txt"

timeout "${BENCH_TIMEOUT:-120}" python -m benchmarks --kernels --out "$OUT" --sections attention $QUICK_ARG \
  > "$OUT/bench_log.txt" 2>&1
echo "bench exit $?" >> "$OUT/bench_log.txt"
grep "^section\|attention timings\|exit" "$OUT/bench_log.txt"

python - "$OUT" <<'PY' | tee "$OUT/xformers_summary.md"
import json, os, sys
out = sys.argv[1]
report = json.load(open(os.path.join(out, "kernels.json")))
att = report.get("attention") or {}
env = report.get("env", {})
print(f"# xformers / flash-attn next to triton and torch SDPA ({env.get('device')}, torch {env.get('torch')}, "
      f"{env.get('date')}, commit {env.get('commit')})\n")
libs = [n for n in ("xformers", "flash_attn") if any(n in s.get("results", {}) for s in att.values())]
def ms(r, key):
    return f"{r[key]:.3f}" if isinstance(r, dict) and r.get(key) is not None else "-"
for key, title in (("fwd_bwd_graph_ms", "forward+backward, CUDA graph (GPU time)"), ("fwd_graph_ms", "forward, CUDA graph"),
                   ("fwd_bwd_ms", "forward+backward, eager through blip_fast.ops (ops_*)"), ("fwd_ms", "forward, eager (ops_*)")):
    eager = "graph" not in key
    cols = ["ops_triton", "ops_sdpa"] + [f"ops_{n}" for n in libs] + ["ops_auto"] if eager else ["triton"] + libs
    print(f"\n## {title}, bf16, median ms\n")
    print("| shape | " + " | ".join(cols) + ("" if eager else " | fastest torch SDPA") + " |")
    print("|---|" + "---:|" * (len(cols) + (0 if eager else 1)))
    for name, sh in att.items():
        res = sh.get("results", {})
        cells = [ms(res.get(c), key) for c in cols]
        if not eager:
            sdpa = sorted((r[key], n) for n, r in res.items() if n.startswith("sdpa_") and isinstance(r, dict) and r.get(key))
            cells.append(f"{sdpa[0][0]:.3f} ({sdpa[0][1][5:]})" if sdpa else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
print("\n## accuracy and kernels\n")
for name, sh in att.items():
    res = sh.get("results", {})
    for lib in libs:
        r = res.get(lib, {})
        print(f"- {name} {lib}: rel err {r.get('rel_err', r.get('error'))}, ops {r.get('xformers_ops', '')}")
PY
