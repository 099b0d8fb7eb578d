"""pgd_init: random starts inside the budget, uniform, per-sample eps, reproducible with a generator."""

from __future__ import annotations

import math

import pytest
import torch

from roli.ops import pgd_init


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linf_inside_box_and_range(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(32, 3, 16, 16, generator=gen).to(dtype)
    out = pgd_init(x, 8 / 255, "linf", generator=gen)
    assert out.shape == x.shape and out.dtype == dtype
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    slack = 0 if dtype == torch.float32 else 2**-8  # one bf16 rounding of the result
    assert float((out.float() - x.float()).abs().max()) <= 8 / 255 * (1 + 1e-6) + slack


def test_linf_is_uniform():
    gen = torch.Generator().manual_seed(1)
    x = torch.full((64, 3, 32, 32), 0.5)  # interior: the clip never binds
    delta = (pgd_init(x, 0.1, "linf", generator=gen) - x) / 0.1  # ~ U(-1, 1)
    assert abs(float(delta.mean())) < 0.01
    assert abs(float(delta.var()) - 1 / 3) < 0.01
    assert float(delta.min()) < -0.99 and float(delta.max()) > 0.99


def test_l2_inside_ball_and_uniform_in_volume():
    gen = torch.Generator().manual_seed(2)
    d = 12
    x = torch.full((4000, d), 0.5)
    eps = 0.3
    out = pgd_init(x, eps, "l2", generator=gen)
    r = (out - x).norm(dim=1) / eps
    assert float(r.max()) <= 1 + 1e-5
    # Uniform in the ball: (r)^d ~ U(0, 1); direction isotropic: mean delta ~ 0.
    u = r.double() ** d
    assert abs(float(u.mean()) - 0.5) < 0.03
    assert float((out - x).mean(0).abs().max()) < 0.02


def test_per_sample_eps():
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(6, 3, 8, 8, generator=gen)
    eps = torch.tensor([0.0, 0.01, 0.02, 0.05, 0.1, 0.2])
    for norm in ("linf", "l2"):
        out = pgd_init(x, eps, norm, generator=gen, clip=None)
        delta = (out - x).flatten(1)
        size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
        assert torch.equal(out[0], x[0])
        assert bool((size <= eps * (1 + 1e-5)).all())
        assert bool((size[1:] > 0.5 * eps[1:]).all())  # the budget of each sample is actually used


def test_seeded_runs_identical_and_seeds_differ():
    x = torch.rand(4, 3, 8, 8)
    a = pgd_init(x, 0.1, generator=torch.Generator().manual_seed(5))
    b = pgd_init(x, 0.1, generator=torch.Generator().manual_seed(5))
    c = pgd_init(x, 0.1, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_clip_none_and_bounds():
    x = torch.zeros(2, 100) + torch.rand(2, 100)
    out = pgd_init(x, 0.5, clip=(0.2, 0.7), generator=torch.Generator().manual_seed(0))
    assert float(out.min()) >= 0.2 and float(out.max()) <= 0.7
    free = pgd_init(x, 0.5, clip=None, generator=torch.Generator().manual_seed(0))
    assert float(free.min()) < 0 or float(free.max()) > 1
    assert math.isclose(float((free - x).abs().max()), 0.5, rel_tol=0.05)
