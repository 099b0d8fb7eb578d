"""Triton kernels of roli, installed as the subpackage ``roli.kernels``.

Each module holds the ``@triton.jit`` kernels of one op (``_<op>_..._kernel``) and its launcher
(``<op>_forward``), which takes the same arguments as the matching ``torch.ops.roli`` op. Kernels
run on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""

from roli.kernels.keep_best import keep_best_forward
from roli.kernels.pgd_step import pgd_step_l2_forward, pgd_step_linf_forward

__all__ = ["keep_best_forward", "pgd_step_l2_forward", "pgd_step_linf_forward"]
