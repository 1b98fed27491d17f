#!/usr/bin/env bash
# One-call check of the CUDA side of mnist_fast on a machine with a GPU, python3 and torch already
# installed, and no network. From this checkout it:
#   1. builds the extension in place with the CUDA sources (for the visible GPU's architecture),
#   2. runs the CUDA tests (tests/test_cuda.py; --all-tests: the whole suite; without pytest, a
#      short parity check against stock: scripts/gpu_bench.py parity),
#   3. runs compute-sanitizer --tool memcheck over a short fused training workload, where the tool exists,
#   4. times the fused ops against stock with CUDA events (medians) at batch 64/1024/8192,
# and prints a summary table last. Each step has its own time limit; the whole fits in 8 minutes.
#
# --dry-run does everything that needs no GPU: parses the arguments, works out the build
# environment and prints the commands, checks that the build configuration loads, and runs the
# timing harness on the CPU. tests/test_cuda.py runs it that way.
set -uo pipefail

usage() {
  cat <<'EOF'
usage: scripts/gpu_check.sh [options]

Build mnist_fast with CUDA from this checkout, run the CUDA tests, compute-sanitizer memcheck and
timings against stock PyTorch; print a summary table last. Needs a GPU (except with --dry-run).

options:
  --dry-run          no GPU needed: print the plan and build environment, check the build
                     configuration, run the timing harness on the CPU
  --python PATH      interpreter to use (default: python3)
  --batches LIST     comma-separated batch sizes to time (default: 64,1024,8192)
  --skip-build       use the extension already built in place
  --skip-tests       skip the CUDA tests
  --skip-sanitizer   skip compute-sanitizer
  --skip-bench       skip the timings
  --all-tests        run the whole pytest suite instead of tests/test_cuda.py only
  --budget SECONDS   time for all steps together (default: 470); a step that would start with
                     less than 15 s left is skipped
  -h, --help         this text
EOF
}

PYTHON=python3
BATCHES=64,1024,8192
BUDGET=470  # seconds for everything: the check must fit in 8 minutes
DRY_RUN=0 SKIP_BUILD=0 SKIP_TESTS=0 SKIP_SANITIZER=0 SKIP_BENCH=0 ALL_TESTS=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --python) [[ $# -ge 2 ]] || { echo "gpu_check: --python needs a value" >&2; exit 2; }; PYTHON=$2; shift ;;
    --python=*) PYTHON=${1#*=} ;;
    --batches) [[ $# -ge 2 ]] || { echo "gpu_check: --batches needs a value" >&2; exit 2; }; BATCHES=$2; shift ;;
    --batches=*) BATCHES=${1#*=} ;;
    --skip-build) SKIP_BUILD=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --skip-sanitizer) SKIP_SANITIZER=1 ;;
    --skip-bench) SKIP_BENCH=1 ;;
    --all-tests) ALL_TESTS=1 ;;
    --budget) [[ $# -ge 2 ]] || { echo "gpu_check: --budget needs a value" >&2; exit 2; }; BUDGET=$2; shift ;;
    --budget=*) BUDGET=${1#*=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check: unknown argument: $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
if ! [[ $BUDGET =~ ^[0-9]+$ ]]; then
  echo "gpu_check: --budget must be a number of seconds, got '$BUDGET'" >&2
  exit 2
fi
if ! [[ $BATCHES =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  echo "gpu_check: --batches must be comma-separated integers, got '$BATCHES'" >&2
  exit 2
fi

cd "$(dirname "$0")/.." || exit 1
START=$SECONDS
SUMMARY=()  # "step|status|seconds"

note() { echo; echo "== $* (t=$((SECONDS - START))s)"; }
record() { SUMMARY+=("$1|$2|$3"); }

# Runs a step under a time limit (its own, or what is left of the budget) and records its outcome:
# record_step NAME LIMIT_S CMD...
record_step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc left=$((BUDGET - (SECONDS - START)))
  if [[ $left -lt 15 ]]; then
    record "$name" "skipped (out of time)" 0
    return 1
  fi
  [[ $left -lt $limit ]] && limit=$left
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  local status=ok
  [[ $rc -eq 124 || $rc -eq 137 ]] && status="TIMEOUT (${limit}s)"
  [[ $rc -ne 0 && $status == ok ]] && status="FAILED (rc $rc)"
  record "$name" "$status" $((SECONDS - t0))
  return $rc
}

"$PYTHON" -c "import torch" 2>/dev/null || { echo "gpu_check: '$PYTHON' cannot import torch" >&2; exit 1; }

# ---- environment ----
note "environment"
"$PYTHON" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__}, torch CUDA {torch.version.cuda}")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"cuda:{i} {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
else:
    print("no CUDA device visible")
EOF
HAVE_GPU=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))")
if [[ $HAVE_GPU != 1 && $DRY_RUN == 0 ]]; then
  echo "gpu_check: no CUDA device visible to torch; use --dry-run to check the CPU-side parts" >&2
  exit 1
fi

# The toolkit and the architectures as setup.py finds them (build_config.py): CUDA_HOME from the
# environment, /usr/local/cuda, the nvcc on PATH or torch's guess; TORCH_CUDA_ARCH_LIST of the
# visible GPU (half the nvcc time of the default list), 8.0;9.0 when none is visible.
CUDA_HOME=$("$PYTHON" build_config.py cuda-home)
TORCH_CUDA_ARCH_LIST=$("$PYTHON" build_config.py arch-list)
export CUDA_HOME TORCH_CUDA_ARCH_LIST
export MNIST_FAST_CUDA=1
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
SANITIZER=$(command -v compute-sanitizer || true)
[[ -z $SANITIZER && -n $CUDA_HOME && -x $CUDA_HOME/bin/compute-sanitizer ]] && SANITIZER=$CUDA_HOME/bin/compute-sanitizer
NINJA=$(command -v ninja || true)

echo "CUDA_HOME=${CUDA_HOME:-<none>} ($( [[ -n $CUDA_HOME && -x $CUDA_HOME/bin/nvcc ]] && "$CUDA_HOME/bin/nvcc" --version | tail -1 || echo 'no nvcc'))"
echo "TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-<setup.py default>} MNIST_FAST_CUDA=$MNIST_FAST_CUDA MAX_JOBS=$MAX_JOBS"
echo "ninja: ${NINJA:-not found (the build falls back to one file at a time)}"
echo "compute-sanitizer: ${SANITIZER:-not found (memcheck step skipped)}"

BUILD_CMD=("$PYTHON" setup.py --quiet build_ext --inplace)
if [[ $ALL_TESTS == 1 ]]; then TEST_CMD=("$PYTHON" -m pytest -q -ra tests); else TEST_CMD=("$PYTHON" -m pytest -q -ra tests/test_cuda.py); fi
# No caching allocator under memcheck: an overrun past a tensor then reaches unowned memory.
SAN_CMD=(env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 9 --print-limit 20
         "$PYTHON" scripts/gpu_bench.py workload)
BENCH_CMD=("$PYTHON" scripts/gpu_bench.py bench --batches "$BATCHES")
PARITY_CMD=("$PYTHON" scripts/gpu_bench.py parity)  # the tests' stand-in where pytest is missing

if [[ $DRY_RUN == 1 ]]; then
  note "dry run: the commands a GPU run would execute"
  echo "build:     ${BUILD_CMD[*]}"
  echo "tests:     ${TEST_CMD[*]}  (without pytest: ${PARITY_CMD[*]})"
  if [[ -n $SANITIZER ]]; then echo "sanitizer: ${SAN_CMD[*]}"; else echo "sanitizer: skipped (no compute-sanitizer)"; fi
  echo "bench:     ${BENCH_CMD[*]}"
  note "dry run: build configuration"
  # Loads setup.py's extension definition without compiling anything.
  record_step "build config" 120 "$PYTHON" - <<'EOF'
import os, sys, setuptools
sys.argv = ["setup.py", "--name"]
captured = {}
setuptools.setup = lambda **kw: captured.update(kw)
exec(compile(open("setup.py").read(), "setup.py", "exec"),
     {"__name__": "__main__", "__file__": os.path.abspath("setup.py")})
ext = captured["ext_modules"][0]
cu = [s for s in ext.sources if s.endswith(".cu")]
print(f"extension {ext.name}: {len(ext.sources)} sources, {len(cu)} CUDA: {', '.join(cu)}")
print(f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}")
assert cu, "the CUDA sources are not part of the build"
EOF
  note "dry run: timing harness on the CPU"
  record_step "bench harness (cpu)" 120 "$PYTHON" scripts/gpu_bench.py bench --device cpu --batches 64 --samples 2 --calls 1
  record_step "sanitizer workload (cpu)" 120 "$PYTHON" scripts/gpu_bench.py workload --device cpu
  record_step "parity harness (cpu)" 120 "$PYTHON" scripts/gpu_bench.py parity --device cpu
else
  if [[ $SKIP_BUILD == 0 ]]; then
    note "build"
    record_step build 240 "${BUILD_CMD[@]}" || { echo "gpu_check: build failed" >&2; }
  fi
  "$PYTHON" -c "import mnist_fast, sys; sys.exit(0 if mnist_fast.cuda_compiled() else 1)" 2>/dev/null \
    || { echo "gpu_check: mnist_fast does not import with its CUDA kernels; stopping" >&2; record import FAILED 0; SKIP_TESTS=1 SKIP_SANITIZER=1 SKIP_BENCH=1; }
  if [[ $SKIP_TESTS == 0 ]]; then
    note "tests"
    if "$PYTHON" -c "import pytest" 2>/dev/null; then
      record_step tests 150 "${TEST_CMD[@]}"
    else
      echo "pytest is not installed: running the short parity check instead"
      record_step "parity (no pytest)" 150 "${PARITY_CMD[@]}"
    fi
  fi
  if [[ $SKIP_SANITIZER == 0 ]]; then
    note "compute-sanitizer memcheck"
    if [[ -n $SANITIZER ]]; then
      record_step "memcheck" 150 "${SAN_CMD[@]}"
    else
      record memcheck "skipped (no compute-sanitizer)" 0
    fi
  fi
  if [[ $SKIP_BENCH == 0 ]]; then
    note "timings"
    BENCH_OUT=$(mktemp)
    record_step bench 120 "${BENCH_CMD[@]}" >"$BENCH_OUT" 2>&1
    cat "$BENCH_OUT"
  fi
fi

# ---- summary, printed last ----
FAILED=0
echo
echo "== summary ($((SECONDS - START))s in all)"
printf '%-26s %-28s %6s\n' step status seconds
for row in "${SUMMARY[@]}"; do
  IFS='|' read -r name status secs <<<"$row"
  printf '%-26s %-28s %6s\n' "$name" "$status" "$secs"
  [[ $status == ok || $status == "skipped (no compute-sanitizer)" ]] || FAILED=1
done
if [[ -n ${BENCH_OUT:-} && -s $BENCH_OUT ]]; then
  # The timing table: from its title line to the end of the bench output.
  sed -n '/^fused vs stock/,$p' "$BENCH_OUT"
  rm -f "$BENCH_OUT"
fi
exit $FAILED
