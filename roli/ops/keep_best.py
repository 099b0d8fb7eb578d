"""keep_best_: per sample, where score > best_score, copy x_adv into best_x and score into best_score.

The "worst case per example" bookkeeping of PGD restarts and best iterates. A NaN score never wins.
Fused backends compare the scores and copy only the winning samples (no (B, ...) mask, no torch.where
over the whole batch).
"""

from __future__ import annotations

import torch

from roli.ops._args import check_image, check_writable, per_sample_view
from roli.ops._dispatch import resolve
from roli.ops._triton import triton_keep_best_


def keep_best_torch(best_x, best_score, x_adv, score) -> None:
    better = score > best_score  # (B,)
    best_x.copy_(torch.where(per_sample_view(better, best_x.dim()), x_adv, best_x))
    best_score.copy_(torch.where(better, score, best_score))


def _cpp(best_x, best_score, x_adv, score) -> None:
    torch.ops.roli.keep_best_(best_x, best_score, x_adv, score)


_BACKENDS = {"torch": keep_best_torch, "cpp": _cpp, "cuda": _cpp, "triton": triton_keep_best_}


def keep_best_kernel(device: torch.device, dtype: torch.dtype, impl: str | None = None):
    """The resolved backend function of keep_best_ (arguments validated by the caller, once)."""
    return _BACKENDS[resolve(impl, device, dtype, "keep_best_")]


def _check_score(name: str, t, batch: int, like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape ({batch},); got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {t.dtype}")
    if t.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one score per sample); got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device} but the images are on {like.device}")


def keep_best_(
    best_x: torch.Tensor,
    best_score: torch.Tensor,
    x_adv: torch.Tensor,
    score: torch.Tensor,
    impl: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample keep-best update, in place on `best_x` and `best_score`.

    Args:
        best_x: (B, ...) best images so far; overwritten where the new score is higher.
        best_score: (B,) their scores (e.g. per-sample loss, or a margin); overwritten likewise.
        x_adv: (B, ...) candidate images (same shape/dtype/device as best_x).
        score: (B,) candidate scores (same dtype as best_score).
        impl: backend, "auto" | "torch" | "cpp" | "cuda" | "triton" (default: $ROLI_IMPL or "auto").

    Returns:
        (best_x, best_score).
    """
    check_image("best_x", best_x)
    check_image("x_adv", x_adv, like=best_x)
    check_writable("best_x", best_x)
    batch = best_x.shape[0]
    _check_score("best_score", best_score, batch, best_x)
    _check_score("score", score, batch, best_x)
    check_writable("best_score", best_score)
    if score.dtype != best_score.dtype:
        raise TypeError(f"score has dtype {score.dtype} but must match best_score's dtype {best_score.dtype}")
    backend = resolve(impl, best_x.device, best_x.dtype, "keep_best_")
    with torch.no_grad():
        _BACKENDS[backend](best_x, best_score, x_adv.detach(), score.detach())
    return best_x, best_score
