"""The just-in-time build: with no ahead-of-time roli._C, the first use compiles csrc/ with ninja into
a cache directory, registers the ops, and a second process reuses the cache."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

CODE = """
import time, torch
from roli import _ext
t = time.time()
_ext._jit_build()
_ext._register_fakes()
x = torch.rand(3, 4); g = torch.randn(3, 4); n = x.clone()
torch.ops.roli.pgd_step_linf_(x, g, n, None, 0.1, None, 0.05, 0.0, 1.0)
want = torch.clamp(torch.clamp(n + 0.05 * g.sign(), n - 0.1, n + 0.1), 0, 1)
assert torch.equal(x, want), (x - want).abs().max()
print(f"ok {time.time() - t:.1f}")
"""


@pytest.mark.skipif(not os.environ.get("PATH"), reason="no PATH for the compiler")
def test_jit_build_and_cache(tmp_path):
    env = dict(os.environ, ROLI_EXT_DIR=str(tmp_path))
    t0 = time.time()
    first = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.startswith("ok")
    assert list(tmp_path.rglob("*.so")), "no shared object in the JIT cache"
    build_s = time.time() - t0
    second = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "building the C++ extension" not in second.stderr  # reused, not rebuilt
    assert float(second.stdout.split()[1]) < build_s
