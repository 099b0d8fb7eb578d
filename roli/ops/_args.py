"""Argument checks shared by the ops: a clear ValueError/TypeError that names the argument."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
NORMS = ("linf", "l2")


def check_norm(norm: str) -> str:
    if not isinstance(norm, str) or norm.lower() not in NORMS:
        raise ValueError(f"norm must be 'linf' or 'l2'; got {norm!r}")
    return norm.lower()


def check_clip(clip) -> tuple[float, float]:
    if clip is None:
        return -math.inf, math.inf
    try:
        lo, hi = (float(v) for v in clip)
    except (TypeError, ValueError):
        raise ValueError(f"clip must be a pair (lo, hi) of numbers or None; got {clip!r}") from None
    if not lo <= hi:
        raise ValueError(f"clip must satisfy lo <= hi; got {clip!r}")
    return lo, hi


def check_image(name: str, t, like: torch.Tensor | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, bfloat16, float16 or float64); got {t.dtype}. "
            "Convert images to float in pixel space, e.g. x.float() / 255"
        )
    if t.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension (shape (B, ...)); got a 0-d tensor")
    if like is not None:
        if t.shape != like.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but must match shape {tuple(like.shape)}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but must be on {like.device} like the other images")
        if t.dtype != like.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but must match dtype {like.dtype}")


def check_writable(name: str, t: torch.Tensor) -> None:
    if t.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad; the op writes it in place: pass {name}.detach()")


def _check_values(name: str, t: torch.Tensor) -> None:
    # Value checks read the tensor: skip them where that would force a host sync inside a CUDA graph
    # capture or a data-dependent branch inside torch.compile.
    if torch.compiler.is_compiling():
        return
    if t.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite; got non-finite values")
    if bool((t < 0).any()):
        raise ValueError(f"{name} must be >= 0; got a minimum of {float(t.min())}")


def check_budget(name: str, value, like: torch.Tensor) -> tuple[torch.Tensor | None, float]:
    """A budget (eps or step_size): a number >= 0, or a tensor of shape (B,) (or 0-d) with values >= 0.

    Returns (per_sample_float32_tensor_or_None, scalar).
    """
    batch = like.shape[0]
    if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
        raise TypeError(f"{name} must be a float or a tensor of shape ({batch},); got {type(value).__name__}")
    if not isinstance(value, torch.Tensor):
        value = float(value)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0; got {value}")
        return None, value
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {value.dtype}")
    if value.device != like.device:
        raise ValueError(f"{name} is on {value.device} but the images are on {like.device}")
    if value.dim() == 0:
        value = value.expand(batch)
    if value.shape != (batch,):
        raise ValueError(f"a per-sample {name} must have shape ({batch},) (one per sample); got {tuple(value.shape)}")
    value = value.detach().to(torch.float32).contiguous()
    _check_values(name, value)
    return value, 0.0


def per_sample_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.view((-1,) + (1,) * (ndim - 1))
