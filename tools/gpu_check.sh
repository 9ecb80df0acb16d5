#!/usr/bin/env bash
# One command for whoever has a GPU, under 5.5 minutes: the CUDA-marked tests with the Triton
# kernels compiled for real, the kernel benchmark (Triton SDDMM and fused merged weight vs the torch paths),
# the merge benchmark (throughput vs the device's memory bandwidth), and a bitsandbytes 4-bit smoke test
# when bitsandbytes is installed. Each step has its own time limit; a failing or slow step is recorded and
# the others still run. The steps' logs and summary.md (python -m tools.gpu_check_report) land in OUT_DIR.
#
# Usage, from anywhere:   tools/gpu_check.sh [OUT_DIR]          (default ./gpu_check_out)
# Python:                 $PYTHON, else the repository's .venv/bin/python, else python3
# Exit status: 0 all steps passed, 1 some step failed or timed out, 2 no CUDA device.
set -u -o pipefail

OUT=$(mkdir -p "${1:-gpu_check_out}" && cd "${1:-gpu_check_out}" && pwd)
cd "$(dirname "$0")/.."
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON; elif [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
# tests/conftest.py defaults TRITON_INTERPRET to 1 only when it is unset: 0 makes every kernel compile for the GPU.
export TRITON_INTERPRET=0 TRITON_DEFAULT_FP_FUSION=1
: > "$OUT/steps.txt"

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
  "$PY" -c 'import sys, torch, importlib.util as u
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "triton", __import__("triton").__version__ if u.find_spec("triton") else None,
      "bitsandbytes", __import__("bitsandbytes").__version__ if u.find_spec("bitsandbytes") else None)
sys.exit(0 if torch.cuda.is_available() else 2)'; } > "$OUT/env.txt" 2>&1
if [ $? -ne 0 ]; then
  cat "$OUT/env.txt"; echo "gpu_check: no CUDA device visible to $PY; nothing to check." >&2; exit 2
fi

failed=0
step() {  # step NAME SECONDS COMMAND...: run under a time limit into OUT/NAME.log and record the outcome
  local name=$1 limit=$2 start=$SECONDS rc line
  shift 2
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) line="$name: ok in $((SECONDS - start)) s" ;;
    124|137) line="$name: TIMED OUT after $limit s (partial output in $name.log)"; failed=1 ;;
    *) line="$name: FAILED (exit $rc) after $((SECONDS - start)) s, see $name.log"; failed=1 ;;
  esac
  echo "$line" | tee -a "$OUT/steps.txt"
}

# Budget (upper limits, under 5.5 min in all): tests 120 s, kernels 110 s, merge 60 s, 4-bit smoke 45 s.
step pytest 120 "$PY" -m pytest -q -m gpu -p no:cacheprovider -rs --junitxml="$OUT/junit.xml" tests
# Few rounds per configuration: the full grid (2 shapes × 2 dtypes × 4 densities × 3 token counts) must fit.
step kernels 110 "$PY" -m tools.benchmarks.bench_kernels --json --min-repeats 1 --repeats 5 --budget-s 0.5
step merge 60 "$PY" -m tools.benchmarks.bench_merge --device cuda --repeats 3 --json
if "$PY" -c 'import bitsandbytes' > /dev/null 2>&1; then
  step bnb_smoke 45 "$PY" -m tools.benchmarks.bnb_smoke
else
  echo "bnb_smoke: skipped (bitsandbytes is not installed: pip install -e '.[bnb]')" | tee -a "$OUT/steps.txt"
fi

"$PY" -m tools.gpu_check_report "$OUT" > "$OUT/summary.md" && echo "gpu_check: summary in $OUT/summary.md"
exit $failed
