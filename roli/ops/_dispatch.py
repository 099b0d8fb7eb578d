"""The one place where a backend is chosen for an op call.

impl = "auto" | "torch" | "cpp" | "cuda" | "triton"; the environment variable ROLI_IMPL sets the default.
Auto: CUDA tensors -> triton, else cuda, else torch; CPU tensors -> cpp, else torch. A forced backend
that cannot run raises RuntimeError with the reason; an automatic fallback warns once per reason.
"""

from __future__ import annotations

import warnings

import torch

from roli import _env, _ext

IMPLS = ("auto", "torch", "cpp", "cuda", "triton")
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_triton_error: str | None = None
_triton_checked = False
_warned: set[str] = set()


def triton_error() -> str | None:
    """Why the Triton kernels cannot be imported (None when they can)."""
    global _triton_error, _triton_checked
    if not _triton_checked:
        try:
            import roli.kernels  # noqa: F401
        except ImportError as e:  # triton missing, or roli.kernels not installed
            _triton_error = f"Triton kernels unavailable ({e}); pip install triton"
        _triton_checked = True
    return _triton_error


def triton_interpreter_error() -> str | None:
    """Why Triton's interpreter cannot run the kernels on CPU tensors (None when it can): before triton 3.2 it
    leaves CPU tensors unwritten (it copies results back only to GPU tensors)."""
    import triton

    try:
        version = tuple(int(p) for p in triton.__version__.split("+")[0].split(".")[:2])
    except ValueError:
        return None
    if version < (3, 2):
        return f"Triton {triton.__version__}'s interpreter does not write to CPU tensors (needs triton>=3.2)"
    return None


def requested_impl(impl: str | None) -> str:
    source = "impl"
    if impl is None:
        impl, source = _env.impl(), "ROLI_IMPL"
    if not isinstance(impl, str) or impl.lower() not in IMPLS:
        raise ValueError(f"{source}={impl!r} is not a backend; use one of {', '.join(IMPLS)}")
    return impl.lower()


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when `backend` can run on tensors of this device and dtype, else the reason it cannot."""
    if backend == "torch":
        return None
    if dtype not in KERNEL_DTYPES:
        return f"the {backend} kernels support float32, bfloat16 and float16, not {dtype}"
    if backend == "cpp":
        if device.type != "cpu":
            return f"the cpp kernels run on CPU tensors; these are on {device.type}"
        return None if _ext.load() else f"C++ extension unavailable: {_ext.EXT_ERROR}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the cuda kernels run on CUDA tensors; these are on {device.type}"
        if not _ext.load():
            return f"C++/CUDA extension unavailable: {_ext.EXT_ERROR}"
        if not _ext.has_cuda_kernels():
            return "roli._C was built without CUDA kernels (rebuild on a CUDA machine with ROLI_BUILD_CUDA=1)"
        return _ext.cuda_image_error(device)
    if backend == "triton":
        err = triton_error()
        if err:
            return err
        if device.type == "cuda":
            if _env.triton_interpret():  # the interpreter's helpers cannot compile for a GPU
                return "TRITON_INTERPRET=1 is set: Triton interprets on CPU tensors and cannot run on CUDA ones"
            return None
        if device.type == "cpu":
            if not _env.triton_interpret():
                return "Triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)"
            return triton_interpreter_error()
        return f"Triton does not run on {device.type} tensors"
    raise ValueError(f"unknown backend {backend!r}")


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve(impl: str | None, device: torch.device, dtype: torch.dtype, op: str) -> str:
    """The backend that runs `op` on tensors of this device/dtype."""
    req = requested_impl(impl)
    if req != "auto":
        reason = unavailable_reason(req, device, dtype)
        if reason is not None:
            raise RuntimeError(f"roli.ops.{op}: impl={req!r} cannot run here: {reason}")
        return req
    # CUDA tensors: the CUDA kernels first. Measured on an H200 (2026-12-04, BENCHMARKS.md "On a GPU"): they ran
    # the Linf step 1.6-3.6x faster than Triton at every size (84% vs 51% of copy_ at 128x3x224x224 fp32).
    prefs = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpp", "torch")
    reasons = []
    for backend in prefs:
        reason = unavailable_reason(backend, device, dtype)
        if reason is None:
            if reasons:
                _warn_once(f"roli: falling back to the {backend} backend ({'; '.join(reasons)})")
            return backend
        reasons.append(f"{backend}: {reason}")
    raise AssertionError("the torch backend is always available")  # pragma: no cover
