"""The Triton launchers as torch custom ops, so that torch.compile treats them as opaque mutating ops.

Defined at import (cheap: no triton import here) so that no op is ever defined inside a traced region;
the kernels module (and triton) is imported on the first call. The schemas are written out: torch 2.4
cannot infer one from the (string) annotations of a module with postponed evaluation.
"""

from __future__ import annotations

import contextlib

import torch


def _on_device(t: torch.Tensor):
    """Launch on the tensors' GPU, not the current one (tensors on cuda:1 while cuda:0 is current)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


STEP_SCHEMA = (
    "(Tensor(a!) x_adv, Tensor grad, Tensor x_nat, Tensor? eps_t, float eps, Tensor? step_t, float step, "
    "float lo, float hi) -> ()"
)
KEEP_BEST_SCHEMA = "(Tensor(a!) best_x, Tensor(b!) best_score, Tensor x_adv, Tensor score) -> ()"


def _step_op(name: str):
    @torch.library.custom_op(f"roli::triton_{name}", mutates_args=("x_adv",), schema=STEP_SCHEMA)
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


@torch.library.custom_op("roli::triton_keep_best_", mutates_args=("best_x", "best_score"), schema=KEEP_BEST_SCHEMA)
def triton_keep_best_(best_x: torch.Tensor, best_score: torch.Tensor, x_adv: torch.Tensor, score: torch.Tensor) -> None:
    from roli.kernels import keep_best_forward

    with _on_device(best_x):
        keep_best_forward(best_x, best_score, x_adv, score)


@triton_keep_best_.register_fake
def _(best_x, best_score, x_adv, score):
    return None


triton_pgd_step_linf_ = _step_op("pgd_step_linf_")
triton_pgd_step_l2_ = _step_op("pgd_step_l2_")
