"""The one evaluator (roli.attacks.evaluation): its outcomes are the documented definitions, computed by
independent paths; a sharded evaluation equals one process's; the stop check runs as often on every rank."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DIGITS_EPS as EPS  # noqa: E402

from roli import _dist
from roli.attacks import PGD
from roli.attacks.evaluation import Evaluation, TensorBatches, batch_seed


def _margin_ok(model, x, y) -> tuple[torch.Tensor, torch.Tensor]:
    """Correct on the clean image by a float64 copy of the model, and where its top-2 margin is not a near-tie
    (float32 rounding and BatchNorm folding may decide those either way)."""
    ref = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        logits = ref(x.double())
    top2 = logits.topk(2, dim=1).values
    return logits.argmax(1) == y, (top2[:, 0] - top2[:, 1]) > 1e-4


def test_outcomes_are_the_definitions(digits_model):
    model, x, y = digits_model
    x, y = x[:150], y[:150]
    ev = Evaluation(EPS, EPS / 4, steps=5, seed=3)
    data = TensorBatches(x, y, 64)
    out = ev.run(model, data)
    flags = out.per_example(data.parts, len(y), y.device)
    correct64, decided = _margin_ok(model, x, y)
    assert decided.sum() > 140
    assert torch.equal(flags["clean"][decided], correct64[decided])
    # PGD: correct on the clean image and on every iterate; the same attack without early stop, batch by batch
    # with the batch's own seed, breaks exactly the same examples (its random starts are drawn per batch).
    ref = []
    for i, s in enumerate(data.parts):
        attack = PGD(model, eps=EPS, step_size=EPS / 4, steps=5, keep="best", seed=batch_seed(3, i))
        res = attack.perturb(x[s], y[s])
        ref.append(~res.clean_success & ~res.success)
    assert torch.equal(flags["pgd"], torch.cat(ref))
    assert not (flags["pgd"] & ~flags["clean"]).any() and flags["pgd"].sum() < flags["clean"].sum()
    t = out.totals()
    undecided = int((~decided).sum())  # near-ties the float64 copy may decide either way
    assert abs(t["clean"] - int(correct64.sum())) <= undecided
    assert (t["n"], t["pgd"], t["autoattack"]) == (150, int(torch.cat(ref).sum()), None)


def test_sweep_counts_and_clean_only(digits_model):
    model, x, y = digits_model
    x, y = x[:100], y[:100]
    data = TensorBatches(x, y, 40)
    swept = Evaluation(EPS, EPS / 4, steps=5, pgd=False, sweep=(0.0, EPS / 2, EPS), seed=1).run(model, data)
    t = swept.totals()
    correct64, decided = _margin_ok(model, x, y)
    assert t["pgd"] is None and abs(t["clean"] - int(correct64.sum())) <= int((~decided).sum())
    zero, half, full = t["sweep"]
    assert zero == t["clean"] and zero >= half >= full  # a zero budget leaves the clean outcome
    pgd = Evaluation(EPS, EPS / 4, steps=5, seed=1).run(model, data).totals()
    assert full == pgd["pgd"]  # the sweep's full budget is the same attack, seeded per batch alike


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_equals_one_process(digits_model, monkeypatch, world):
    model, x, y = digits_model
    x, y = x[:130], y[:130]
    ev = Evaluation(EPS, EPS / 4, steps=4, seed=5)
    one = TensorBatches(x, y, 32)
    whole = ev.run(model, one).per_example(one.parts, len(y), y.device)
    summed = {k: torch.zeros(len(y), dtype=torch.int64) for k in whole}
    for rank in range(world):
        monkeypatch.setattr(_dist, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(_dist, "world", lambda: world)
        part = TensorBatches(x, y, 32)
        assert part.ids == list(range(rank, part.total, world))
        for k, v in ev.run(model, part).per_example(part.parts, len(y), y.device).items():
            summed[k] += v.to(torch.int64)  # what D.sum_flags does across processes
    for k, v in whole.items():
        assert torch.equal(summed[k].bool(), v) and summed[k].max() == 1, k


def test_stop_check_runs_as_often_on_every_rank(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(9, 3, 2, 2, generator=g), torch.randint(0, 3, (9,), generator=g)
    ev = Evaluation(0.05, 0.02, steps=2)
    calls = []
    for rank in range(2):  # 5 batches over 2 ranks: rank 0 has 3, rank 1 has 2
        monkeypatch.setattr(_dist, "rank", lambda rank=rank: rank)
        monkeypatch.setattr(_dist, "world", lambda: 2)
        count = [0]
        out = ev.run(model, TensorBatches(x, y, 2), after_batch=lambda count=count: count.__setitem__(0, count[0] + 1))
        calls.append((len(out.ids), count[0]))
    assert calls == [(3, 3), (2, 3)]  # the collective would otherwise be left waiting on rank 0

    def stop():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ev.run(model, TensorBatches(x, y, 2), after_batch=stop)
