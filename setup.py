"""Builds mnist_fast and its compiled extension mnist_fast._C.

CUDA kernels (csrc/cuda/*.cu) are compiled when MNIST_FAST_CUDA=1, or by default when torch is a
CUDA build and nvcc is found; MNIST_FAST_CUDA=0 forces a CPU-only build. No GPU is needed to
compile: TORCH_CUDA_ARCH_LIST defaults to the architectures below when none is visible.
Other switches: MNIST_FAST_DEBUG=1 (-O0 -g), MNIST_FAST_SANITIZE=1 (ASan + UBSan),
MNIST_FAST_MARCH=<arch> (-march; unset by default: the build runs on any CPU of its architecture,
the CPU kernels being compiled for each capability and chosen at run time, see csrc/cpu/kernels/).

Install with `pip install --no-build-isolation .` so the extension is built against the torch
that is installed (an isolated build would fetch another torch and break the ABI).
"""
import glob
import os
import pathlib

from setuptools import find_packages, setup
import torch
from torch.utils import cpp_extension

ROOT = pathlib.Path(__file__).parent.resolve()
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # A100, H100/H200


def env_flag(name):
    """None when unset, else whether the variable says yes."""
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    if value not in ("0", "1"):
        raise SystemExit(f"{name} must be 0 or 1, got {value!r}")
    return value == "1"


def find_cuda_home():
    """The CUDA toolkit: CUDA_HOME/CUDA_PATH, else what torch found, else /usr/local/cuda; only a
    folder that holds the toolkit counts (torch takes /usr/local for a /usr/local/bin/nvcc wrapper
    script, and then cannot find libcudart)."""
    candidates = (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), cpp_extension.CUDA_HOME, "/usr/local/cuda")
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
            return home
    return None


def want_cuda():
    forced = env_flag("MNIST_FAST_CUDA")
    cuda_home = find_cuda_home()
    if cuda_home:  # torch's build helpers read this module global for nvcc and the library paths
        os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = cuda_home
    available = torch.version.cuda is not None and cuda_home is not None
    if forced and not available:
        raise SystemExit(
            "MNIST_FAST_CUDA=1 but CUDA cannot be compiled here: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}"
        )
    return available if forced is None else forced


def cuda_library_dirs():
    """Headers and libraries of the CUDA libraries shipped in torch's nvidia/* wheels (cuBLAS, ...)."""
    try:
        import nvidia
    except ImportError:
        return [], []
    includes, libs = [], []
    for base in nvidia.__path__:
        for sub in sorted(pathlib.Path(base).iterdir()):
            if (sub / "include").is_dir():
                includes.append(str(sub / "include"))
            if (sub / "lib").is_dir():
                libs.append(str(sub / "lib"))
    return includes, libs


def extension():
    # The per-capability kernels last, DEFAULT first: where their objects share an inline function
    # with another, the linker keeps the first copy, which must be one that any CPU can run.
    capabilities = [f"csrc/cpu/kernels/capability_{c}.cpp" for c in ("default", "avx2", "avx512")]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp")) + ["csrc/cpu/kernels/dispatch.cpp"]
    sources += capabilities
    debug = env_flag("MNIST_FAST_DEBUG") or False
    sanitize = env_flag("MNIST_FAST_SANITIZE") or False
    opt = ["-O0", "-g"] if (debug or sanitize) else ["-O3"]
    # -fno-trapping-math lets the compiler if-convert and vectorize the kernels' float selects (the
    # softmax exp in particular); results and NaN/inf semantics are unchanged (unlike -ffast-math).
    cxx = opt + ["-fvisibility=hidden", "-fno-trapping-math"]
    ldflags = []
    # No -march by default: the vector kernels get their ISA per capability (capability_*.cpp).
    march = os.environ.get("MNIST_FAST_MARCH", "")
    if march and not sanitize:
        cxx.append(f"-march={march}")
    if sanitize:
        cxx += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        ldflags += ["-fsanitize=address,undefined"]
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=ldflags)
    if not want_cuda():
        return cpp_extension.CppExtension("mnist_fast._C", sources, **kwargs)
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
    includes, libs = cuda_library_dirs()
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    kwargs["extra_compile_args"]["cxx"] += ["-DMNIST_FAST_WITH_CUDA"]
    kwargs["extra_compile_args"]["nvcc"] = opt + ["-DMNIST_FAST_WITH_CUDA", "--expt-relaxed-constexpr"]
    return cpp_extension.CUDAExtension(
        "mnist_fast._C", sources, include_dirs=includes, library_dirs=libs, **kwargs
    )


setup(
    packages=find_packages(include=["mnist_fast", "mnist_fast.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
