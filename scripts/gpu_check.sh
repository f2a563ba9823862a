#!/usr/bin/env bash
# On a GPU machine with torch + triton already installed (nothing is installed here):
#   scripts/gpu_check.sh [tests|bench|all] [OUT_DIR] [bench families...]
# runs the test suite on the GPU (the `gpu`-marked tests included) and/or the benchmarks,
# writes logs and results to OUT_DIR (default benchmarks/results) and prints a short table last.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-all}
out=${2:-benchmarks/results}
shift $(( $# > 2 ? 2 : $# ))
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0

python3 - <<'PY' | tee "$out/environment.txt"
import torch, triton
print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}")
print(f"device {torch.cuda.get_device_name()}, capability {torch.cuda.get_device_capability()}, "
      f"{torch.cuda.get_device_properties(0).multi_processor_count} SMs")
PY

if [[ $mode == tests || $mode == all ]]; then
  # Triton compiles a kernel per new specialisation: run test files in parallel processes.
  jobs=(); python3 -c "import xdist" 2>/dev/null && jobs=(-n "${TEST_JOBS:-8}" --dist loadfile)
  HYPOTHESIS_PROFILE=${HYPOTHESIS_PROFILE:-ci} timeout "${TEST_TIMEOUT:-540}" \
    python3 -m pytest -q "${jobs[@]}" -rf --tb=short --durations=15 -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log"
  rc=${PIPESTATUS[0]}; [[ $rc == 0 ]] || status=$rc
fi
if [[ $mode == bench || $mode == all ]]; then
  timeout "${BENCH_TIMEOUT:-540}" python3 -m dsv4_triton.bench --out "$out" "$@" 2>&1 | tee "$out/bench.log"
  rc=${PIPESTATUS[0]}; [[ $rc == 0 ]] || status=$rc
fi

echo "== summary =="
[[ -f $out/gpu_tests.log ]] && tail -n 3 "$out/gpu_tests.log"
for md in "$out"/*.md; do [[ -f $md ]] && grep -E '^\| ' "$md" | cut -d"|" -f2-9,14,15; done
exit $status
