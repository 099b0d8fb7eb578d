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
