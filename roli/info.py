"""`python -m roli.info`: versions, and for each backend "available" or the reason it is not."""

from __future__ import annotations

import platform
import shutil
import subprocess

import torch

from roli import __version__, _ext
from roli._cli import OneLineParser, prog
from roli.ops import triton_error


def _first_line(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        lines = [ln for ln in (out.stdout or out.stderr).splitlines() if ln.strip()]
        return lines[-1] if cmd[-1] == "--version" and "nvcc" in cmd[0] else (lines[0] if lines else "?")
    except (OSError, subprocess.SubprocessError):
        return "not found"


def versions() -> dict[str, str]:
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = "not installed"
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = shutil.which("nvcc") or (f"{CUDA_HOME}/bin/nvcc" if CUDA_HOME else None)
    return {
        "roli": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "CUDA (torch)": torch.version.cuda or "none (CPU build)",
        "GPU": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "triton": triton_v,
        "c++": _first_line([shutil.which("c++") or "c++", "--version"]),
        "nvcc": _first_line([nvcc, "--version"]) if nvcc else "not found",
        "cpu capability (torch)": torch.backends.cpu.get_cpu_capability(),
    }


def backends() -> dict[str, str]:
    """Backend name -> "available ..." or "unavailable: <reason>"."""
    has_ext = _ext.load()
    out = {"torch": "available (reference, CPU and GPU)"}
    out["cpp"] = f"available (roli._C, {_ext.EXT_MODE} build)" if has_ext else f"unavailable: {_ext.EXT_ERROR}"
    if not has_ext:
        out["cuda"] = f"unavailable: {_ext.EXT_ERROR}"
    elif not _ext.has_cuda_kernels():
        out["cuda"] = "unavailable: roli._C was built without CUDA kernels " + (
            f"({_ext.CUDA_BUILD_ERROR})" if _ext.CUDA_BUILD_ERROR else "(needs a CUDA torch and nvcc at build time)"
        )
    elif not torch.cuda.is_available():
        out["cuda"] = "unavailable: no CUDA device"
    elif err := _ext.cuda_image_error(torch.device("cuda", 0)):
        out["cuda"] = f"unavailable: {err}"
    else:
        major, minor = torch.cuda.get_device_capability(0)
        out["cuda"] = f"available (kernels run on this GPU, sm_{major}{minor})"
    err = triton_error()
    if err:
        out["triton"] = f"unavailable: {err}"
    elif torch.cuda.is_available():
        out["triton"] = "available"
    else:
        out["triton"] = "unavailable: no CUDA device (CPU tensors run under TRITON_INTERPRET=1 only)"
    return out


def main(argv: list[str] | None = None) -> int:
    OneLineParser(prog=prog("info"), description=__doc__.strip()).parse_args(argv)
    print("roli info")
    for k, v in versions().items():
        print(f"  {k:24s} {v}")
    print("backends")
    for k, v in backends().items():
        print(f"  {k:24s} {v}")
    return 0


if __name__ == "__main__":
    from roli._cli import exit_with

    exit_with(main)
