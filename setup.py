"""Builds mnist_fast and its compiled extension mnist_fast._C.

Sources, flags, the CUDA toolkit and architectures come from build_config.py (shared with CMake
and the scripts). CUDA kernels (csrc/cuda/*.cu) are compiled when MNIST_FAST_CUDA=1, or by default
when torch is a CUDA build and the toolkit is found; MNIST_FAST_CUDA=0 forces a CPU-only build. No
GPU is needed to compile. Other switches: see build_config.py.

Install with `pip install --no-build-isolation .` so the extension is built against the torch
that is installed (an isolated build would fetch another torch and break the ABI).
"""
import os
import pathlib
import sys

from setuptools import find_packages, setup
import torch
from torch.utils import cpp_extension

sys.path.insert(0, str(pathlib.Path(__file__).parent.resolve()))  # PEP 517 backends leave it off sys.path
import build_config as config  # noqa: E402


def want_cuda():
    forced = config.env_flag("MNIST_FAST_CUDA")
    cuda_home = config.find_cuda_home()
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
    sources = config.cpp_sources()
    cxx = config.extension_cxx_flags()
    kwargs = dict(extra_compile_args={"cxx": cxx}, extra_link_args=config.link_flags())
    if not want_cuda():
        return cpp_extension.CppExtension("mnist_fast._C", sources, **kwargs)
    os.environ["TORCH_CUDA_ARCH_LIST"] = config.cuda_arch_list()
    includes, libs = cuda_library_dirs()
    sources += config.cuda_sources()
    cxx += ["-DMNIST_FAST_WITH_CUDA"]
    kwargs["extra_compile_args"]["nvcc"] = config.nvcc_flags()
    return cpp_extension.CUDAExtension(
        "mnist_fast._C", sources, include_dirs=includes, library_dirs=libs, **kwargs
    )


def torch_requirement():
    """The extension links against this torch's C++ ABI, which changes between minor releases: a wheel
    built here works with this torch release only (its patch releases included)."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"torch=={major}.{minor}.*"


setup(
    install_requires=[torch_requirement(), "numpy", "tqdm"],
    packages=find_packages(include=["mnist_fast", "mnist_fast.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
