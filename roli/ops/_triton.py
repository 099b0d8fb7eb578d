"""The Triton launchers as torch custom ops, so that torch.compile treats them as opaque mutating ops."""

from __future__ import annotations

import torch


def _define():
    from roli.kernels import keep_best_forward, pgd_step_l2_forward, pgd_step_linf_forward

    def step_op(name, forward):
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
            forward(x_adv, grad, x_nat, eps_t, eps, step_t, step, lo, hi)

        @op.register_fake
        def _(x_adv, grad, x_nat, eps_t, eps, step_t, step, lo, hi):
            return None

        return op

    @torch.library.custom_op("roli::triton_keep_best_", mutates_args=("best_x", "best_score"))
    def keep_best(best_x: torch.Tensor, best_score: torch.Tensor, x_adv: torch.Tensor, score: torch.Tensor) -> None:
        keep_best_forward(best_x, best_score, x_adv, score)

    @keep_best.register_fake
    def _(best_x, best_score, x_adv, score):
        return None

    return {
        "linf": step_op("pgd_step_linf_", pgd_step_linf_forward),
        "l2": step_op("pgd_step_l2_", pgd_step_l2_forward),
        "keep_best": keep_best,
    }


_OPS = None


def triton_ops() -> dict:
    global _OPS
    if _OPS is None:
        _OPS = _define()
    return _OPS
