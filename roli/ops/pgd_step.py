"""pgd_step_: one projected gradient step of PGD, in place, with a per-sample budget.

Linf: x_adv = clamp(clamp(x_adv + step * sign(grad), x_nat - eps, x_nat + eps), lo, hi), sign(0) = 0.
L2:   x_adv = clamp(x_nat + P_eps(x_adv + step * grad / ||grad||_2 - x_nat), lo, hi) per sample, where
      P_eps scales a delta onto the L2 ball of radius eps and a zero gradient gives no step.

The reference below (pure PyTorch, also the CPU/GPU fallback) computes in fp32 and rounds once, as the
fused kernels do, so every backend is within 1 ulp of "fp32 reference, then rounded" for bf16/fp16.
The fused backends read x_adv, grad, x_nat and write x_adv once (Linf); the eager 7-op chain of
torchattacks reads/writes ~20 tensors of that size.
"""

from __future__ import annotations

import torch

from roli.ops._args import check_budget, check_clip, check_image, check_norm, check_writable, per_sample_view
from roli.ops._dispatch import resolve
from roli.ops._triton import triton_pgd_step_l2_, triton_pgd_step_linf_


def _scale(t: torch.Tensor | None, value: float, ndim: int):
    return per_sample_view(t, ndim) if t is not None else value


def _opmath(*ts: torch.Tensor) -> list[torch.Tensor]:
    # fp32 arithmetic for fp32/bf16/fp16 (one rounding at the end), fp64 for fp64.
    dtype = torch.float64 if ts[0].dtype == torch.float64 else torch.float32
    return [t.to(dtype) for t in ts]


def pgd_step_linf_torch(x_adv, grad, x_nat, eps_t, eps, step_t, step, lo, hi) -> None:
    x, g, xn = _opmath(x_adv, grad, x_nat)
    e, s = _scale(eps_t, eps, x.dim()), _scale(step_t, step, x.dim())
    if isinstance(e, torch.Tensor):
        e = e.to(x.dtype)
    if isinstance(s, torch.Tensor):
        s = s.to(x.dtype)
    v = x + s * torch.sign(g)
    v = torch.clamp(v, xn - e, xn + e).clamp_(lo, hi)
    x_adv.copy_(v)


def pgd_step_l2_torch(x_adv, grad, x_nat, eps_t, eps, step_t, step, lo, hi) -> None:
    x, g, xn = _opmath(x_adv, grad, x_nat)
    batch = x.shape[0]
    e = eps_t.to(x.dtype) if eps_t is not None else torch.full((batch,), eps, device=x.device, dtype=x.dtype)
    s = step_t.to(x.dtype) if step_t is not None else torch.full((batch,), step, device=x.device, dtype=x.dtype)
    gnorm = g.reshape(batch, -1).norm(dim=1)  # (B,)
    gscale = torch.where(gnorm > 0, s / gnorm, torch.zeros_like(gnorm))
    d = (x + per_sample_view(gscale, x.dim()) * g) - xn
    dnorm = d.reshape(batch, -1).norm(dim=1)  # (B,)
    dscale = torch.where(dnorm > e, e / dnorm, torch.ones_like(dnorm))
    x_adv.copy_((xn + d * per_sample_view(dscale, x.dim())).clamp_(lo, hi))


def _cpp(name):
    def run(*args):
        getattr(torch.ops.roli, name)(*args)

    return run


_BACKENDS = {
    "linf": {
        "torch": pgd_step_linf_torch,
        "cpp": _cpp("pgd_step_linf_"),
        "cuda": _cpp("pgd_step_linf_"),
        "triton": triton_pgd_step_linf_,
    },
    "l2": {
        "torch": pgd_step_l2_torch,
        "cpp": _cpp("pgd_step_l2_"),
        "cuda": _cpp("pgd_step_l2_"),
        "triton": triton_pgd_step_l2_,
    },
}


def pgd_step_(
    x_adv: torch.Tensor,
    grad: torch.Tensor,
    x_nat: torch.Tensor,
    eps: float | torch.Tensor,
    step_size: float | torch.Tensor,
    norm: str = "linf",
    clip: tuple[float, float] | None = (0.0, 1.0),
    impl: str | None = None,
) -> torch.Tensor:
    """One PGD step with projection, in place on `x_adv`.

    Args:
        x_adv: (B, ...) current adversarial images in pixel space, detached; overwritten.
        grad: (B, ...) gradient of the attack loss w.r.t. x_adv (same shape, dtype, device).
        x_nat: (B, ...) clean images (the centre of the budget ball).
        eps: radius of the Linf/L2 ball, a float or a (B,) tensor (one budget per sample).
        step_size: step length, a float or a (B,) tensor.
        norm: "linf" or "l2".
        clip: pixel range (lo, hi) applied last, or None for no clipping.
        impl: backend, "auto" | "torch" | "cpp" | "cuda" | "triton" (default: $ROLI_IMPL or "auto").

    Returns:
        x_adv.

    Example:
        >>> x = torch.rand(8, 3, 32, 32); g = torch.randn_like(x); x_adv = x.clone()
        >>> pgd_step_(x_adv, g, x, eps=8 / 255, step_size=2 / 255)
    """
    norm = check_norm(norm)
    check_image("x_adv", x_adv)
    check_image("grad", grad, like=x_adv)
    check_image("x_nat", x_nat, like=x_adv)
    check_writable("x_adv", x_adv)
    lo, hi = check_clip(clip)
    eps_t, eps_f = check_budget("eps", eps, x_adv)
    step_t, step_f = check_budget("step_size", step_size, x_adv)
    backend = resolve(impl, x_adv.device, x_adv.dtype, "pgd_step_")
    with torch.no_grad():
        _BACKENDS[norm][backend](x_adv, grad.detach(), x_nat.detach(), eps_t, eps_f, step_t, step_f, lo, hi)
    return x_adv


def step_kernel(norm: str, device: torch.device, dtype: torch.dtype, impl: str | None = None):
    """The resolved backend function of pgd_step_, for loops that validated their arguments once:
    fn(x_adv, grad, x_nat, eps_t, eps, step_t, step, lo, hi), in place, under no_grad. eps_t/step_t are
    contiguous float32 (B,) tensors or None (then the floats are used)."""
    return _BACKENDS[check_norm(norm)][resolve(impl, device, dtype, "pgd_step_")]
