"""Bad input: a ValueError/TypeError that names the argument, before any kernel runs."""

from __future__ import annotations

import pytest
import torch

from roli.ops import keep_best_, pgd_init, pgd_step_


def _ok():
    x = torch.rand(4, 3, 8, 8)
    return x.clone(), torch.randn_like(x), x


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (lambda a: a.update(grad=torch.randn(4, 3, 8, 7)), ValueError, "grad has shape"),
        (lambda a: a.update(x_nat=torch.rand(5, 3, 8, 8)), ValueError, "x_nat has shape"),
        (lambda a: a.update(grad=a["grad"].double()), TypeError, "grad has dtype"),
        (lambda a: a.update(x_nat=a["x_nat"].to("meta")), ValueError, "x_nat is on meta"),
        (
            lambda a: a.update(x_adv=torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8)),
            TypeError,
            "x_adv must be a floating",
        ),
        (lambda a: a.update(grad=[1.0]), TypeError, "grad must be a torch.Tensor"),
        (lambda a: a.update(eps=-0.1), ValueError, "eps must be a finite number >= 0"),
        (lambda a: a.update(eps=float("nan")), ValueError, "eps must be a finite number"),
        (lambda a: a.update(step_size=-1 / 255), ValueError, "step_size must be a finite number >= 0"),
        (lambda a: a.update(eps=torch.rand(3)), ValueError, r"per-sample eps must have shape \(4,\)"),
        (lambda a: a.update(step_size=torch.rand(5)), ValueError, r"per-sample step_size must have shape \(4,\)"),
        (lambda a: a.update(eps=torch.tensor([0.1, -0.1, 0.1, 0.1])), ValueError, "eps must be >= 0"),
        (lambda a: a.update(eps=torch.tensor([1, 2, 3, 4])), TypeError, "eps must be a floating-point tensor"),
        (lambda a: a.update(eps=True), TypeError, "eps must be a float"),
        (lambda a: a.update(norm="l1"), ValueError, "norm must be 'linf' or 'l2'"),
        (lambda a: a.update(clip=(1.0, 0.0)), ValueError, "clip must satisfy lo <= hi"),
        (lambda a: a.update(clip="0,1"), ValueError, "clip must be a pair"),
        (lambda a: a.update(impl="gpu"), ValueError, "impl='gpu' is not a backend"),
        (lambda a: a.update(x_adv=torch.tensor(0.5)), ValueError, "x_adv must have a batch dimension"),
    ],
)
def test_pgd_step_rejects(change, error, pattern):
    x, g, xn = _ok()
    args = dict(x_adv=x, grad=g, x_nat=xn, eps=8 / 255, step_size=2 / 255, norm="linf", clip=(0.0, 1.0), impl=None)
    change(args)
    before = x.clone()
    with pytest.raises(error, match=pattern):
        pgd_step_(**args)
    assert torch.equal(x, before)  # nothing written


def test_pgd_step_rejects_x_adv_that_requires_grad():
    x, g, xn = _ok()
    with pytest.raises(ValueError, match="x_adv requires grad"):
        pgd_step_(x.requires_grad_(True), g, xn, 0.1, 0.1)


@pytest.mark.parametrize(
    "change, error, pattern",
    [
        (lambda a: a.update(score=torch.rand(3)), ValueError, r"score must have shape \(4,\)"),
        (lambda a: a.update(best_score=torch.rand(4, 1)), ValueError, r"best_score must have shape \(4,\)"),
        (lambda a: a.update(score=torch.rand(4).double()), TypeError, "score has dtype"),
        (lambda a: a.update(score=torch.arange(4)), TypeError, "score must be a floating-point tensor"),
        (lambda a: a.update(x_adv=torch.rand(4, 3, 8, 9)), ValueError, "x_adv has shape"),
        (lambda a: a.update(x_adv=torch.rand(4, 3, 8, 8).bfloat16()), TypeError, "x_adv has dtype"),
    ],
)
def test_keep_best_rejects(change, error, pattern):
    args = dict(
        best_x=torch.rand(4, 3, 8, 8), best_score=torch.rand(4), x_adv=torch.rand(4, 3, 8, 8), score=torch.rand(4)
    )
    change(args)
    with pytest.raises(error, match=pattern):
        keep_best_(**args)


def test_pgd_init_rejects():
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="eps must be a finite number >= 0"):
        pgd_init(x, -1.0)
    with pytest.raises(ValueError, match="norm must be"):
        pgd_init(x, 0.1, norm="l0")
    with pytest.raises(TypeError, match="x_nat must be a floating"):
        pgd_init(x.to(torch.int32), 0.1)
