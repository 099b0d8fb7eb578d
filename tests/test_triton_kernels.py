"""Triton kernels compile ahead of time for sm_80 and sm_90 with no GPU present.

(Their results are checked against the reference under TRITON_INTERPRET=1 in test_pgd_step.py and
test_keep_best.py, where "triton" is one of the backends.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from roli.ops._dispatch import triton_error

pytestmark = pytest.mark.skipif(triton_error() is not None, reason=str(triton_error()))


def test_every_kernel_compiles_for_sm80_and_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    script = Path(__file__).with_name("aot_compile_triton.py")
    out = subprocess.run(
        [sys.executable, str(script), "90", "80"], env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    # sm_90: every variant a GPU launches (26 per image dtype); sm_80: one per kernel and image dtype.
    assert len(rows) == 26 * 3 + 5 * 3
    for row in rows:
        assert row["ptx"] > 1000 and row["cubin"] > 1000, row
        if "l2" in row["kernel"]:  # correctly rounded sqrt/div, and no float atomics (deterministic sums)
            assert row["approx"] == 0 and row["atomics"] == 0, row
    assert {r["arch"] for r in rows} == {80, 90}
    sm90 = [r for r in rows if r["arch"] == 90]
    for name in ("_keep_best_copy_kernel", "_keep_best_score_kernel"):  # float64 scores compile (issue 22)
        assert {(r["dtype"], r["score"]) for r in sm90 if r["kernel"] == name} == {
            (d, s) for d in ("fp32", "bf16", "fp16") for s in ("fp64", "fp32", "bf16")
        }
    for name in ("_pgd_step_l2_reduce_kernel", "_pgd_step_l2_update_kernel"):
        assert {r["constexprs"]["CPOW"] for r in sm90 if r["kernel"] == name} == {1, 128}
    linf = {(r["constexprs"]["EPS_T"], r["constexprs"]["STEP_T"]) for r in sm90 if "linf" in r["kernel"]}
    assert linf == {(a, b) for a in (False, True) for b in (False, True)}
    assert {r["num_warps"] for r in sm90 if "pgd_step" in r["kernel"]} == {8}
