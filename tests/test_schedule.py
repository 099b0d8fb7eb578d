"""The warmup-cosine schedule of the RoLI reference (the VPT codebase's WarmupCosineSchedule, stepped per
epoch): values from a hand-computed table, and the learning rate the training loop applies at each epoch."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from roli.schedule import warmup_cosine
from roli.training.loop import Stage, fit, make_optimizer

# factor(epoch) = epoch / warmup during warmup, then 0.5 (1 + cos(pi (epoch - warmup) / (epochs - warmup))),
# evaluated by hand: cos(pi/10) = 0.9510565163, cos(pi/5) = 0.8090169944, cos(2 pi/5) = 0.3090169944.
TABLE = [
    # (epochs, warmup, epoch, factor)
    (20, 10, 0, 0.0),  # the reference's epoch 0 has lr 0
    (20, 10, 1, 0.1),
    (20, 10, 9, 0.9),
    (20, 10, 10, 1.0),
    (20, 10, 11, 0.9755282581),
    (20, 10, 15, 0.5),
    (20, 10, 19, 0.0244717419),
    (5, 0, 0, 1.0),
    (5, 0, 1, 0.9045084972),
    (5, 0, 2, 0.6545084972),
    (5, 0, 4, 0.0954915028),
    (3, 1, 0, 0.0),
    (3, 1, 1, 1.0),
    (3, 1, 2, 0.5),
]


@pytest.mark.parametrize("epochs, warmup, epoch, factor", TABLE)
def test_warmup_cosine_values(epochs, warmup, epoch, factor):
    assert warmup_cosine(epoch, epochs, warmup) == pytest.approx(factor, abs=1e-9)


def test_warmup_cosine_refuses_nonsense():
    with pytest.raises(ValueError, match="epochs >= 1 and warmup >= 0"):
        warmup_cosine(0, 0, 0)
    with pytest.raises(ValueError, match="epochs >= 1 and warmup >= 0"):
        warmup_cosine(0, 5, -1)


def test_the_loop_applies_the_schedule_per_epoch(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    opt = make_optimizer([{"params": list(model.parameters())}], "sgd", 0.2, 0.9)
    lrs = []

    def step(x, y):
        lrs.append(opt.param_groups[0]["lr"])
        return torch.tensor(1.0), torch.tensor(0)

    g = torch.Generator().manual_seed(1)
    data = [(torch.rand(4, 3, 2, 2, generator=g), torch.randint(0, 3, (4,), generator=g)) for _ in range(2)]
    stage = Stage(name="ft", model=model, step=step, train=data, val=data[0], optimizer=opt, epochs=5, warmup=2,
                  attack=None, eps=0.01, step_size=0.005, val_steps=1)  # fmt: skip
    fit(stage, tmp_path / "run")
    want = [0.0, 0.1, 0.2, 0.15, 0.05]  # 0.2 x (0, 1/2, 1, (1 + cos(pi/3)) / 2, (1 + cos(2 pi/3)) / 2)
    assert lrs == pytest.approx([w for w in want for _ in range(2)], abs=1e-12)
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx(want, abs=1e-12)
