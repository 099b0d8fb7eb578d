"""Compile every roli Triton kernel ahead of time for the given CUDA archs (no GPU needed).

Run as a script without TRITON_INTERPRET (test_triton_kernels.py does): prints one JSON line per compiled
variant with the size of the PTX and cubin produced. The variants are those a GPU launches: every image dtype
(fp32, bf16, fp16), float64/float32/bf16 scores for keep_best, scalar and per-sample (tensor) budgets, both
passes of the L2 reduction, L2 chunk counts from 1 to 128 (CPOW), and the launchers' num_warps. The first
arch gets every variant; later ones the base set (one variant per kernel and dtype).
"""

from __future__ import annotations

import itertools
import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from roli.kernels import keep_best, pgd_step

IMAGE_PTRS = {"X", "G", "XN", "BX"}
FP32_PTRS = {"EPS", "STEP", "PART"}
SCALARS = {"eps": "fp32", "step": "fp32", "lo": "fp32", "hi": "fp32", "N": "i32", "CHUNKS": "i32", "B": "i32"}
IMAGE_DTYPES = ("fp32", "bf16", "fp16")
SCORE_DTYPES = ("fp64", "fp32", "bf16")
BOOLS = (False, True)


def signature(fn, dtype: str, score_dtype: str = "fp32") -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in IMAGE_PTRS:
            sig[name] = f"*{dtype}"
        elif name in FP32_PTRS:
            sig[name] = "*fp32"
        elif name in ("S", "BS"):
            sig[name] = f"*{score_dtype}"
        elif name in SCALARS:
            sig[name] = SCALARS[name]
        else:
            sig[name] = "constexpr"
    return sig


def variants() -> list[tuple]:
    """(kernel, constexprs, score dtype, num_warps, base) for every variant; base marks one per kernel."""
    out = []
    linf, reduce, update = (pgd_step._pgd_step_linf_kernel, pgd_step._pgd_step_l2_reduce_kernel,
                            pgd_step._pgd_step_l2_update_kernel)  # fmt: skip
    block = pgd_step.GPU_BLOCK
    for eps_t, step_t in itertools.product(BOOLS, BOOLS):
        out.append((linf, {"BLOCK": block, "EPS_T": eps_t, "STEP_T": step_t}, "fp32", 8, (eps_t, step_t) == (1, 0)))
    for pass_, cpow, step_t in itertools.product((0, 1), (1, 128), BOOLS):
        base = (pass_, cpow, step_t) == (1, 128, True)
        out.append((reduce, {"BLOCK": block, "STEP_T": step_t, "PASS": pass_, "CPOW": cpow}, "fp32", 8, base))
    for cpow, eps_t, step_t in itertools.product((1, 128), BOOLS, BOOLS):
        base = (cpow, eps_t, step_t) == (128, False, True)
        out.append((update, {"BLOCK": block, "EPS_T": eps_t, "STEP_T": step_t, "CPOW": cpow}, "fp32", 8, base))
    for score in SCORE_DTYPES:
        out.append((keep_best._keep_best_copy_kernel, {"BLOCK": keep_best.GPU_BLOCK}, score, 4, score == "fp32"))
        out.append((keep_best._keep_best_score_kernel, {"BLOCK": 1024}, score, 4, score == "fp32"))
    return out


def main(archs: list[int]) -> None:
    for i, arch in enumerate(archs):
        for (kernel, constexprs, score, warps, base), dtype in itertools.product(variants(), IMAGE_DTYPES):
            if i > 0 and not base:
                continue
            src = ASTSource(kernel.jit, signature(kernel.jit, dtype, score), constexprs)
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
            sizes = {k: len(compiled.asm.get(k, "")) for k in ("ptx", "cubin")}
            ptx = compiled.asm.get("ptx", "")
            # Approximate square roots / divisions in the PTX (the L2 kernels must round correctly).
            approx = sum(ptx.count(op) for op in ("sqrt.approx", "div.approx", "div.full", "rsqrt.approx"))
            atomics = ptx.count("atom.")
            print(json.dumps({"kernel": kernel.__name__, "dtype": dtype, "score": score, "arch": arch, **sizes,
                              "approx": approx, "atomics": atomics, "num_warps": warps,
                              "constexprs": constexprs}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [90, 80])
