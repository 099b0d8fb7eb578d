"""The Triton launchers as torch custom ops, so that torch.compile treats them as opaque mutating ops.

Defined at import (cheap: no triton import here) so that no op is ever defined inside a traced region;
the kernels module (and triton) is imported on the first call.
"""

from __future__ import annotations

import contextlib

import torch


def _on_device(t: torch.Tensor):
    """Launch on the tensors' GPU, not the current one (tensors on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _step_op(name: str):
    @torch.library.custom_op(f"roli::triton_{name}", mutates_args=("x_adv",))
    def op(
        x_adv: torch.Tensor,
        grad: torch.Tensor,
        x_nat: torch.Tensor,
        eps_t: torch.Tensor | None,
        eps: float,
        step_t: torch.Tensor | None,
        step: float,
        lo: float,
        hi: float,
    ) -> None:
        from roli import kernels

        with _on_device(x_adv):
            getattr(kernels, f"{name.rstrip('_')}_forward")(x_adv, grad, x_nat, eps_t, eps, step_t, step, lo, hi)

    @op.register_fake
    def _(x_adv, grad, x_nat, eps_t, eps, step_t, step, lo, hi):
        return None

    return op


@torch.library.custom_op("roli::triton_keep_best_", mutates_args=("best_x", "best_score"))
def triton_keep_best_(best_x: torch.Tensor, best_score: torch.Tensor, x_adv: torch.Tensor, score: torch.Tensor) -> None:
    from roli.kernels import keep_best_forward

    with _on_device(best_x):
        keep_best_forward(best_x, best_score, x_adv, score)


@triton_keep_best_.register_fake
def _(best_x, best_score, x_adv, score):
    return None


triton_pgd_step_linf_ = _step_op("pgd_step_linf_")
triton_pgd_step_l2_ = _step_op("pgd_step_l2_")
