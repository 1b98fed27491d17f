"""Configure, build and (with --test) run the CMake build against the pip-installed torch.

The sources and the shared compile flags come from build_config.py (setup.py's description).
torch's CMake config from a CUDA wheel looks for the CUDA toolkit even for CPU-only code, so this
passes what it needs: the toolkit root, the wheel's libnvrtc, and torch's cmake prefix path.
"""
import argparse
import glob
import os
import pathlib
import shutil
import subprocess
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import build_config as config  # noqa: E402


def cmake_args():
    flags = config.kernel_flags()  # CMAKE_BUILD_TYPE picks the optimization level
    args = [f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DMNIST_FAST_SOURCES={';'.join(config.library_sources())}",
            f"-DMNIST_FAST_CXX_FLAGS={';'.join(flags)}"]
    cuda_home = config.find_cuda_home()
    if torch.version.cuda is None or cuda_home is None:
        return args
    args += [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}", f"-DCMAKE_CUDA_COMPILER={cuda_home}/bin/nvcc"]
    try:
        import nvidia
        nvrtc = sorted(p for base in nvidia.__path__ for p in glob.glob(f"{base}/*/lib/libnvrtc.so.*")
                       if "builtins" not in p and ".alt." not in p)
    except ImportError:
        nvrtc = []
    if nvrtc:
        args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc[0]}")
    # Without a visible GPU torch's config would try (and fail) to detect its architecture.
    os.environ["TORCH_CUDA_ARCH_LIST"] = config.cuda_arch_list()
    return args


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--build-dir", default="build-cmake")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--test", action="store_true", help="run ctest after building")
    opts = parser.parse_args()
    root = pathlib.Path(__file__).resolve().parent.parent
    build = root / opts.build_dir
    ninja = shutil.which("ninja", path=f"{pathlib.Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
    subprocess.run(["cmake", "-S", str(root), "-B", str(build), *generator, *cmake_args()], check=True)
    subprocess.run(["cmake", "--build", str(build), "--parallel", str(opts.jobs)], check=True)
    if opts.test:
        subprocess.run(["ctest", "--test-dir", str(build), "--output-on-failure"], check=True)


if __name__ == "__main__":
    main()
