"""Kernel objects that run compiled on a GPU and interpreted on a CPU from one source.

``triton.jit`` decides at decoration time whether a kernel is interpreted (``TRITON_INTERPRET=1``).
That makes one process unable to both interpret a kernel (CPU tests) and compile it ahead of time for
sm_80/sm_90 (also CPU tests). ``DualKernel`` keeps the Python function and builds either form on
demand; the choice is made at launch: interpreted when ``TRITON_INTERPRET=1`` and the tensors are on
the CPU, compiled otherwise.

Note: kernels that call Triton's standard library (tl.sum) interpret correctly only when
TRITON_INTERPRET=1 was set before triton was imported, because those helpers are themselves jitted.
"""

from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from roli import _env


def interpreting() -> bool:
    return _env.triton_interpret()


class DualKernel:
    def __init__(self, fn):
        self.fn = fn
        self.__name__ = fn.__name__
        self._jit: JITFunction | None = None
        self._interpreted: InterpretedFunction | None = None

    @property
    def jit(self) -> JITFunction:
        """The compiled form (also what ``triton.compiler.ASTSource`` needs for ahead-of-time builds)."""
        if self._jit is None:
            self._jit = JITFunction(self.fn)
        return self._jit

    @property
    def interpreted(self) -> InterpretedFunction:
        if self._interpreted is None:
            self._interpreted = InterpretedFunction(self.fn)
        return self._interpreted

    def launcher(self, device: torch.device):
        if device.type == "cpu":
            if not interpreting():
                raise RuntimeError("roli: Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 for CPU tensors")
            return self.interpreted
        return self.jit


def dual_jit(fn) -> DualKernel:
    return DualKernel(fn)


def block_for(n: int, device: torch.device, gpu_block: int) -> int:
    """Elements per program: the GPU block, or one big block under the interpreter (~0.5 ms per program)."""
    if device.type == "cpu":
        return max(16, min(1 << 14, 1 << max(0, (n - 1).bit_length())))
    return gpu_block


def batch_major_dense(t: torch.Tensor) -> bool:
    """True when sample b occupies the flat range [b*N, (b+1)*N) of a dense block (contiguous, channels_last)."""
    if t.dim() == 0 or t.size(0) <= 1:
        return t.is_contiguous() or _dense(t)
    return _dense(t) and t.stride(0) == t.numel() // t.size(0)


def _dense(t: torch.Tensor) -> bool:
    # Non-overlapping and dense: sorting dims by stride gives a contiguous layout.
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape, strict=True) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def writable(out: torch.Tensor) -> torch.Tensor:
    return out if batch_major_dense(out) else out.contiguous()


def readable_like(t: torch.Tensor, work: torch.Tensor) -> torch.Tensor:
    if t.stride() == work.stride():
        return t
    return torch.empty_like(work).copy_(t)


def finish_write(out: torch.Tensor, work: torch.Tensor) -> None:
    if work.data_ptr() != out.data_ptr() or work.stride() != out.stride():
        out.copy_(work)
