#!/usr/bin/env bash
# Every check that needs a GPU, in one call on a lent GPU machine (issues 24 and 25); each result under $OUT.
#
#   OUT=/some/dir benchmarks/gpu_check.sh            # on the GPU machine, from the repository root (≤ 8 min)
#   benchmarks/gpu_check.sh --dry-run                # here: the same steps on the CPU, tiny model (~2 min)
#   GPU_TESTS="engine or out_of_memory" benchmarks/gpu_check.sh  # a later call: only the tests -k selects
#   GPU_TESTS=- benchmarks/gpu_check.sh              # the benchmark alone
#
# No install and no network: the checkout is imported from here (PYTHONPATH); the machine's python3 holds
# torch, transformers, onnx, onnxruntime and tokenizers, which is all the core and the export need.
#   1. env.txt           the GPU, driver, library versions, the host's CPU
#   2. tests.log         pytest -m gpu tests/test_gpu.py (the base artifact is exported meanwhile, on the CPU)
#      gpu_checks.jsonl  the numbers those tests measured, one JSON line per check
#   3. benchmark.log     python -m clinlong.benchmarks.gpu: Hugging Face eager rows, ours per kernel and
#      gpu.json          precision, with preparation, with global attention on <s>; one JSON line per row
#      profile.txt       torch.profiler: the top kernels of our model step (first precision and kernel)
# Exit status: the first failing step's (every step runs regardless).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
[[ ${1:-} == --dry-run ]] && DRY=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CLINLONG_GPU_REPORT="$OUT/gpu_checks.jsonl"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
if ((DRY)); then
  DEVICE=cpu SIZE=tiny NOTES=12 TESTS_LIMIT=300 BENCH_LIMIT=400
else
  DEVICE=cuda:0 SIZE=base NOTES=400 TESTS_LIMIT=200 BENCH_LIMIT=300
fi
status=0
step() {  # step NAME LIMIT_SECONDS LOG COMMAND...: run with a time limit, keep its output, remember a failure
  local name=$1 limit=$2 log=$3 rc
  shift 3
  echo "== $name (limit ${limit}s) $(date -u +%T)"
  timeout --signal=INT --kill-after=20 "$limit" "$@" > >(tee "$log") 2>&1
  rc=$?
  echo "== $name: exit $rc $(date -u +%T)"
  ((rc != 0 && status == 0)) && status=$rc
  return 0
}

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import platform, sys
import onnxruntime, tokenizers, torch, transformers
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda,
      "| transformers", transformers.__version__, "| onnxruntime", onnxruntime.__version__,
      "| tokenizers", tokenizers.__version__)
print("cuda device:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
      "| host:", platform.processor() or platform.machine())
EOF
  nproc
  lscpu 2>/dev/null | grep -E "^Model name|^CPU\(s\)" || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The benchmark's artifact (synthetic checkpoint, export with its parity check), built on the CPU while
# the tests use the GPU.
"$PY" -c "import sys; from pathlib import Path; from clinlong.benchmarks.inputs import ensure_artifact; \
ensure_artifact(Path(sys.argv[1]), sys.argv[2])" "$WORK" "$SIZE" > "$OUT/export.log" 2>&1 &
export_pid=$!

[[ ${GPU_TESTS:-} == - ]] || step "GPU tests" "$TESTS_LIMIT" "$OUT/tests.log" \
  "$PY" -m pytest -p no:cacheprovider -m gpu tests/test_gpu.py -q -rs -o timeout=150 --basetemp "$WORK/pytest" \
  ${GPU_TESTS:+-k "$GPU_TESTS"}

echo "== waiting for the $SIZE artifact's export $(date -u +%T)"
if ! wait "$export_pid"; then
  echo "the export failed:"; tail -5 "$OUT/export.log"
  ((status == 0)) && status=1
fi
step "benchmark" "$BENCH_LIMIT" "$OUT/benchmark.log" \
  "$PY" -m clinlong.benchmarks.gpu --work "$WORK" --device "$DEVICE" --size "$SIZE" --notes "$NOTES" \
  --json "$OUT/gpu.json" --profile "$OUT/profile.txt"
echo "== done, exit $status; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$status"
