"""The fast paths keep results correct: on the same model and data, bf16 / channels_last / compiled
attacks reach robust accuracy within 1 point of the fp32 eager attack, and the trainer runs with them."""

from __future__ import annotations

import copy

import pytest
import torch

from roli.attacks import PGD, clean_correct
from roli.models import NormalizedModel
from roli.train import main


def robust(model, x, y, **kw) -> float:
    res = PGD(model, eps=0.1, step_size=0.0125, steps=10, seed=0, **kw).perturb(x, y)
    return float((clean_correct(model, x, y, kw.get("precision", "fp32")) & ~res.success).float().mean())


def test_bf16_and_channels_last_attacks_match_fp32(digits_model):
    model, x, y = digits_model
    ref = robust(model, x, y)
    assert abs(robust(model, x, y, precision="bf16") - ref) <= 0.01
    cl = NormalizedModel(copy.deepcopy(model.model).to(memory_format=torch.channels_last), None, None).eval()
    assert abs(robust(cl, x, y, memory_format="channels_last") - ref) <= 0.01


@pytest.mark.slow
def test_compiled_attack_matches_eager(digits_model):
    model, x, y = digits_model
    compiled = torch.compile(copy.deepcopy(model))
    assert abs(robust(compiled, x, y) - robust(model, x, y)) <= 0.01


@pytest.mark.slow
def test_trainer_with_all_fast_paths(tmp_path):
    argv = ["--method", "pretrain", "--dataset", "digits", "--classes", "0-4", "--eps", "0.1", "--step-size", "0.025",
            "--steps", "2", "--val-steps", "2", "--epochs", "1", "--warmup", "0", "--precision", "bf16",
            "--channels-last", "--compile", "--run-dir", str(tmp_path / "fast")]  # fmt: skip
    assert main(argv) == 0
    assert (tmp_path / "fast" / "pretrain" / "best.pt").is_file()


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_trainer_optimizer_is_fused_and_steps_like_the_plain_one(kind):
    from roli.training.loop import make_optimizer, param_groups

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    plain, start = copy.deepcopy(net), copy.deepcopy(net)
    opt = make_optimizer(param_groups(net, 0.01), kind, 0.05, 0.9)
    assert all(g["fused"] for g in opt.param_groups)
    groups = param_groups(plain, 0.01)
    ref = torch.optim.SGD(groups, lr=0.05, momentum=0.9) if kind == "sgd" else torch.optim.AdamW(groups, lr=0.05)
    for _ in range(4):
        x = torch.randn(9, 7)
        for model, o in ((net, opt), (plain, ref)):
            o.zero_grad()
            model(x).square().mean().backward()
            o.step()
    for a, b in zip(net.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(net[0].weight, start[0].weight, atol=1e-3)  # the steps did move the weights
