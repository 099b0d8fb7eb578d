"""Triton kernels of the PGD step with projection (Linf and L2), per-sample budgets.

Design: a 1-D grid of (sample, chunk) programs, so the per-sample eps/step are scalars of the program
and any batch size fits the grid. Operands are converted to fp32 on load and rounded once on store
(the same arithmetic as csrc/pgd_math.h: correctly rounded sqrt and division, as the CUDA and C++ kernels
compute them). L2 needs two per-sample reductions before the update: each (sample, chunk) program writes
its partial sum into a (2, B, CHUNKS) fp32 workspace, without atomics, and the programs that need a
sample's sum add its partials in one fixed order, so seeded L2 attacks are bit-reproducible (three
launches, no host synchronisation).
"""

import torch
import triton
import triton.language as tl

from roli.kernels._jit import block_for, dual_jit, finish_write, readable_like, writable

GPU_BLOCK = 2048
FLT_MIN = tl.constexpr(1.1754944e-38)  # keeps the untaken branch of a where() free of 0/0


@triton.jit
def _sample_block(pid, CHUNKS, N, BLOCK: tl.constexpr):
    # Program pid -> sample b, its element offsets, their bounds mask and the flat pointers offsets.
    b = (pid // CHUNKS).to(tl.int64)
    offs = (pid % CHUNKS).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    return b, offs < N, b * N + offs


@triton.jit
def _budget(PTR, b, value, PER_SAMPLE: tl.constexpr):
    if PER_SAMPLE:
        return tl.load(PTR + b)
    else:
        return value


@triton.jit
def _row_sum(PART, row, CHUNKS, CPOW: tl.constexpr):
    # The sum of one row of partials (a sample's reduction), in the same fixed order in every program.
    k = tl.arange(0, CPOW)
    return tl.sum(tl.load(PART + row * CHUNKS + k, mask=k < CHUNKS, other=0.0), axis=0)


@triton.jit
def _grad_scale(gsq, s):
    # step / ||g|| (0 for a zero gradient); FLT_MIN keeps the untaken branch of the where() free of 0/0.
    return tl.where(gsq > 0.0, tl.div_rn(s, tl.sqrt_rn(tl.maximum(gsq, FLT_MIN))), 0.0)


@triton.jit
def _l2_scales(PART, B, b, e, s, CHUNKS, CPOW: tl.constexpr):
    # gscale = step / ||g||; dscale = min(1, eps / ||delta||).
    gscale = _grad_scale(_row_sum(PART, b, CHUNKS, CPOW), s)
    dnorm = tl.sqrt_rn(_row_sum(PART, B + b, CHUNKS, CPOW))
    return gscale, tl.where(dnorm > e, tl.div_rn(e, tl.maximum(dnorm, FLT_MIN)), 1.0)


@triton.jit
def _clamp(v, lo, hi):
    # Selects, as csrc/pgd_math.h's clamp_to: a NaN value stays NaN (tl.minimum/tl.maximum would return the
    # bound), so a poisoned image reaches the non-finite checks on every backend alike.
    v = tl.where(v < lo, lo, v)
    return tl.where(v > hi, hi, v)


@dual_jit
def _pgd_step_linf_kernel(
    X, G, XN, EPS, STEP, eps, step, lo, hi, N, CHUNKS, BLOCK: tl.constexpr, EPS_T: tl.constexpr, STEP_T: tl.constexpr
):
    b, mask, ptr = _sample_block(tl.program_id(0), CHUNKS, N, BLOCK)
    x = tl.load(X + ptr, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + ptr, mask=mask, other=0.0).to(tl.float32)
    xn = tl.load(XN + ptr, mask=mask, other=0.0).to(tl.float32)
    e = _budget(EPS, b, eps, EPS_T)
    sgn = tl.where(g > 0.0, 1.0, 0.0) - tl.where(g < 0.0, 1.0, 0.0)
    v = x + _budget(STEP, b, step, STEP_T) * sgn
    v = _clamp(_clamp(v, xn - e, xn + e), lo, hi)
    tl.store(X + ptr, v.to(X.dtype.element_ty), mask=mask)


@dual_jit
def _pgd_step_l2_reduce_kernel(
    X,
    G,
    XN,
    STEP,
    step,
    PART,
    B,
    N,
    CHUNKS,
    BLOCK: tl.constexpr,
    STEP_T: tl.constexpr,
    PASS: tl.constexpr,
    CPOW: tl.constexpr,
):
    # PASS 0: PART[b, chunk] = sum g^2.  PASS 1: PART[B + b, chunk] = sum (x + gscale * g - xn)^2.
    pid = tl.program_id(0)
    b, mask, ptr = _sample_block(pid, CHUNKS, N, BLOCK)
    chunk = (pid % CHUNKS).to(tl.int64)
    g = tl.load(G + ptr, mask=mask, other=0.0).to(tl.float32)
    if PASS == 0:
        tl.store(PART + b * CHUNKS + chunk, tl.sum(g * g, axis=0))
    else:
        gscale = _grad_scale(_row_sum(PART, b, CHUNKS, CPOW), _budget(STEP, b, step, STEP_T))
        x = tl.load(X + ptr, mask=mask, other=0.0).to(tl.float32)
        xn = tl.load(XN + ptr, mask=mask, other=0.0).to(tl.float32)
        d = tl.where(mask, (x + gscale * g) - xn, 0.0)
        tl.store(PART + (B + b) * CHUNKS + chunk, tl.sum(d * d, axis=0))


@dual_jit
def _pgd_step_l2_update_kernel(
    X,
    G,
    XN,
    EPS,
    STEP,
    eps,
    step,
    lo,
    hi,
    PART,
    B,
    N,
    CHUNKS,
    BLOCK: tl.constexpr,
    EPS_T: tl.constexpr,
    STEP_T: tl.constexpr,
    CPOW: tl.constexpr,
):
    b, mask, ptr = _sample_block(tl.program_id(0), CHUNKS, N, BLOCK)
    gscale, dscale = _l2_scales(PART, B, b, _budget(EPS, b, eps, EPS_T), _budget(STEP, b, step, STEP_T), CHUNKS, CPOW)
    x = tl.load(X + ptr, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + ptr, mask=mask, other=0.0).to(tl.float32)
    xn = tl.load(XN + ptr, mask=mask, other=0.0).to(tl.float32)
    v = _clamp(xn + ((x + gscale * g) - xn) * dscale, lo, hi)
    tl.store(X + ptr, v.to(X.dtype.element_ty), mask=mask)


def _geometry(x_adv, grad, x_nat):
    """Operands in one batch-major dense layout, and the (sample, chunk) launch geometry."""
    x = writable(x_adv)
    g, xn = readable_like(grad, x), readable_like(x_nat, x)
    batch = x.shape[0] if x.dim() else 1
    n = x.numel() // batch
    block = block_for(n, x.device, GPU_BLOCK)
    return x, g, xn, batch, n, block, triton.cdiv(n, block)


def _budget_ptr(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    # Triton needs a pointer argument even where the constexpr flag says it is unused.
    return t if t is not None else like


def pgd_step_linf_forward(x_adv, grad, x_nat, eps_t, eps, step_t, step, lo, hi) -> None:
    """In place: x_adv = clamp(clamp(x_adv + step * sign(grad), x_nat - eps, x_nat + eps), lo, hi)."""
    if x_adv.numel() == 0:
        return
    x, g, xn, batch, n, block, chunks = _geometry(x_adv, grad, x_nat)
    _pgd_step_linf_kernel.launcher(x.device)[(batch * chunks,)](
        x,
        g,
        xn,
        _budget_ptr(eps_t, x),
        _budget_ptr(step_t, x),
        float(eps),
        float(step),
        float(lo),
        float(hi),
        n,
        chunks,
        BLOCK=block,
        EPS_T=eps_t is not None,
        STEP_T=step_t is not None,
        num_warps=8,
    )
    finish_write(x_adv, x)


def pgd_step_l2_forward(x_adv, grad, x_nat, eps_t, eps, step_t, step, lo, hi) -> None:
    """In place: step along grad / ||grad||_2 per sample, project onto the L2 eps-ball around x_nat, clip."""
    if x_adv.numel() == 0:
        return
    x, g, xn, batch, n, block, chunks = _geometry(x_adv, grad, x_nat)
    part = torch.empty(2 * batch * chunks, device=x.device, dtype=torch.float32)  # every entry is written
    cpow = triton.next_power_of_2(chunks)
    step_ptr = _budget_ptr(step_t, part)
    for pass_ in (0, 1):
        _pgd_step_l2_reduce_kernel.launcher(x.device)[(batch * chunks,)](
            x,
            g,
            xn,
            step_ptr,
            float(step),
            part,
            batch,
            n,
            chunks,
            BLOCK=block,
            STEP_T=step_t is not None,
            PASS=pass_,
            CPOW=cpow,
            num_warps=8,
        )
    _pgd_step_l2_update_kernel.launcher(x.device)[(batch * chunks,)](
        x,
        g,
        xn,
        _budget_ptr(eps_t, part),
        step_ptr,
        float(eps),
        float(step),
        float(lo),
        float(hi),
        part,
        batch,
        n,
        chunks,
        BLOCK=block,
        EPS_T=eps_t is not None,
        STEP_T=step_t is not None,
        CPOW=cpow,
        num_warps=8,
    )
    finish_write(x_adv, x)
