# The two commands of the README:
#   make train   set up .venv, build the extension, train MNIST (ARGS="..." passes options)
#   make test    set up .venv, build the extension (CUDA sources too where nvcc is found), run
#                pytest and the C++ tests (ctest)
# Other targets: build, ctest, bench, bench-report, sanitize, clean.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
JOBS ?= 2
ARGS ?=
# The CUDA toolkit as setup.py finds it (build_config.py); the build compiles csrc/cuda/*.cu when
# there is one (MNIST_FAST_CUDA=0 to skip).
export CUDA_HOME ?= $(shell $(PYTHON) build_config.py cuda-home)
export MAX_JOBS ?= $(JOBS)

.PHONY: setup build test pytest ctest train bench bench-report sanitize clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
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

# --dataset auto: MNIST where it can be found or downloaded, else (saying so) Fashion-MNIST.
train: build
	$(PY) -m mnist_fast.train --dataset auto $(ARGS)

# ASan + UBSan build of the extension (in build-sanitize/) and the kernel tests under it.
sanitize: setup
	scripts/sanitize.sh

bench: build
	$(PY) -m pytest benchmarks --benchmark-only

# The fused-vs-stock report: markdown table, JSON and PNG (interleaved runs, medians).
bench-report: build
	$(PY) -m benchmarks.report --threads 1 --clock thread --out-json bench.json --out-png bench.png $(ARGS)

clean:
	rm -rf build build-cmake build-sanitize mnist_fast/_C*.so *.egg-info
