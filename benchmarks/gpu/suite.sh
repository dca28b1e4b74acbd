#!/usr/bin/env bash
# The device suite: build the extension from source, run the GPU tests, time BSR linear against cuBLAS and
# torch.sparse (results.md + results.json), pruned conv2d against cuDNN (pruned_conv2d.md + .json), BSR conv2d
# (Triton implicit GEMM) against its im2col route and dense cuDNN (bsr_conv2d.md + .json), and CSR decode
# against cuBLAS / cuSPARSE plus 2:4 at 8192^3 against cuBLAS (csr_sparse24.md + .json) in OUTDIR, and last,
# in whatever time is left, one SparseConv2d training step against cuDNN's (sparse_conv2d_train_gpu.md + .json).
# Every step is guarded (one failing step does not stop the next) and logged to OUTDIR/<step>.log;
# OUTDIR/steps.tsv says how each ended; the tables print last.
#
#   bash benchmarks/gpu/suite.sh OUTDIR          # on a GPU machine, under 8 minutes
#   bash benchmarks/gpu/suite.sh OUTDIR --dry    # on a CPU machine: wiring check, stub table marked DRY
#
# Env: PYTHON (default python3), SUITE_BUILD_S / SUITE_TEST_S / SUITE_BENCH_S / SUITE_CONV_S / SUITE_BSRCONV_S /
# SUITE_CSR_S / SUITE_CONVTRAIN_S (step time limits, seconds), SUITE_TOTAL_S (the whole run's deadline, default 500 s: no step runs
# past it, so a step that hangs costs the later ones their time, not the device session more than 8.5 minutes;
# the step limits alone add up to 980 s). Budget on an H100: build ~45 s, tests ~90 s (the BSR conv tests, new
# since that measurement, add about 30 compiles), BSR bench 125 s of cases (the three skewed-structure schedule
# cases first, then the main table until the budget), conv bench 90 s, BSR conv bench 40 s, CSR/2:4 bench
# ~40 s, plus start-up and floors per step.
set -u -o pipefail
if [ $# -lt 1 ]; then echo "usage: $0 OUTDIR [--dry]" >&2; exit 2; fi
OUT=$(mkdir -p "$1" && cd "$1" && pwd)
DRY=0
[ "${2:-}" = "--dry" ] && DRY=1
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
PY=${PYTHON:-$(command -v python3 || command -v python)}
: > "$OUT/steps.tsv"
T0=$(date +%s)
DEADLINE=$(( T0 + ${SUITE_TOTAL_S:-500} ))

# step NAME LIMIT_S CMD...: runs CMD with a time limit (cut to what is left before the deadline), output to
# OUT/NAME.log, status to steps.tsv
step() {
  local name=$1 limit=$2; shift 2
  local t=$(date +%s) rc
  local left=$(( DEADLINE - t ))
  if [ $left -lt 5 ]; then skip "$name" "no time left before the ${SUITE_TOTAL_S:-500}s deadline"; return 0; fi
  [ $left -lt "$limit" ] && limit=$left
  echo "== $name (limit ${limit}s): $*" | tee -a "$OUT/suite.log"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%ss\n' "$name" "$rc" "$(( $(date +%s) - t ))" >> "$OUT/steps.tsv"
  [ $rc -eq 0 ] || { echo "   $name failed (rc=$rc); last lines of $OUT/$name.log:"; tail -n 15 "$OUT/$name.log"; } | tee -a "$OUT/suite.log"
  return 0
}
skip() { printf '%s\tskipped\t%s\n' "$1" "$2" >> "$OUT/steps.tsv"; echo "== $1 skipped: $2" | tee -a "$OUT/suite.log"; }

# pyprune_kernels is the installed name of kernels/; without a pip install, point it at the checkout
SHIM=$(mktemp -d)
ln -s "$ROOT/kernels" "$SHIM/pyprune_kernels"
export PYTHONPATH="$ROOT:$SHIM${PYTHONPATH:+:$PYTHONPATH}"
trap 'rm -rf "$SHIM"' EXIT

step env 30 bash -c "nvidia-smi || echo 'nvidia-smi: not available'; $PY -c 'import sys, torch; print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"available\", torch.cuda.is_available()); import triton; print(\"triton\", triton.__version__)'; command -v nvcc && nvcc --version | tail -n 2"

if [ $DRY -eq 1 ]; then
  skip build "DRY: would run TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PY setup.py build_ext --inplace"
  if $PY -c "import pytest" 2>/dev/null; then
    skip pytest "DRY: would run $PY -m pytest -m gpu tests"
  else
    skip pytest "pytest is not installed"
  fi
  step bench 120 "$PY" benchmarks/gpu/bench_bsr_linear_gpu.py --out "$OUT" --dry
  step bench_conv 120 "$PY" benchmarks/gpu/bench_pruned_conv2d_gpu.py --out "$OUT" --dry
  step bench_bsrconv 120 "$PY" benchmarks/gpu/bench_bsr_conv2d_gpu.py --out "$OUT" --dry
  step bench_csr 120 "$PY" benchmarks/gpu/bench_csr_sparse24_gpu.py --out "$OUT" --dry
  step bench_convtrain 120 "$PY" benchmarks/sparse_conv2d_train_table.py --quick --out "$OUT" --name sparse_conv2d_train_gpu
else
  step build "${SUITE_BUILD_S:-180}" env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 PYPRUNE_CUDA=1 "$PY" setup.py build_ext --inplace
  step info 30 "$PY" -c "import pyprune; pyprune.info()"
  if $PY -c "import pytest" 2>/dev/null; then
    # one kernel config per shape in the tests: tuning every config would compile for minutes
    step pytest "${SUITE_TEST_S:-240}" env PYPRUNE_TRITON_AUTOTUNE=0 "$PY" -m pytest -m gpu tests -q -p no:cacheprovider \
      -o addopts="" --strict-markers --junitxml="$OUT/pytest.xml"
    tail -n 3 "$OUT/pytest.log" | tee -a "$OUT/suite.log"
  else
    skip pytest "pytest is not installed on this machine"
  fi
  # case budgets trimmed (BSR 170 -> 125 s, conv 110 -> 90 s) to make room for the CSR / 2:4 step
  step bench "${SUITE_BENCH_S:-200}" "$PY" benchmarks/gpu/bench_bsr_linear_gpu.py --out "$OUT" --budget-s 125
  # autotuning compiles each Triton config once per layout and kernel size: the budget cuts bf16 first
  step bench_conv "${SUITE_CONV_S:-150}" "$PY" benchmarks/gpu/bench_pruned_conv2d_gpu.py --out "$OUT" --budget-s 90
  step bench_bsrconv "${SUITE_BSRCONV_S:-60}" "$PY" benchmarks/gpu/bench_bsr_conv2d_gpu.py --out "$OUT" --budget-s 40
  step bench_csr "${SUITE_CSR_S:-90}" "$PY" benchmarks/gpu/bench_csr_sparse24_gpu.py --out "$OUT" --budget-s 40
  # a training step of SparseConv2d csr / bsr at 90% (ResNet-50's 64->64 3x3 @56, 512->512 3x3 @7 and strided
  # 3x3s, whose input gradient runs one Triton conv per stride phase) against nn.Conv2d's, and against the same
  # modules with cuDNN's backward (--dense-backward); last, as it gets only the time the others leave
  step bench_convtrain "${SUITE_CONVTRAIN_S:-60}" env PYPRUNE_TRITON_AUTOTUNE=0 "$PY" \
    benchmarks/sparse_conv2d_train_table.py --device cuda --shapes 0 4 8 9 10 --sparsities 0.9 --rounds 3 \
    --batch-ms 20 --dense-backward --out "$OUT" --name sparse_conv2d_train_gpu
fi

echo
echo "== steps (name, rc, seconds); total $(( $(date +%s) - T0 ))s"
column -t -s "$(printf '\t')" "$OUT/steps.tsv" 2>/dev/null || cat "$OUT/steps.tsv"
echo
if [ -f "$OUT/results.md" ]; then cat "$OUT/results.md"; else echo "no results.md: see $OUT/bench.log"; fi
echo
if [ -f "$OUT/pruned_conv2d.md" ]; then cat "$OUT/pruned_conv2d.md"; else echo "no pruned_conv2d.md: see $OUT/bench_conv.log"; fi
echo
if [ -f "$OUT/bsr_conv2d.md" ]; then cat "$OUT/bsr_conv2d.md"; else echo "no bsr_conv2d.md: see $OUT/bench_bsrconv.log"; fi
echo
if [ -f "$OUT/csr_sparse24.md" ]; then cat "$OUT/csr_sparse24.md"; else echo "no csr_sparse24.md: see $OUT/bench_csr.log"; fi
echo
if [ -f "$OUT/sparse_conv2d_train_gpu.md" ]; then cat "$OUT/sparse_conv2d_train_gpu.md"
else echo "no sparse_conv2d_train_gpu.md: see $OUT/bench_convtrain.log"; fi
