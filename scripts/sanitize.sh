#!/usr/bin/env bash
# `make sanitize`: build the extension with AddressSanitizer + UBSan (-O0, no optimizer tricks
# that hide bugs) in a copy of the sources under build-sanitize/, then run the kernel tests under
# it. Any out-of-bounds access, use-after-free or undefined behaviour aborts the run.
# Usage: scripts/sanitize.sh [pytest args...]   (default: the kernel test files)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
py=${PY:-$root/.venv/bin/python}
work=$root/build-sanitize/src

# A copy of the tracked (and new, not ignored) files, so the normal in-place build is untouched.
mkdir -p "$work"
(cd "$root" && git ls-files -z --cached --others --exclude-standard | xargs -0 tar -cf - 2>/dev/null) | tar -xf - -C "$work"

cd "$work"
MNIST_FAST_CUDA=0 MNIST_FAST_SANITIZE=1 MAX_JOBS=${MAX_JOBS:-2} "$py" setup.py --quiet build_ext --inplace >/dev/null
# Refuse to report "clean" from a build that is not instrumented.
if ! ldd mnist_fast/_C*.so | grep -q libasan; then
  echo "sanitize: mnist_fast/_C is not linked with AddressSanitizer" >&2
  exit 1
fi

if [ $# -eq 0 ]; then
  # torch.compile tests are left out: they spend minutes in the compiler, not in our kernels.
  set -- tests/test_linear_relu.py tests/test_cross_entropy.py tests/test_properties.py tests/test_nn.py \
    tests/test_bad_inputs.py tests/test_trainer.py -k "not torch_compile"
fi
# The interpreter is not instrumented: preload the runtimes; CPython's own allocations are not leaks.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:abort_on_error=1:detect_odr_violation=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
exec "$py" -m pytest -q -p no:cacheprovider "$@"
