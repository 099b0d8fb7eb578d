"""The CUDA sources compile: every .cu with nvcc for sm_80 and sm_90, the registration .cpp with the
host compiler against torch's and CUDA's headers. Skipped where nvcc / the CUDA headers are missing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
NVCC = shutil.which("nvcc") or (f"{CUDA_HOME}/bin/nvcc" if os.path.exists(f"{CUDA_HOME}/bin/nvcc") else None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("source", sorted(p.name for p in (CSRC / "cuda").glob("*.cu")))
def test_cu_compiles(source, arch, tmp_path):
    cmd = [NVCC, "-std=c++17", "-O3", "-Werror", "all-warnings", f"-gencode=arch=compute_{arch},code=sm_{arch}",
           "-c", str(CSRC / "cuda" / source), "-o", str(tmp_path / "k.o")]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "k.o").stat().st_size > 1000


@pytest.mark.skipif(not os.path.exists(f"{CUDA_HOME}/include/cuda_runtime_api.h"), reason="CUDA headers not found")
def test_cuda_registration_compiles():
    inc = Path(torch.__file__).parent / "include"
    cmd = [shutil.which("c++") or "c++", "-std=c++20", "-fsyntax-only", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
           f"-I{inc}", f"-I{inc / 'torch/csrc/api/include'}", f"-I{CUDA_HOME}/include",
           f"-I{sysconfig.get_paths()['include']}", str(CSRC / "cuda" / "ops_cuda.cpp")]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
