"""pgd_step_: every backend against an independent float64 reference, on fresh random inputs."""

from __future__ import annotations

import zlib

import pytest
import torch
from conftest import BACKENDS, LAYOUTS, SLICE, assert_close_ulp, assert_only_the_view_changed, in_layout, ref_step

from roli.ops import pgd_step_

SHAPES = [(1, 1, 1, 1), (7, 3, 33, 17), (64, 3, 32, 32), (4, 3, 224, 224)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_inputs(shape, dtype, gen, zero_frac=0.3, at_bounds=True):
    x_nat = torch.rand(shape, generator=gen)
    if at_bounds:  # exact 0 and 1 pixels: the projection and the clip both bind there
        r = torch.rand(shape, generator=gen)
        x_nat[r < 0.1] = 0.0
        x_nat[r > 0.9] = 1.0
    x_adv = (x_nat + (torch.rand(shape, generator=gen) * 2 - 1) * 0.03).clamp(0, 1)
    grad = torch.randn(shape, generator=gen)
    grad[torch.rand(shape, generator=gen) < zero_frac] = 0.0  # sign(0) = 0: no step there
    return x_adv.to(dtype), grad.to(dtype), x_nat.to(dtype)


def budgets(kind, batch, gen):
    if kind == "scalar":
        return 8 / 255, 2 / 255
    eps = torch.rand(batch, generator=gen) * 16 / 255
    eps[0] = 0.0  # a zero budget inside a per-sample batch
    return eps, torch.rand(batch, generator=gen) * 4 / 255


def _run(backend, x_adv, grad, x_nat, eps, step, norm):
    out = x_adv.clone(memory_format=torch.preserve_format)
    res = pgd_step_(out, grad, x_nat, eps, step, norm=norm, impl=backend)
    assert res is out
    return out


@pytest.fixture(autouse=True)
def _interpreter(interpret):
    pass


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("budget", ["scalar", "per_sample"])
def test_matches_reference(backend, norm, dtype, shape, budget):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((backend, norm, dtype, shape, budget)).encode()))
    x_adv, grad, x_nat = make_inputs(shape, dtype, gen)
    eps, step = budgets(budget, shape[0], gen)
    if norm == "l2":  # L2 budgets live on a larger scale
        eps, step = eps * 40 if budget != "scalar" else 0.5, step * 40 if budget != "scalar" else 0.1
    out = _run(backend, x_adv, grad, x_nat, eps, step, norm)
    assert_close_ulp(out, ref_step(x_adv, grad, x_nat, eps, step, norm))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous(backend, norm, layout):
    gen = torch.Generator().manual_seed(11)
    x_adv, grad, x_nat = in_layout(layout, *make_inputs((6, 3, 20, 24), torch.float32, gen))
    eps, step = (8 / 255, 2 / 255) if norm == "linf" else (0.5, 0.1)
    expected = ref_step(x_adv, grad, x_nat, eps, step, norm)
    parent = x_adv._base if layout == "sliced" else None  # the bigger tensor the sliced view lies in
    before = parent.clone() if parent is not None else None
    pgd_step_(x_adv, grad, x_nat, eps, step, norm=norm, impl=backend)  # in place on the caller's strided tensor
    assert_close_ulp(x_adv, expected)
    if parent is not None:  # the result is written through to the parent, whose other elements stay
        assert_close_ulp(parent[SLICE], expected)
        assert_only_the_view_changed(parent, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliced_view_writes_through_to_base(backend):
    gen = torch.Generator().manual_seed(5)
    base = torch.rand(4, 3, 16, 16, generator=gen)
    untouched = base.clone()
    view = base[:, :, ::2]  # every other row
    grad = torch.randn(view.shape, generator=gen)
    x_nat = view.clone()
    expected = ref_step(view, grad, x_nat, 0.1, 0.05)
    pgd_step_(view, grad, x_nat, 0.1, 0.05, impl=backend)
    assert_close_ulp(base[:, :, ::2], expected)
    torch.testing.assert_close(base[:, :, 1::2], untouched[:, :, 1::2], rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_eps_zero_returns_clean_image(backend, norm):
    gen = torch.Generator().manual_seed(3)
    x_adv, grad, x_nat = make_inputs((5, 3, 9, 9), torch.float32, gen)
    pgd_step_(x_adv, grad, x_nat, 0.0, 0.1, norm=norm, impl=backend)
    assert torch.equal(x_adv, x_nat)


@pytest.mark.parametrize("backend", BACKENDS)
def test_l2_projection_radius(backend):
    gen = torch.Generator().manual_seed(7)
    x_nat = torch.rand(16, 3, 32, 32, generator=gen)
    eps = torch.rand(16, generator=gen) * 2 + 0.05
    x_adv = x_nat.clone()
    for _ in range(5):  # big steps: the projection must bind every time
        pgd_step_(x_adv, torch.randn(x_nat.shape, generator=gen), x_nat, eps, 3.0, norm="l2", clip=None, impl=backend)
        radius = (x_adv - x_nat).flatten(1).norm(dim=1)
        assert bool((radius <= eps * (1 + 1e-5)).all()), (radius / eps).max()
        assert bool((radius >= eps * (1 - 1e-5)).all())  # a step of 3 >> eps lands on the sphere


@pytest.mark.parametrize("backend", BACKENDS)
def test_l2_zero_gradient_sample_does_not_move(backend):
    gen = torch.Generator().manual_seed(8)
    x_nat = torch.rand(3, 2, 5, 5, generator=gen)
    x_adv = (x_nat + 0.01).clamp(0, 1)
    grad = torch.randn(x_nat.shape, generator=gen)
    grad[1] = 0.0
    before = x_adv.clone()
    pgd_step_(x_adv, grad, x_nat, 1.0, 0.2, norm="l2", impl=backend)
    assert torch.equal(x_adv[1], before[1])
    assert not torch.equal(x_adv[0], before[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.rand(0, 3, 4, 4)
    pgd_step_(x, torch.randn_like(x), x.clone(), 0.1, 0.1, impl=backend)
    assert x.shape == (0, 3, 4, 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_dim_eps_tensor_broadcasts(backend):
    gen = torch.Generator().manual_seed(9)
    x_adv, grad, x_nat = make_inputs((4, 3, 8, 8), torch.float32, gen)
    out = x_adv.clone()
    pgd_step_(out, grad, x_nat, torch.tensor(0.05), torch.tensor(0.02), impl=backend)
    assert_close_ulp(out, ref_step(x_adv, grad, x_nat, 0.05, 0.02))


def test_float64_runs_on_torch_backend(monkeypatch):
    from roli.ops import _dispatch

    monkeypatch.setattr(_dispatch, "_warned", set())
    gen = torch.Generator().manual_seed(10)
    x_adv, grad, x_nat = make_inputs((3, 2, 4, 4), torch.float64, gen)
    out = x_adv.clone()
    with pytest.warns(RuntimeWarning, match="falling back to the torch backend"):
        pgd_step_(out, grad, x_nat, 0.05, 0.02, impl="auto")
    assert_close_ulp(out, ref_step(x_adv, grad, x_nat, 0.05, 0.02))
    with pytest.raises(RuntimeError, match="float64"):
        pgd_step_(out, grad, x_nat, 0.05, 0.02, impl="cpp")


# Where a NaN lands after one step: a NaN image value or a NaN L2 gradient element poisons that element
# (and only it: the per-sample sums are NaN, so no scaling applies); a NaN Linf gradient has sign 0; a NaN
# bound (x_nat) of the Linf box is ignored by the fused kernels (select-based clamps, csrc/pgd_math.h) but
# poisons the torch reference (torch.clamp with tensor bounds).
NAN_CASES = [("x", "linf", True), ("x", "l2", True), ("g", "linf", False), ("g", "l2", True), ("xn", "l2", True),
             ("xn", "linf", None)]  # fmt: skip


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where, norm, poisoned", NAN_CASES)
def test_nan_lands_where_documented_on_every_backend(backend, where, norm, poisoned):
    if poisoned is None:
        poisoned = backend == "torch"
    gen = torch.Generator().manual_seed(21)
    x, g, xn = make_inputs((3, 2, 5, 7), torch.float32, gen)
    {"x": x, "g": g, "xn": xn}[where][1, 0, 2, 3] = float("nan")
    step = 2 / 255 if norm == "linf" else 0.1
    out = _run(backend, x, g, xn, 8 / 255 if norm == "linf" else 0.5, step, norm)
    want = torch.zeros_like(out, dtype=torch.bool)
    want[1, 0, 2, 3] = poisoned
    assert torch.equal(out.isnan(), want)
