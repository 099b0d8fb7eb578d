"""Builds roli._C where it can, pure Python where it can't.

- CPU sources (csrc/*.cpp) wherever torch and a C++ compiler are present at build time
  (pip install --no-build-isolation -e .).
- CUDA sources (csrc/cuda/) only where torch has CUDA and a CUDA toolkit of the same major release is found
  (CUDA_HOME/CUDA_PATH, else torch's guess, nvcc on PATH, /usr/local/cuda*; see roli/_env.py cuda_toolkit;
  otherwise the CPU sources alone, with the reason printed): ROLI_BUILD_CUDA=auto|0|1,
  TORCH_CUDA_ARCH_LIST (default "8.0;9.0+PTX": SASS for A100 and H100/H200, PTX that newer GPUs compile
  when loading; older GPUs such as V100/T4 need their own entry, e.g. "7.0;7.5;8.0;9.0+PTX"), MAX_JOBS
  honoured by torch's ninja build.
- No torch at build time (an isolated pip install -e .) or ROLI_NO_EXT=1: pure Python; roli then
  builds the extension just in time on first use (roli/_ext.py) and falls back to torch if that fails.
"""

import importlib.util
import os

from setuptools import find_packages, setup


def _load_env():
    """roli/_env.py by path (it imports nothing of roli): ROLI_BUILD_CUDA and the CUDA toolkit's location."""
    spec = importlib.util.spec_from_file_location(
        "_roli_env", os.path.join(os.path.dirname(__file__), "roli", "_env.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Every subpackage of roli/ is found (a new one can never be left out of the wheel); the C/C++/CUDA
# sources ship inside the package as roli._csrc for the just-in-time build.
PACKAGES = find_packages(include=["roli", "roli.*"]) + ["roli._csrc"]
PACKAGE_DIR = {"roli._csrc": "csrc"}
CPU_SOURCES = ["csrc/ops.cpp", "csrc/pgd_cpu.cpp"]
CUDA_SOURCES = ["csrc/cuda/pgd_kernels.cu", "csrc/cuda/ops_cuda.cpp"]
CXX_FLAGS = ["-O3", "-g0", "-fopenmp", "-fopenmp-simd", "-std=c++20"]  # same as roli/_ext.py cpu_cflags()


def extensions():
    if os.environ.get("ROLI_NO_EXT") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("roli setup: torch not importable at build time; roli._C will be built just in time on first use")
        return [], {}
    env = _load_env()
    try:
        build_cuda = env.build_cuda()
    except ValueError as e:
        raise SystemExit(str(e)) from None
    root, why = (
        env.cuda_toolkit(cpp_extension.CUDA_HOME, torch.version.cuda)
        if torch.version.cuda
        else (None, "torch has no CUDA")
    )
    if build_cuda == "1" and root is None:
        raise SystemExit(f"ROLI_BUILD_CUDA=1 but the CUDA sources cannot be built: {why}")
    if root is not None and build_cuda != "0":
        if root != cpp_extension.CUDA_HOME:  # torch's guess from nvcc on PATH can lack the headers
            print(f"roli setup: compiling the CUDA sources with the toolkit in {root}")
            os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = root
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        ext = CUDAExtension(
            "roli._C",
            CPU_SOURCES + CUDA_SOURCES,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": ["-O3", "-std=c++20"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        if torch.version.cuda and build_cuda == "auto":
            print(f"roli setup: building the CPU kernels only: {why}")
        ext = CppExtension("roli._C", CPU_SOURCES, extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = extensions()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    # the paper's settings (roli/configs/<dataset>/<name>.yaml): --config cifar10/roli_full from any directory
    package_data={"roli._csrc": ["*.cpp", "*.h", "cuda/*.cu", "cuda/*.cpp", "cuda/*.h"], "roli": ["configs/*/*.yaml"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
