"""Every environment switch roli reads, in one place (ground floor: imports nothing of roli).

| variable | effect |
|---|---|
| ROLI_IMPL | default backend of the fused ops: auto, torch, cpp, cuda, triton |
| ROLI_NO_EXT=1 | never load or build the C++/CUDA extension roli._C |
| ROLI_NO_JIT=1 | do not build roli._C just in time when no ahead-of-time build is installed |
| ROLI_EXT_DIR | where the just-in-time build goes (default ~/.cache/roli/ext) |
| ROLI_BUILD_CUDA | auto, 0 or 1: whether the extension build compiles the CUDA sources |
| CUDA_HOME, CUDA_PATH | the CUDA toolkit that compiles them (else found from nvcc and /usr/local/cuda*) |
| ROLI_VERBOSE_BUILD=1 | show the compiler's output of the just-in-time build |
| ROLI_CACHE_DIR | root of roli's caches: features, the demo's source backbone (default ~/.cache/roli) |
| ROLI_PROGRESS_SECONDS | off a terminal, a progress line inside each epoch at most this often (default 30) |
| TRITON_INTERPRET=1 | Triton's own switch: kernels run on CPU tensors through its interpreter |
| WORLD_SIZE, LOCAL_RANK | set by torchrun: the number of processes and this process's GPU |
| HF_HUB_OFFLINE | the Hugging Face hub's own switch: timm's weights from the local cache only, no network tried |
| WANDB_MODE, WANDB_PROJECT | Weights & Biases' own (`--log wandb`): online/offline/disabled; the project (roli) |
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path


def _get(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def impl() -> str:
    return _get("ROLI_IMPL", "auto")


def no_ext() -> bool:
    return _get("ROLI_NO_EXT") == "1"


def no_jit() -> bool:
    return _get("ROLI_NO_JIT") == "1"


def verbose_build() -> bool:
    return _get("ROLI_VERBOSE_BUILD") == "1"


def build_cuda() -> str:
    """auto | 0 | 1 (validated here: a bad value is the user's to fix)."""
    setting = _get("ROLI_BUILD_CUDA", "auto").lower()
    if setting not in ("auto", "0", "1"):
        raise ValueError(f"ROLI_BUILD_CUDA={setting!r} must be auto, 0 or 1")
    return setting


def _is_toolkit(root: str | None) -> bool:
    return bool(root) and all(
        os.path.isfile(os.path.join(root, *p)) for p in (("bin", "nvcc"), ("include", "cuda_runtime.h"))
    )


@functools.lru_cache(maxsize=16)
def toolkit_release(root: str) -> str | None:
    """The toolkit's CUDA release ("13.0") from its nvcc, or None if nvcc does not say."""
    try:
        out = subprocess.run(
            [os.path.join(root, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+\.\d+)", out.stdout)
    return found[1] if found else None


def cuda_toolkit(torch_guess: str | None = None, torch_cuda: str | None = None) -> tuple[str | None, str]:
    """The CUDA toolkit root to compile roli's CUDA sources with, or None and why not. A toolkit holds bin/nvcc
    and include/cuda_runtime.h and, given torch_cuda (torch.version.cuda), is of the same major release (torch
    refuses to build against another). CUDA_HOME/CUDA_PATH win when set; else the first of torch's guess, the
    toolkit an nvcc on PATH belongs to, /usr/local/cuda and /usr/local/cuda-X.Y (newest first). torch's guess
    alone can be wrong: with a wrapper script at /usr/local/bin/nvcc it is /usr/local, which has no headers."""

    def mismatch(root: str) -> str:
        release = toolkit_release(root)
        if torch_cuda is None or release is None or release.split(".")[0] == torch_cuda.split(".")[0]:
            return ""
        return f"the CUDA toolkit in {root} is {release} but torch was built with CUDA {torch_cuda}"

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if root := _get(var):
            if not _is_toolkit(root):
                return None, f"{var}={root} holds no CUDA toolkit (bin/nvcc and include/cuda_runtime.h)"
            why = mismatch(root)
            return (None, f"{why} ({var}); the major releases must match") if why else (root, "")
    candidates = [torch_guess]
    if nvcc := shutil.which("nvcc"):
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    versioned = [str(p) for p in Path("/usr/local").glob("cuda-*")]
    versioned.sort(key=lambda p: [int(n) for n in re.findall(r"\d+", os.path.basename(p))], reverse=True)
    mismatches = []
    for root in dict.fromkeys(r for r in [*candidates, "/usr/local/cuda", *versioned] if _is_toolkit(r)):
        if not (why := mismatch(root)):
            return root, ""
        mismatches.append(why)
    if mismatches:
        return (
            None,
            f"{mismatches[0]}: install CUDA {torch_cuda.split('.')[0]}.x and set CUDA_HOME, or a torch built for it",
        )
    return None, "no CUDA toolkit found (bin/nvcc with include/cuda_runtime.h); set CUDA_HOME"


def cache_root() -> Path:
    base = _get("ROLI_CACHE_DIR")
    return Path(base) if base else Path.home() / ".cache" / "roli"


def ext_dir() -> Path:
    base = _get("ROLI_EXT_DIR")
    return Path(base) if base else Path.home() / ".cache" / "roli" / "ext"


def triton_interpret() -> bool:
    return _get("TRITON_INTERPRET", "0") == "1"


def progress_seconds() -> float:
    """ROLI_PROGRESS_SECONDS: how often a run off a terminal logs its progress inside an epoch (default 30)."""
    try:
        return max(0.0, float(_get("ROLI_PROGRESS_SECONDS", "30")))
    except ValueError:
        return 30.0


def world_size() -> int:
    return int(_get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(_get("LOCAL_RANK", "0"))


def hub_offline() -> bool:
    return _get("HF_HUB_OFFLINE").strip().lower() in ("1", "true", "yes", "on")


def wandb_mode() -> str | None:
    return _get("WANDB_MODE") or None


def wandb_project() -> str:
    return _get("WANDB_PROJECT", "roli")


def reachable(host: str, port: int = 443, timeout: float = 5.0) -> bool:
    """Whether a TCP connection to host:port opens within `timeout` seconds: one attempt, so an offline machine
    learns it in seconds (the hub's and wandb's clients retry for a minute)."""
    import socket

    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError:
        return False
    return True
