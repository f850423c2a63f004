#!/usr/bin/env bash
# One device call: build the cubins, run the GPU tests, the main job (llama7b.yaml and, when
# .trace/smollm2_trace.npz exists, the real SmolLM2 trace), then the benchmark; the
# benchmark's table is printed last.
# Usage (on the GPU machine, from the repo root): bash scripts/gpu_check.sh [bench args...]
# SKIP_RUN=1 / SKIP_BENCH=1 leave those steps out. Logs and JSON go under $OUT
# (default /tmp/akv_out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/akv_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 AKV_REQUIRE_GPU=1
status=0
echo "== environment"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader
python3 - <<'PY'
import importlib.metadata as md
for p in ("torch", "cuda-python", "cuda-bindings", "cuda-core", "transformers", "numpy"):
    try: print(f"{p} {md.version(p)}")
    except Exception as e: print(f"{p} missing")
PY
echo "== build"
python3 build.py --arch sm_90 -j 8 2>&1 | tee "$OUT/build.log" || status=1
echo "== GPU tests"
python3 -m pytest -q -m gpu -p no:cacheprovider tests "${PYTEST_ARGS[@]:-}" 2>&1 | tee "$OUT/pytest.log" | tail -40
if [ "${PIPESTATUS[0]}" != 0 ]; then
  status=1
  # the failures' assertion lines and their rng seeds (AKV_TEST_SEED replays a test), so a
  # failure can be replayed even when the log itself does not come back
  echo "== GPU test failures"
  grep -E "^(FAILED|E  )|rng seed: " "$OUT/pytest.log" | head -40
fi
if [ "${SKIP_RUN:-0}" != 1 ]; then
  echo "== main job through the cubins"
  python3 -m akv_runtime.run --config configs/llama7b.yaml --no-progress \
    --json "$OUT/llama7b.json" --plot "$OUT/llama7b.png" 2>&1 | tail -16 \
    || status=1
  if [ -f .trace/smollm2_trace.npz ]; then   # real SmolLM2 q/K/V captured on a CPU machine
    python3 -m akv_runtime.run --config configs/smollm2-135m.yaml --no-progress \
      --trace .trace/smollm2_trace.npz --json "$OUT/smollm2_trace.json" \
      --plot "$OUT/smollm2_trace.png" 2>&1 | tail -16 || status=1
  fi
fi
if [ "${SKIP_BENCH:-0}" != 1 ]; then
  echo "== benchmark"
  python3 -m akv_runtime.bench --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log" || status=1
fi
exit $status
