"""Backend choice: forced backends, ROLI_IMPL, fallbacks, custom-op registration, torch.compile, autograd."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import BACKENDS, ref_step

from roli import _ext
from roli.ops import _dispatch, keep_best_, pgd_step_


def _inputs(shape=(4, 3, 8, 8), seed=0):
    gen = torch.Generator().manual_seed(seed)
    x_nat = torch.rand(shape, generator=gen)
    return x_nat.clone(), torch.randn(shape, generator=gen), x_nat


def test_cuda_backend_on_cpu_tensors_raises_with_reason():
    x, g, xn = _inputs()
    with pytest.raises(RuntimeError, match="impl='cuda' cannot run here: .*CUDA tensors"):
        pgd_step_(x, g, xn, 0.1, 0.01, impl="cuda")


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, g, xn = _inputs()
    with pytest.raises(RuntimeError, match="impl='triton' cannot run here: .*TRITON_INTERPRET"):
        pgd_step_(x, g, xn, 0.1, 0.01, impl="triton")


def test_interpreter_on_never_picks_triton_for_cuda_tensors(monkeypatch):
    """With TRITON_INTERPRET=1 (the CPU test suite's setting), a CUDA tensor must not go to Triton: its
    interpreted helpers cannot compile for a GPU. Checked on a CUDA device object (no GPU needed)."""
    monkeypatch.setattr(_dispatch, "triton_error", lambda: None)  # as if triton were installed
    cuda = torch.device("cuda", 0)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "TRITON_INTERPRET=1" in _dispatch.unavailable_reason("triton", cuda, torch.float32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _dispatch.unavailable_reason("triton", cuda, torch.float32) is None


def test_interpreter_of_triton_before_3_2_is_refused_for_cpu_tensors(monkeypatch):
    """Triton 3.1's interpreter (torch 2.5's triton) copies results back to GPU tensors only: CPU tensors would
    come back unchanged, so the backend says so instead of returning wrong results."""
    triton = pytest.importorskip("triton")
    monkeypatch.setattr(_dispatch, "triton_error", lambda: None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    monkeypatch.setattr(triton, "__version__", "3.1.0")
    assert "needs triton>=3.2" in _dispatch.unavailable_reason("triton", cpu, torch.float32)
    x, g, xn = _inputs()
    with pytest.raises(RuntimeError, match=r"impl='triton' cannot run here: Triton 3\.1\.0's interpreter"):
        pgd_step_(x, g, xn, 0.1, 0.01, impl="triton")
    for version in ("3.2.0", "3.10.1+git8a1b2c3"):
        monkeypatch.setattr(triton, "__version__", version)
        assert _dispatch.unavailable_reason("triton", cpu, torch.float32) is None


def test_missing_extension_forced_raises_and_auto_falls_back_once(monkeypatch):
    monkeypatch.setattr(_ext, "_loaded", True)
    monkeypatch.setattr(_ext, "HAS_EXT", False)
    monkeypatch.setattr(_ext, "EXT_ERROR", "roli._C not built (test)")
    monkeypatch.setattr(_dispatch, "_warned", set())
    x, g, xn = _inputs()
    with pytest.raises(
        RuntimeError, match=r"impl='cpp' cannot run here: C\+\+ extension unavailable: roli._C not built"
    ):
        pgd_step_(x, g, xn, 0.1, 0.01, impl="cpp")
    with pytest.warns(RuntimeWarning, match="falling back to the torch backend .*roli._C not built"):
        pgd_step_(x, g, xn, 0.1, 0.01)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second fallback for the same reason stays quiet
        pgd_step_(x, g, xn, 0.1, 0.01)
        keep_best_(x, torch.zeros(4), xn, torch.ones(4))


def test_roli_impl_environment_is_honoured(monkeypatch):
    x, g, xn = _inputs()
    monkeypatch.setenv("ROLI_IMPL", "cuda")
    with pytest.raises(RuntimeError, match="impl='cuda'"):
        pgd_step_(x, g, xn, 0.1, 0.01)
    pgd_step_(x, g, xn, 0.1, 0.01, impl="torch")  # an explicit impl overrides the environment
    monkeypatch.setenv("ROLI_IMPL", "torch")
    assert _dispatch.resolve(None, x.device, x.dtype, "pgd_step_") == "torch"
    monkeypatch.setenv("ROLI_IMPL", "fastest")
    with pytest.raises(ValueError, match="ROLI_IMPL='fastest' is not a backend"):
        pgd_step_(x, g, xn, 0.1, 0.01)


def test_auto_picks_cpp_on_cpu_when_built(monkeypatch):
    monkeypatch.delenv("ROLI_IMPL", raising=False)
    want = "cpp" if _ext.load() else "torch"
    assert _dispatch.resolve("auto", torch.device("cpu"), torch.float32, "pgd_step_") == want


def test_subprocess_without_extension_uses_torch_and_reports_reason():
    env = dict(os.environ, ROLI_NO_EXT="1")
    env.pop("ROLI_IMPL", None)
    code = (
        "import warnings, torch, roli.ops as O\n"
        "x = torch.rand(2, 3); g = torch.randn(2, 3); n = x.clone()\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    O.pgd_step_(x, g, n, 0.1, 0.1); O.pgd_step_(x, g, n, 0.1, 0.1)\n"
        "print(len(w), w[0].message)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("1 ") and "ROLI_NO_EXT=1" in out.stdout
    info = subprocess.run([sys.executable, "-m", "roli.info"], env=env, capture_output=True, text=True, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "cpp" in info.stdout and "disabled by ROLI_NO_EXT=1" in info.stdout


def test_info_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "roli.info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("torch", "cpp", "cuda", "triton", "nvcc", "c++"):
        assert f"  {name} " in out.stdout
    lines = {ln.split()[0]: ln.split(None, 1)[1] for ln in out.stdout.splitlines() if ln.startswith("  ")}
    for b in ("torch", "cpp", "cuda", "triton"):  # "available ..." or "unavailable: <a reason>"
        assert re.fullmatch(r"available.*|unavailable: \S.*", lines[b]), lines[b]
    assert lines["torch"].startswith("available")
    assert lines["cpp"].startswith("available") == _ext.load()


@pytest.mark.skipif(not _ext.load(), reason="C++ extension unavailable")
def test_opcheck_registered_ops():
    x, g, xn = _inputs((3, 2, 5, 5), seed=1)
    eps_t = torch.rand(3) * 0.1
    for name in ("pgd_step_linf_", "pgd_step_l2_"):
        op = getattr(torch.ops.roli, name).default
        torch.library.opcheck(op, (x.clone(), g, xn, None, 0.1, None, 0.05, 0.0, 1.0))
        torch.library.opcheck(op, (x.clone(), g, xn, eps_t, 0.0, eps_t, 0.0, 0.0, 1.0))
    torch.library.opcheck(torch.ops.roli.keep_best_.default, (x.clone(), torch.rand(3), xn, torch.rand(3)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()

    def attack_step(x_adv, grad, x_nat, eps):
        pgd_step_(x_adv, grad, x_nat, eps, 2 / 255, impl=backend)
        return x_adv * 1.0

    compiled = torch.compile(attack_step, fullgraph=True, backend="aot_eager")
    x, g, xn = _inputs(seed=2)
    eps = torch.rand(4) * 8 / 255
    out = compiled(x.clone(), g, xn, eps)
    torch.testing.assert_close(out.double(), ref_step(x, g, xn, eps, 2 / 255), rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_autograd_elsewhere_in_the_graph_is_unaffected(backend):
    # A PGD-style loop: input gradient through a model, the fused step on detached tensors, and a
    # parameter gradient afterwards that must equal the one computed without the op in between.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5))
    x_nat = torch.rand(6, 3, 4, 4)
    y = torch.randint(0, 5, (6,))
    x_adv = x_nat.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(x_adv), y)
    (grad,) = torch.autograd.grad(loss, x_adv)
    assert all(p.grad is None for p in model.parameters())
    pgd_step_(x_adv.detach(), grad, x_nat, 8 / 255, 2 / 255, impl=backend)
    loss2 = torch.nn.functional.cross_entropy(model(x_adv.detach()), y)
    loss2.backward()
    # The weight gradient of the mean cross-entropy of a linear layer, in float64 by hand, on the stepped images
    # of the float64 reference step: (softmax(W x + b) - onehot(y))^T x / B.
    xs = ref_step(x_nat, grad, x_nat, 8 / 255, 2 / 255).flatten(1)  # (B, 48)
    w, b = model[1].weight.double().detach(), model[1].bias.double().detach()
    p = torch.softmax(xs @ w.t() + b, 1) - torch.nn.functional.one_hot(y, 5).double()
    torch.testing.assert_close(model[1].weight.grad.double(), p.t() @ xs / len(y), rtol=1e-5, atol=1e-6)
    assert float((x_adv.detach() - x_nat).abs().max()) <= 8 / 255 + 1e-7


def test_auto_prefers_cuda_then_triton_for_cuda_tensors(monkeypatch):
    """Checked on a CUDA device object (no GPU needed): both available -> cuda (measured faster on an H200);
    cuda unavailable -> triton, with one warning naming why; neither -> torch."""
    cuda = torch.device("cuda", 0)
    missing: set[str] = set()
    monkeypatch.setattr(_dispatch, "unavailable_reason", lambda b, d, t: "missing here" if b in missing else None)
    assert _dispatch.resolve("auto", cuda, torch.float32, "pgd_step_") == "cuda"
    missing.add("cuda")
    with pytest.warns(RuntimeWarning, match="falling back to the triton backend \\(cuda: missing here\\)"):
        assert _dispatch.resolve("auto", cuda, torch.float32, "pgd_step_") == "triton"
    missing.add("triton")
    assert _dispatch.resolve("auto", cuda, torch.float32, "pgd_step_") == "torch"
