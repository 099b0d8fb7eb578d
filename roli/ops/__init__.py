"""Fused ops of the PGD inner loop, each with torch / cpp / cuda / triton backends.

- pgd_step_(x_adv, grad, x_nat, eps, step_size, norm="linf", clip=(0, 1), impl=None)
- pgd_init(x_nat, eps, norm="linf", generator=None, clip=(0, 1))
- keep_best_(best_x, best_score, x_adv, score, impl=None)

impl="auto" | "torch" | "cpp" | "cuda" | "triton"; the environment variable ROLI_IMPL sets the default.
"""

from roli.ops._args import check_clip
from roli.ops._dispatch import IMPLS, requested_impl, resolve, triton_error, unavailable_reason
from roli.ops.keep_best import keep_best_, keep_best_kernel, keep_best_torch
from roli.ops.pgd_init import pgd_init
from roli.ops.pgd_step import pgd_step_, pgd_step_l2_torch, pgd_step_linf_torch, step_kernel

__all__ = [
    "IMPLS",
    "check_clip",
    "requested_impl",
    "triton_error",
    "keep_best_",
    "keep_best_kernel",
    "keep_best_torch",
    "pgd_init",
    "pgd_step_",
    "pgd_step_l2_torch",
    "pgd_step_linf_torch",
    "resolve",
    "step_kernel",
    "unavailable_reason",
]
