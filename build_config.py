"""The one build description of mnist_fast: sources, compile flags, the CUDA toolkit and the CUDA
architectures. setup.py builds from it, scripts/cmake_build.py hands it to CMake, and the shell
tools (Makefile, scripts/gpu_check.sh, .ci/run) ask it on the command line:

    python build_config.py cuda-home      # the CUDA toolkit folder, or nothing
    python build_config.py arch-list      # TORCH_CUDA_ARCH_LIST to compile for
    python build_config.py sources        # the operator library's sources (what CMake builds)

Only the standard library at import time; torch is consulted when it is installed.
Switches (environment): MNIST_FAST_CUDA=0/1, MNIST_FAST_DEBUG=1 (-O0 -g), MNIST_FAST_SANITIZE=1
(ASan + UBSan), MNIST_FAST_MARCH=<arch> (-march; unset by default: the build runs on any CPU of its
architecture, the CPU kernels being compiled for each capability and chosen at run time).
"""
import glob
import os
import pathlib
import shutil
import sys

ROOT = pathlib.Path(__file__).parent.resolve()
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100, H100/H200: what to compile for when no GPU is visible
PYTHON_ONLY_SOURCES = ("csrc/python_bindings.cpp",)  # the pybind11 module; not in the C++ library


def env_flag(name):
    """None when unset, else whether the variable says yes."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def _glob(*patterns):
    return sorted(p for pattern in patterns for p in glob.glob(pattern, root_dir=ROOT))


def cpp_sources():
    """Schemas, autograd, bindings and CPU kernels, relative to the repository root."""
    # The per-capability kernels last, DEFAULT first: where their objects share an inline function
    # with another, the linker keeps the first copy, which must be one that any CPU can run.
    capabilities = [f"csrc/cpu/kernels/capability_{c}.cpp" for c in ("default", "avx2", "avx512")]
    return _glob("csrc/*.cpp", "csrc/cpu/*.cpp") + ["csrc/cpu/kernels/dispatch.cpp"] + capabilities


def library_sources():
    """The operators without the Python module: what the CMake library (and its C++ test) links."""
    return [s for s in cpp_sources() if s not in PYTHON_ONLY_SOURCES]


def cuda_sources():
    return _glob("csrc/cuda/*.cu")


def _torch_cuda_home():
    try:
        from torch.utils import cpp_extension
    except ImportError:
        return None
    return cpp_extension.CUDA_HOME


def find_cuda_home():
    """The CUDA toolkit: CUDA_HOME/CUDA_PATH, /usr/local/cuda, the toolkit of the nvcc on PATH
    (symlinks resolved), else what torch found. Only a folder that holds the toolkit counts (torch
    takes /usr/local for a /usr/local/bin/nvcc wrapper script, and then cannot find libcudart)."""
    nvcc = shutil.which("nvcc")
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None]
    for home in candidates + [_torch_cuda_home()]:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def cuda_arch_list():
    """TORCH_CUDA_ARCH_LIST when set; else the visible GPUs' architectures; else the default list
    (torch's own detection fails when no GPU is visible)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return os.environ["TORCH_CUDA_ARCH_LIST"]
    try:
        import torch
        if torch.cuda.is_available():
            caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
            return ";".join(f"{major}.{minor}" for major, minor in sorted(caps))
    except ImportError:
        pass
    return DEFAULT_CUDA_ARCHS


def openmp_flags():
    """-fopenmp where torch runs its intra-op threads on OpenMP (its Linux builds).

    ATen's at::parallel_for is a header template: compiled without -fopenmp it runs every task on
    the calling thread, so the kernels would ignore torch.set_num_threads. The flag links libgomp,
    which is the one torch loaded (same soname), so the ops share torch's thread pool.
    """
    if sys.platform != "linux":
        return []
    try:
        import torch
    except ImportError:
        return []
    return ["-fopenmp"] if torch.backends.openmp.is_available() else []


def kernel_flags():
    """Compiler flags of the C++ kernels in every build of them (setup.py, CMake)."""
    sanitize = env_flag("MNIST_FAST_SANITIZE") or False
    # -fno-trapping-math lets the compiler if-convert and vectorize the kernels' float selects (the
    # softmax exp in particular); results and NaN/inf semantics are unchanged (unlike -ffast-math).
    flags = ["-fno-trapping-math"] + openmp_flags()
    # No -march by default: the build runs on any CPU of its architecture; the vector kernels get
    # their ISA per capability (csrc/cpu/kernels/capability_*.cpp) and are chosen at run time.
    # -Wno-psabi: g++'s note that passing vector types changed ABI in GCC 4.x, irrelevant here.
    flags.append("-Wno-psabi")
    march = os.environ.get("MNIST_FAST_MARCH", "")
    if march and not sanitize:
        flags.append(f"-march={march}")
    if sanitize:
        flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
    return flags


def extension_cxx_flags():
    """The Python extension's C++ flags: only its module init is exported."""
    return optimization_flags() + ["-fvisibility=hidden"] + kernel_flags()


def optimization_flags():
    debug = env_flag("MNIST_FAST_DEBUG") or env_flag("MNIST_FAST_SANITIZE") or False
    return ["-O0", "-g"] if debug else ["-O3"]


def link_flags():
    if env_flag("MNIST_FAST_SANITIZE"):
        flags = ["-fsanitize=address,undefined"]
    elif env_flag("MNIST_FAST_DEBUG"):
        flags = []
    else:
        flags = ["-Wl,--strip-debug"]  # release: the wheel ships code, not 24 MB of DWARF
    return flags + openmp_flags()


def nvcc_flags():
    return optimization_flags() + ["-DMNIST_FAST_WITH_CUDA", "--expt-relaxed-constexpr"]


def _main(argv):
    answers = {"cuda-home": lambda: find_cuda_home() or "", "arch-list": cuda_arch_list,
               "sources": lambda: ";".join(library_sources())}
    if len(argv) != 1 or argv[0] not in answers:
        raise SystemExit(f"usage: python build_config.py {'|'.join(answers)}")
    print(answers[argv[0]]())


if __name__ == "__main__":
    _main(sys.argv[1:])
