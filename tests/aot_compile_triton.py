"""Compile every roli Triton kernel ahead of time for the given CUDA archs (no GPU needed).

Run as a script without TRITON_INTERPRET (test_triton_kernels.py does): prints one JSON line per
(kernel, dtype, arch) with the size of the PTX and cubin produced.
"""

from __future__ import annotations

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from roli.kernels import keep_best, pgd_step

IMAGE_PTRS = {"X", "G", "XN", "BX"}
FP32_PTRS = {"EPS", "STEP", "PART"}
SCALARS = {"eps": "fp32", "step": "fp32", "lo": "fp32", "hi": "fp32", "N": "i32", "CHUNKS": "i32", "B": "i32"}


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


CASES = [
    (pgd_step._pgd_step_linf_kernel, {"BLOCK": 2048, "EPS_T": True, "STEP_T": False}),
    (pgd_step._pgd_step_l2_reduce_kernel, {"BLOCK": 2048, "STEP_T": True, "PASS": 1, "CPOW": 64}),
    (pgd_step._pgd_step_l2_update_kernel, {"BLOCK": 2048, "EPS_T": False, "STEP_T": True, "CPOW": 64}),
    (keep_best._keep_best_copy_kernel, {"BLOCK": 4096}),
    (keep_best._keep_best_score_kernel, {"BLOCK": 1024}),
]


def main(archs: list[int]) -> None:
    for kernel, constexprs in CASES:
        for dtype in ("fp32", "bf16", "fp16"):
            for arch in archs:
                src = ASTSource(kernel.jit, signature(kernel.jit, dtype), constexprs)
                compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32))
                sizes = {k: len(compiled.asm.get(k, "")) for k in ("ptx", "cubin")}
                ptx = compiled.asm.get("ptx", "")
                # Approximate square roots / divisions in the PTX (the L2 kernels must round correctly).
                approx = sum(ptx.count(op) for op in ("sqrt.approx", "div.approx", "div.full", "rsqrt.approx"))
                atomics = ptx.count("atom.")
                print(json.dumps({"kernel": kernel.__name__, "dtype": dtype, "arch": arch, **sizes, "approx": approx,
                                  "atomics": atomics}))  # fmt: skip


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [80, 90])
