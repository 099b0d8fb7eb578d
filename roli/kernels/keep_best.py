"""Triton kernels of keep_best_: per sample, where score > best_score, copy the sample and the score.

Two launches on one stream: the copy reads both score vectors, then the scores are updated. Updating
the scores inside the copy kernel would race with programs of the same sample still comparing.
"""

import torch
import triton
import triton.language as tl

from roli.kernels._jit import block_for, dual_jit, finish_write, readable_like, writable

GPU_BLOCK = 4096


@triton.jit
def _widen(v):
    # bf16/fp16 scores compare exactly in fp32 (and bf16 comparisons are broken in the interpreter); float64
    # stays float64. One return after a static if/else: an early return inside a static `if` makes Triton
    # (3.6 to 3.9) type-check the fall-through return too ("Return type mismatch fp64 vs fp32").
    if v.dtype == tl.float64:
        w = v
    else:
        w = v.to(tl.float32)
    return w


@dual_jit
def _keep_best_copy_kernel(BX, BS, X, S, N, CHUNKS, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = (pid // CHUNKS).to(tl.int64)
    offs = (pid % CHUNKS).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    # The two scores loaded as vectors (every lane the same address, served from cache) so the
    # comparison is element-wise and combines with the bounds mask; compared in fp32 or wider.
    same = b + tl.zeros((BLOCK,), dtype=tl.int64)
    mask = (offs < N) & (_widen(tl.load(S + same)) > _widen(tl.load(BS + same)))
    v = tl.load(X + b * N + offs, mask=mask)
    tl.store(BX + b * N + offs, v, mask=mask)


@dual_jit
def _keep_best_score_kernel(BS, S, B, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < B
    s = tl.load(S + offs, mask=mask)
    bs = tl.load(BS + offs, mask=mask)
    tl.store(BS + offs, s, mask=mask & (_widen(s) > _widen(bs)))


def keep_best_forward(best_x: torch.Tensor, best_score: torch.Tensor, x_adv: torch.Tensor, score: torch.Tensor) -> None:
    batch = best_x.shape[0]
    if batch == 0:
        return
    bs = best_score if best_score.is_contiguous() else best_score.contiguous()
    sc = score.contiguous()
    if best_x.numel() > 0:
        bx = writable(best_x)
        xa = readable_like(x_adv, bx)
        n = bx.numel() // batch
        block = block_for(n, bx.device, GPU_BLOCK)
        chunks = triton.cdiv(n, block)
        _keep_best_copy_kernel.launcher(bx.device)[(batch * chunks,)](bx, bs, xa, sc, n, chunks, BLOCK=block)
        finish_write(best_x, bx)
    sblock = block_for(batch, bs.device, 1024)
    _keep_best_score_kernel.launcher(bs.device)[(triton.cdiv(batch, sblock),)](bs, sc, batch, BLOCK=sblock)
    finish_write(best_score, bs)
