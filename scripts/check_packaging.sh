#!/usr/bin/env bash
# Builds the sdist, and the wheel from that sdist (as `python -m build` does), checks what they hold,
# then installs each into a fresh virtual environment and runs the smoke test and a few test files
# against the installed copy there. CPU-only build unless MNIST_FAST_CUDA=1 (CI: CPU-only, for time).
#   scripts/check_packaging.sh            (uses .venv/bin/python to build; PY=... to override)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-$ROOT/.venv/bin/python}
BASE_PY=${BASE_PY:-python3}          # the interpreter the fresh environment is made from
WORK=${WORK:-$ROOT/build/packaging}
export MNIST_FAST_CUDA=${MNIST_FAST_CUDA:-0}
TORCH_REQ=$("$PY" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])')

rm -rf "$WORK" && mkdir -p "$WORK/dist"
echo "== build: sdist, then the wheel from the sdist (log: $WORK/build.log)"
"$PY" -m build --no-isolation --outdir "$WORK/dist" . > "$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log"; exit 1; }
SDIST=$(ls "$WORK"/dist/*.tar.gz)
# The manylinux tag: auditwheel checks the wheel's symbol versions and retags it; torch's own libraries
# are the user's torch (the pin), never vendored. libgomp neither: the extension must share torch's
# OpenMP runtime (the libgomp.so.1 torch loads), not bring a second one with its own thread pool.
echo "== auditwheel repair (manylinux tag; torch's libraries excluded)"
PATH="$(dirname "$PY"):$PATH" "$(dirname "$PY")/auditwheel" repair -w "$WORK/wheelhouse" \
  --exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libcudart.so*' --exclude 'libcublas*.so*' \
  --exclude 'libgomp.so*' "$WORK"/dist/*.whl > "$WORK/auditwheel.log" 2>&1 || { tail -n 20 "$WORK/auditwheel.log"; exit 1; }
WHEEL=$(ls "$WORK"/wheelhouse/*.whl)
case "$WHEEL" in *manylinux*) ;; *) echo "auditwheel gave no manylinux tag: $WHEEL"; exit 1 ;; esac

echo "== contents"
"$PY" - "$SDIST" "$WHEEL" <<'PYEOF'
import sys, tarfile, zipfile
sdist, wheel = sys.argv[1:]
names = [n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n]
missing = [n for n in ("csrc/ops.h", "csrc/checks.h", "csrc/row_math.h", "LICENSE", "mnist_fast/py.typed") if n not in names]
assert not missing, f"the sdist lacks {missing}"
z = zipfile.ZipFile(wheel)
so = [i for i in z.infolist() if i.filename.endswith(".so")]
assert so, "the wheel holds no compiled extension"
assert any(n.endswith("py.typed") for n in z.namelist()), "the wheel lacks py.typed"
assert any(n.endswith(".dist-info/licenses/LICENSE") for n in z.namelist()), "the wheel lacks LICENSE"
size = sum(i.file_size for i in so)
assert size < 8 << 20, f"the extension is {size / 2**20:.1f} MiB: is it stripped?"
vendored = [n for n in z.namelist() if "libgomp" in n]
assert not vendored, f"the wheel vendors {vendored}: the extension must use torch's OpenMP runtime"
print(f"sdist: {len(names)} files; wheel: {z.filename.rsplit('/', 1)[-1]}, extension {size / 2**20:.1f} MiB")
PYEOF

echo "== fresh environment ($BASE_PY), $TORCH_REQ from the registry"
"$BASE_PY" -m venv "$WORK/venv"
V="$WORK/venv/bin/python"
"$V" -m pip install --quiet --upgrade pip
"$V" -m pip install --quiet "$TORCH_REQ" numpy tqdm pytest hypothesis expecttest setuptools wheel ninja pybind11
smoke() {  # from outside the checkout, so only the installed copy can be imported
  (cd "$WORK" && "$V" "$ROOT/scripts/smoke_installed.py")
  (cd "$WORK" && "$V" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" "$ROOT/tests/test_linear_relu.py" "$ROOT/tests/test_cross_entropy.py")
}
echo "== install the wheel"
"$V" -m pip install --quiet "$WHEEL"
smoke
"$V" -m pip uninstall --quiet -y mnist_fast
echo "== install the sdist (builds from source in the fresh environment)"
"$V" -m pip install --quiet --no-build-isolation "$SDIST" > "$WORK/sdist-install.log" 2>&1 || { tail -n 40 "$WORK/sdist-install.log"; exit 1; }
smoke
echo "packaging check passed"
