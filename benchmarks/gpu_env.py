"""What a GPU check runs on, in a few lines: the device and driver, torch/CUDA/Triton/nvcc versions, and the
tools the just-in-time build of roli._C needs (Python headers, a C++ compiler, ninja, a CUDA toolkit that
matches torch's CUDA). Exit status 1, with one line naming what is missing, when that build cannot run.

Usage: python benchmarks/gpu_env.py   (the `env` stage of benchmarks/gpu_check.sh; runs on any machine)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else ""


def report() -> tuple[list[str], list[str]]:
    """(lines to print, what the just-in-time CUDA build lacks)."""
    import torch

    from roli import _env

    lines, missing = [], []
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        cap = f"{major}.{minor}"
        lines.append(f"device: {torch.cuda.get_device_name(0)} (sm {cap}), {torch.cuda.device_count()} visible")
    else:
        lines.append("device: no CUDA device visible to torch")
    driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or "unknown (no nvidia-smi)"
    lines.append(f"driver: {driver}")
    lines.append(f"python: {sys.version.split()[0]} ({sys.executable})")
    lines.append(f"torch: {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    try:
        import triton

        lines.append(f"triton: {triton.__version__}")
    except ImportError:
        lines.append("triton: not installed (the triton backend is unavailable)")
    root, why = _env.cuda_toolkit(None, torch.version.cuda)
    if root:
        lines.append(f"nvcc: {_env.toolkit_release(root)} in {root}")
    else:
        lines.append(f"nvcc: no usable CUDA toolkit ({why})")
        missing.append("a CUDA toolkit matching torch's CUDA (nvcc and its headers)")
    header = os.path.join(sysconfig.get_paths()["include"], "Python.h")
    lines.append(f"Python headers: {header if os.path.exists(header) else 'missing (' + header + ')'}")
    if not os.path.exists(header):
        missing.append(f"the Python headers (Python.h for Python {sysconfig.get_python_version()}: python3-dev)")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    lines.append(f"c++: {(_run([cxx, '--version']) or cxx) if cxx else 'missing'}")
    if not cxx:
        missing.append("a C++ compiler (c++/g++)")
    ninja = shutil.which("ninja")
    lines.append(
        f"ninja: {_run([ninja, '--version']) if ninja else 'missing (the build falls back to slower setuptools)'}"
    )
    return lines, missing


def main() -> int:
    lines, missing = report()
    print("\n".join(lines))
    if missing:
        print(f"gpu_env: the just-in-time build of roli._C lacks: {'; '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
