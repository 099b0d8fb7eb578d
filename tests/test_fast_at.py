"""Single-step adversarial training (FGSM-RS, N-FGSM) and the catastrophic-overfitting guard: the attacks'
invariants and formulas, the guard on a constructed collapse (restores the last good state, switches to
PGD-k, survives an interruption), and short runs with each attack that resume after SIGKILL exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import ConstantModel
from torch import nn

from roli.attacks.fast import label, radius, training_attack
from roli.train import main
from roli.training.guard import Guard
from roli.training.loop import Interrupted, Stage, fit, make_optimizer

EPS = 8 / 255
# The published constants, written here rather than imported from the code under test: FGSM-RS steps 1.25 eps
# (Wong, Rice & Kolter 2020, Alg. 3 with alpha = 1.25 eps); N-FGSM draws noise in the 2 eps box and steps eps,
# without projection (de Jorge et al. 2022, k = 2, alpha = eps): its examples lie in the 3 eps box.
FGSM_RS_STEP, NFGSM_NOISE, NFGSM_STEP = 1.25, 2.0, 1.0
RADIUS = {"pgd": EPS, "fgsm-rs": EPS, "n-fgsm": 3 * EPS}


def _cnn(seed=0, classes=5):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, classes)).eval()  # fmt: skip


def _batch(seed=1, n=32, classes=5):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 16, 16, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("kind", ["pgd", "fgsm-rs", "n-fgsm"])
def test_examples_stay_in_their_budget_and_range_and_raise_the_loss(kind):
    model = _cnn()
    x, y = _batch()
    attack = training_attack(kind, model, EPS, 2 / 255, 7, seed=3)
    x_adv = attack(x, y)
    delta = (x_adv - x).abs().amax()
    assert float(delta) <= RADIUS[kind] + 1e-6
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    with torch.no_grad():
        assert float(F.cross_entropy(model(x_adv), y)) > float(F.cross_entropy(model(x), y)) + 1e-3
    if kind == "n-fgsm":  # no projection onto the eps-box: noise + step reach beyond eps
        assert float(delta) > 2 * EPS
    assert not any(p.grad is not None for p in model.parameters())  # input gradients only


def test_fgsm_rs_equals_its_formula():
    model = _cnn(seed=4)
    x, y = _batch(seed=5)
    attack = training_attack("fgsm-rs", model, EPS, seed=11, fold_bn=False)
    x_adv = attack(x, y)
    # The formula (Wong et al. 2020) in float64: a uniform start in the eps-box (the generator's draw), one
    # step of 1.25 eps along the gradient's sign, projected onto the eps-box and [0, 1].
    g = torch.Generator().manual_seed(11)
    noise = torch.empty_like(x).uniform_(-1.0, 1.0, generator=g)
    x0 = (x.double() + noise.double() * EPS).clamp(0, 1).float().requires_grad_(True)
    grad = torch.autograd.grad(F.cross_entropy(model(x0), y, reduction="sum"), x0)[0]
    ref = x0.double() + FGSM_RS_STEP * EPS * grad.double().sign()
    ref = torch.minimum(torch.maximum(ref, x.double() - EPS), x.double() + EPS).clamp(0, 1)
    assert torch.allclose(x_adv.double(), ref, rtol=0, atol=1e-6)
    assert label("fgsm-rs", 7) == "FGSM-RS" and label("pgd", 7) == "PGD-7"


def test_n_fgsm_equals_its_formula():
    model = _cnn(seed=6)
    x, y = _batch(seed=7)
    x_adv = training_attack("n-fgsm", model, EPS, seed=13, fold_bn=False)(x, y)
    # de Jorge et al. 2022 in float64: a uniform start in the 2 eps box, one step of eps along the gradient's
    # sign, clipped to [0, 1] only (the 3 eps box it could be projected on is never reached).
    g = torch.Generator().manual_seed(13)
    noise = torch.empty_like(x).uniform_(-1.0, 1.0, generator=g)
    x0 = (x.double() + noise.double() * NFGSM_NOISE * EPS).clamp(0, 1).float().requires_grad_(True)
    grad = torch.autograd.grad(F.cross_entropy(model(x0), y, reduction="sum"), x0)[0]
    ref = (x0.double() + NFGSM_STEP * EPS * grad.double().sign()).clamp(0, 1)
    assert torch.allclose(x_adv.double(), ref, rtol=0, atol=1e-6)
    assert float((x_adv - x).abs().max()) > 2.5 * EPS  # beyond the eps box: no projection onto it
    assert label("n-fgsm", 1) == "N-FGSM"


def test_n_fgsm_noise_is_uniform_in_twice_the_budget():
    torch.manual_seed(0)
    x = 0.3 + 0.4 * torch.rand(64, 3, 16, 16)  # away from the pixel range's ends: nothing is clipped
    y = torch.randint(0, 5, (64,))
    attack = training_attack("n-fgsm", ConstantModel(), EPS, seed=2)
    c = attack.config
    assert c.init_eps == 2 * EPS and c.step_size == EPS and c.steps == 1
    delta = attack(x, y) - x  # sign(0) = 0: no step, the start itself
    assert float(delta.abs().max()) <= 2 * EPS + 1e-6
    assert float(delta.abs().max()) > 1.99 * EPS  # fills the 2 eps box, not the eps one
    assert abs(float(delta.abs().mean()) - EPS) < 0.01 * EPS  # E|U(-2e, 2e)| = e
    assert abs(float(delta.mean())) < 0.01 * EPS


def test_single_step_attacks_refuse_l2_and_the_cli_one_line(tmp_path, capsys):
    with pytest.raises(ValueError, match="Linf attack"):
        training_attack("n-fgsm", _cnn(), 0.5, norm="l2")
    code = main(["--method", "pretrain", "--attack", "fgsm-rs", "--norm", "l2", "--eps", "0.5",
                 "--run-dir", str(tmp_path / "r")])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "fgsm-rs is a Linf attack" in err[0]
    assert not (tmp_path / "r").exists()


# -- the guard on a constructed collapse -----------------------------------------------------------------------


class _Shortcut(nn.Module):
    """Two features: a robust one (pixel 0, margin ~0.3 with noise: ~90% clean) and a non-robust one
    (pixel 1, margin 0.01 < eps, noise-free: 100% clean). Training moves `t` from the first to the second:
    clean accuracy rises to 100% while PGD accuracy collapses to 0 (the signature of catastrophic
    overfitting, made by construction)."""

    def __init__(self):
        super().__init__()
        self.t = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        a, b = x[:, 0, 0, 0] - 0.5, x[:, 0, 0, 1] - 0.5
        tt = self.t.clamp(0, 1)
        z = (1 - tt) * a + tt * 100 * b
        return torch.stack([-z, z], 1)


def _shortcut_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.full((n, 1, 2, 2), 0.5)
    x[:, 0, 0, 0] = (0.5 + (2 * y - 1) * 0.3 + 0.2 * torch.randn(n, generator=g)).clamp(0, 1)
    x[:, 0, 0, 1] = 0.5 + (2 * y - 1) * 0.01
    return x, y


def _guarded_stage(steps_per_epoch=10, epochs=2, every=2):
    model = _Shortcut()
    opt = make_optimizer([{"params": [model.t]}], "sgd", 0.004, 0.5)
    batches = [_shortcut_data(8, 100 + i) for i in range(steps_per_epoch)]

    def step(x, y):  # "training" that drifts towards the shortcut feature (momentum: optimiser state matters)
        opt.zero_grad()
        (-model.t).backward()
        opt.step()
        return 0.5, len(y)

    fallback_calls = []

    def fallback():  # PGD-k training in this construction: t moves back slowly
        fallback_calls.append(1)

        def pgd_step(x, y):
            opt.zero_grad()
            (0.1 * model.t).backward()
            opt.step()
            return 0.4, len(y)

        return pgd_step, None

    xv, yv = _shortcut_data(256, 7)
    guard = Guard(every=every, drop=0.2, x=xv[:128], y=yv[:128], eps=0.05, precision="fp32", seed=1,
                  single=lambda: (lambda x, y: x), fallback=fallback, label="FGSM-RS",
                  fallback_label="PGD-7")  # fmt: skip
    stage = Stage(name="ft", model=model, step=step, train=batches, val=(xv, yv), optimizer=opt, epochs=epochs,
                  warmup=0, attack=None, eps=0.05, step_size=0.0125, val_steps=3, guard=guard)  # fmt: skip
    return stage, fallback_calls


def test_guard_fires_on_a_constructed_collapse_and_restores_the_last_good_state(tmp_path):
    # The unguarded trajectory of t, to know the state at each step.
    ref, _ = _guarded_stage()
    trace = [float(ref.model.t.detach())]
    for x, y in ref.train:
        ref.step(x, y)
        trace.append(float(ref.model.t.detach()))
    stage, calls = _guarded_stage()
    seen = {}
    original = stage.guard.check

    def spy(st, epoch, step):
        out = original(st, epoch, step)
        seen[(epoch, step)] = (float(st.model.t.detach()), dict(st.optimizer.state[st.model.t]).get("momentum_buffer"))
        return out

    stage.guard.check = spy
    fit(stage, tmp_path / "run")
    event = stage.guard.event
    assert event is not None and event["epoch"] == 0 and calls == [1]
    good = event["restored"]
    assert good["step"] < event["step"] and event["pgd"] < event["best_pgd"] - 0.2
    # Right after the collapse the model holds the last good check's t (not the collapsed one).
    t_after, buf_after = seen[(0, event["step"])]
    assert t_after == pytest.approx(trace[good["step"]], abs=0)
    assert t_after < trace[event["step"]]
    assert buf_after is not None
    rows = [json.loads(r) for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["guard_event"] == event and "guard_event" not in rows[1]
    assert rows[1]["train_attack"].startswith("FGSM-RS -> PGD-7 (guard: epoch 0 step")
    assert stage.guard.summary() == rows[1]["train_attack"]


def _scripted_guard(readings):
    """A guard whose measurements are the given (PGD accuracy, single-step accuracy) pairs, in order, on a small
    model trained with SGD momentum (so the optimiser holds state of its own)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = make_optimizer([{"params": list(model.parameters())}], "sgd", 0.1, 0.9)
    stage = SimpleNamespace(name="ft", model=model, optimizer=opt, step="fgsm-rs step", attack="fgsm-rs")
    fallbacks = []
    guard = Guard(every=1, drop=0.2, x=torch.rand(4, 4), y=torch.zeros(4, dtype=torch.long), eps=EPS,
                  precision="fp32", seed=0, single=lambda: None,
                  fallback=lambda: fallbacks.append(1) or ("pgd step", "pgd attack"), label="FGSM-RS",
                  fallback_label="PGD-7")  # fmt: skip
    it = iter(readings)
    guard.measure = lambda m: next(it)
    return guard, stage, fallbacks


def _train_a_little(stage, seed):
    g = torch.Generator().manual_seed(seed)
    stage.optimizer.zero_grad()
    stage.model(torch.randn(8, 4, generator=g)).square().sum().backward()
    stage.optimizer.step()


@pytest.mark.parametrize(
    "readings, fires",
    [
        ([(0.6, 0.5), (0.3, 0.7)], True),  # PGD down 0.3, single-step up: the collapse signature
        ([(0.6, 0.5), (0.3, 0.5)], True),  # single-step as good as at the best check
        ([(0.6, 0.5), (0.3, 0.4)], False),  # both fall: the model got worse in general, no collapse
        ([(0.6, 0.5), (0.45, 0.9)], False),  # PGD down 0.15 < drop 0.2
        ([(0.4, 0.5), (0.6, 0.2), (0.35, 0.3)], True),  # measured against the best check (0.6, 0.2)
        ([(0.4, 0.5), (0.6, 0.6), (0.35, 0.5)], False),  # single-step below the best check's 0.6
        ([(0.5, 0.5), (0.25, 0.9)], False),  # PGD down exactly the drop (0.25 here): not more than it
        ([(0.5, 0.5), (0.5, 0.4), (0.2, 0.45)], False),  # a tie does not replace the best check: 0.45 < 0.5
    ],
)
def test_guard_fires_only_when_pgd_falls_and_single_step_does_not(readings, fires):
    guard, stage, fallbacks = _scripted_guard(readings)
    guard.drop = 0.25 if readings[0] == (0.5, 0.5) and len(readings) == 2 else 0.2
    events = [guard.check(stage, 0, i) for i in range(len(readings))]
    assert (events[-1] is not None) == fires and all(e is None for e in events[:-1])
    assert fallbacks == ([1] if fires else []) and (stage.attack == "pgd attack") == fires


def test_guard_restores_model_and_optimiser_state_but_keeps_the_learning_rate(caplog):
    guard, stage, _ = _scripted_guard([(0.6, 0.5), (0.7, 0.5), (0.2, 0.9)])
    _train_a_little(stage, 1)
    guard.check(stage, 0, 1)
    _train_a_little(stage, 2)
    guard.check(stage, 0, 2)  # the last good check: its state is what a collapse restores
    good_model = {k: v.clone() for k, v in stage.model.state_dict().items()}
    good_buffers = [stage.optimizer.state[p]["momentum_buffer"].clone() for p in stage.model.parameters()]
    for seed in (3, 4):
        _train_a_little(stage, seed)
    for g in stage.optimizer.param_groups:
        g["lr"] = 0.0123  # the schedule moved on
    assert not torch.equal(stage.model.weight, good_model["weight"])
    assert guard.check(stage, 0, 4) is not None
    for k, v in stage.model.state_dict().items():
        assert torch.equal(v, good_model[k]), k
    for p, buf in zip(stage.model.parameters(), good_buffers, strict=True):
        assert torch.equal(stage.optimizer.state[p]["momentum_buffer"], buf)
    assert [g["lr"] for g in stage.optimizer.param_groups] == [0.0123]
    assert guard.event == {"epoch": 0, "step": 4, "pgd": 0.2, "single": 0.9, "best_pgd": 0.7,
                           "restored": {"epoch": 0, "step": 2}, "from": "FGSM-RS", "to": "PGD-7"}  # fmt: skip
    assert guard.summary() == "FGSM-RS -> PGD-7 (guard: epoch 0 step 4)" and stage.attack == "pgd attack"
    assert caplog.messages == ["ft: catastrophic overfitting at epoch 0 step 4 (guard PGD-5 accuracy 0.200, best "
                               "0.700; FGSM-RS accuracy 0.900, 0.500 at the best): restored the state of epoch 0 "
                               "step 2 and continuing with PGD-7"]  # fmt: skip


def test_guard_measure_equals_an_independent_pgd5_and_single_step_count(monkeypatch):
    """measure(): accuracy under PGD-5 with step 2.5 eps / 5 from the guard's seeded random start (a float64
    reference written here), and under the training attack, on the guard's batch."""
    import roli.training.guard as guard_module

    made = []

    class Spy(guard_module.PGD):
        def __init__(self, model, **kw):
            made.append(kw)
            super().__init__(model, **kw)

    monkeypatch.setattr(guard_module, "PGD", Spy)
    torch.manual_seed(0)
    model = _cnn(seed=8).double()
    x, _ = _batch(seed=9, n=40)
    x = x.double()
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:4] = (y[:4] + 1) % 5  # a few clean mistakes
    eps = 4 / 255
    single = training_attack("fgsm-rs", model, eps, seed=3, fold_bn=False)
    guard = Guard(every=1, drop=0.2, x=x, y=y, eps=eps, precision="fp32", seed=17, single=lambda: single,
                  fallback=lambda: (None, None), label="FGSM-RS", fallback_label="PGD-7")  # fmt: skip
    pgd_acc, single_acc = guard.measure(model)
    g = torch.Generator().manual_seed(17)
    noise = torch.empty(x.shape, dtype=torch.float32).uniform_(-1.0, 1.0, generator=g)
    xa = (noise * eps + x.float()).clamp(0, 1).double()
    with torch.no_grad():
        broken = model(x).argmax(1) != y
    for it in range(6):  # 5 steps of 2.5 eps / 5; a sample counts as broken at any iterate
        xa.requires_grad_(True)
        logits = model(xa)
        broken |= logits.argmax(1) != y
        if it == 5:
            break
        grad = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xa)[0]
        xa = torch.minimum(torch.maximum(xa.detach() + 0.5 * eps * grad.sign(), x - eps), x + eps).clamp(0, 1)
    single_2 = training_attack("fgsm-rs", model, eps, seed=3, fold_bn=False)  # the same draws as the guard's
    with torch.no_grad():
        single_ok = model(single_2(x, y)).argmax(1) == y
    assert 0 < int(broken.sum()) < len(y)
    assert pgd_acc == (len(y) - int(broken.sum())) / len(y)
    # the probe as documented: PGD-5, step 2.5 eps / 5, the guard's seed, early stop, the run's precision
    assert made == [{"eps": eps, "step_size": 0.5 * eps, "steps": 5, "early_stop": True, "precision": "fp32",
                     "seed": 17}]  # fmt: skip
    assert single_acc == int(single_ok.sum()) / len(y) and single_acc < 1


def test_training_attack_settings():
    model = _cnn()
    pgd = training_attack("pgd", model, 3 / 255, 1 / 255, 4, norm="l2", seed=1)
    assert (pgd.eps, pgd.step_size, pgd.steps, pgd.norm, pgd.keep, pgd.random_start) == (3 / 255, 1 / 255, 4, "l2",
                                                                                          "last", True)  # fmt: skip
    no_start = training_attack("pgd", model, 3 / 255, 1 / 255, 4, random_start=False)
    assert no_start.random_start is False
    fgsm = training_attack("fgsm-rs", model, 3 / 255, 1 / 255, 4, random_start=False)
    assert (fgsm.eps, fgsm.step_size, fgsm.steps, fgsm.norm, fgsm.random_start) == (3 / 255, 1.25 * 3 / 255, 1,
                                                                                     "linf", True)  # fmt: skip
    nf = training_attack("n-fgsm", model, 3 / 255, 1 / 255, 4, random_start=False)
    assert (nf.eps, nf.init_eps, nf.step_size, nf.steps, nf.norm, nf.random_start) == (
        9 / 255, 6 / 255, 3 / 255, 1, "linf", True)  # fmt: skip
    assert (radius("pgd", 0.1), radius("fgsm-rs", 0.1), radius("n-fgsm", 0.1)) == (0.1, 0.1, pytest.approx(0.3))
    with pytest.raises(ValueError, match="n-fgsm is a Linf attack"):
        training_attack("n-fgsm", model, 0.5, norm="l2")
    with pytest.raises(ValueError, match="attack 'fgsm' is not one of pgd, fgsm-rs, n-fgsm"):
        training_attack("fgsm", model, 0.5)


def test_guard_never_firing_changes_nothing():
    """Checks draw no random numbers from the training and leave the model as it was."""
    a, _ = _guarded_stage(epochs=1)
    a.guard.drop = 0.999  # never fires
    b, _ = _guarded_stage(epochs=1)
    b.guard = None
    fit(a, None)
    fit(b, None)
    assert a.guard.event is None and a.guard.checks == 6
    assert torch.equal(a.model.t, b.model.t)


@pytest.mark.parametrize("how", ["crash after the collapse", "sigterm before the collapse"])
def test_guarded_run_resumes_exactly(how, tmp_path):
    ref, _ = _guarded_stage(epochs=3)
    fit(ref, tmp_path / "ref")
    ref_rows = (tmp_path / "ref" / "metrics.jsonl").read_text()
    stage, _ = _guarded_stage(epochs=3)
    batches, count = stage.train, [0]

    class Loader:  # the data, with the interruption at a chosen batch
        def __len__(self):
            return len(batches)

        def __iter__(self):
            for b in batches:
                count[0] += 1
                if how.startswith("crash") and count[0] == 15:  # epoch 1, after the collapse of epoch 0
                    raise RuntimeError("killed")
                if how.startswith("sigterm") and count[0] == 2:  # mid-epoch 0: saved with the last good state
                    os.kill(os.getpid(), signal.SIGTERM)
                yield b

    stage.train = Loader()
    with pytest.raises((RuntimeError, Interrupted)):
        fit(stage, tmp_path / "run")
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True) if how.startswith("sigterm") else None
    assert state is None or (state["step"] == 2 and state["guard"]["snapshot"] is not None)
    again, _ = _guarded_stage(epochs=3)
    fit(again, tmp_path / "run", resume=True)
    assert torch.equal(again.model.t, ref.model.t)
    assert again.guard.event == ref.guard.event

    def strip(text):
        rows = [json.loads(r) for r in text.splitlines()]
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in rows]

    assert strip((tmp_path / "run" / "metrics.jsonl").read_text()) == strip(ref_rows)


# -- short runs with each attack: complete, and resume after SIGKILL exactly ----------------------------------


def _cli(run_dir: Path, attack: str) -> list[str]:
    flags = ["--method", "roli", "--run-dir", str(run_dir), "--dataset", "digits", "--classes", "0-4",
             "--eps", "0.1", "--step-size", "0.025", "--steps", "3", "--val-steps", "3", "--epochs", "3",
             "--warmup", "1", "--batch-size", "16", "--attack", attack, "--guard-every", "7",
             "--random-backbone"]  # fmt: skip
    return [sys.executable, "-m", "roli.train", *flags]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _rows(run: Path, stage: str):
    path = run / stage / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "seconds")} for r in rows]


@pytest.mark.parametrize("attack", ["fgsm-rs", "n-fgsm"])
def test_each_attack_runs_and_resumes_after_sigkill_exactly(attack, tmp_path):
    ref = tmp_path / "ref"
    out = subprocess.run(_cli(ref, attack), capture_output=True, text=True, timeout=600, env=_env())
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((ref / "results.json").read_text())
    assert res["alp"]["val"]["train_attack"].startswith(label(attack, 3))
    assert "train attack" in out.stdout and label(attack, 3) in out.stdout
    assert _rows(ref, "roli-ft")[0]["guard_checks"] >= 2

    run = tmp_path / "run"
    proc = subprocess.Popen(_cli(run, attack), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and len(_rows(run, "roli-ft")) < 1:
        time.sleep(0.05)
    time.sleep(0.1)  # into the finetuning stage's second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert "RoLI-full" not in json.loads((run / "results.json").read_text())  # killed inside the finetuning
    out = subprocess.run([sys.executable, "-m", "roli.train", "--resume", str(run)], capture_output=True, text=True,
                         timeout=600, env=_env())  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((run / "results.json").read_text()) == res
    for stage in ("alp", "roli-ft"):
        assert _rows(run, stage) == _rows(ref, stage)


# -- no host synchronisation inside a training step --------------------------------------------------------------


@pytest.mark.parametrize("kind", ["pgd", "fgsm-rs", "n-fgsm"])
def test_training_steps_never_synchronise_with_the_host(kind, monkeypatch):
    """A training step (the attack with deferred checks, forward, backward, update) reads no value back to the
    host: no .item(), float(), int(), bool() or .tolist() of a tensor. On a GPU each of those would stall
    the queue; the trainer reads its sums and flags once per SYNC_STEPS steps."""
    from roli.features.alp_step import alp_step
    from roli.models import apply_peft, create_classifier
    from roli.training.loop import ft_step

    torch.manual_seed(0)
    model = create_classifier("roli.models.small:small_cnn", 5, in_chans=3)
    x, y = torch.rand(16, 3, 16, 16), torch.randint(0, 5, (16,))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    attack = training_attack(kind, model, EPS, 2 / 255, 3, seed=0, deferred=True)
    ft_step(model, attack, opt, x, y)  # warm-up (lazy initialisation may read values once)
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _original=original, _name=name, **k):
            reads.append(_name)
            return _original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    loss, correct = ft_step(model, attack, opt, x, y)
    apply_peft(model, "linear")
    alp_step(model, attack, torch.optim.SGD(model.head.parameters(), lr=0.01), x, y)
    bad = attack.pop_invalid()
    monkeypatch.undo()
    assert reads == []
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0 and 0 <= int(correct) <= 16
    assert bad is not None and not bool(bad)
    # The deferred flag catches what the synchronous checks would have refused.
    attack(x.clone().fill_(2.0), y)
    assert bool(attack.pop_invalid())


def test_guard_load_restores_the_saved_snapshot_not_the_current_model():
    """A run resumed mid-epoch restores, on a later collapse, the last good state it saved (not the model it
    resumed with)."""
    first, stage, _ = _scripted_guard([(0.6, 0.5)])
    _train_a_little(stage, 1)
    first.check(stage, 0, 1)
    saved = {k: v.clone() for k, v in stage.model.state_dict().items()}
    state = first.state(with_snapshot=True)
    _train_a_little(stage, 2)  # the model moves on after the save (resumed from a later last.pt)
    resumed, _, _ = _scripted_guard([(0.1, 0.9)])
    resumed.load(state, stage)
    assert resumed.check(stage, 0, 5) is not None
    for k, v in stage.model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_guard_load_without_snapshot_takes_the_resumed_state():
    """A save at an epoch end carries no snapshot (the saved model is the last good state): the resumed guard
    takes the model it resumes with as its last good state."""
    first, stage, _ = _scripted_guard([(0.6, 0.5)])
    first.check(stage, 0, 1)
    state = first.state(with_snapshot=False)
    assert state["snapshot"] is None
    _train_a_little(stage, 2)
    resumed_with = {k: v.clone() for k, v in stage.model.state_dict().items()}
    resumed, _, _ = _scripted_guard([(0.1, 0.9)])
    resumed.load(state, stage)
    _train_a_little(stage, 3)
    assert resumed.check(stage, 1, 5) is not None
    for k, v in stage.model.state_dict().items():
        assert torch.equal(v, resumed_with[k]), k


def test_first_images_takes_the_first_n_of_a_tensor_pair_or_of_batches():
    from roli.training.guard import first_images

    x, y = torch.arange(40.0).view(10, 4), torch.arange(10)
    fx, fy = first_images((x, y), 3)
    assert torch.equal(fx, x[:3]) and torch.equal(fy, y[:3])
    batches = [(x[0:4], y[0:4]), (x[4:8], y[4:8]), (x[8:], y[8:])]
    fx, fy = first_images(batches, 6)
    assert torch.equal(fx, x[:6]) and torch.equal(fy, y[:6])
    fx, fy = first_images(batches, 50)  # fewer than asked: all of them
    assert torch.equal(fx, x) and torch.equal(fy, y)


def test_guard_spec_checks_once_and_names_the_attacks_it_watches():
    from roli._cli import BadValue
    from roli.config import TrainConfig
    from roli.specs import GuardSpec

    on, off = GuardSpec(), GuardSpec(every=0)
    assert [on.watches(k) for k in ("pgd", "fgsm-rs", "n-fgsm", "none")] == [False, True, True, False]
    assert not off.watches("fgsm-rs")
    for bad, message in ((dict(drop=1.0), "guard-drop: must be a fraction"), (dict(every=-1), "guard-every: must"),
                         (dict(images=0), "guard-images: must be an integer >= 1")):  # fmt: skip
        with pytest.raises(BadValue, match=message):
            GuardSpec(**bad)
    with pytest.raises(BadValue, match="guard-drop: must be a fraction in"):
        TrainConfig(guard_drop=0)  # the trainer's config checks it through the spec
    assert TrainConfig(guard_every=7, attack="fgsm-rs").guard_spec == GuardSpec(7, 0.2, 128)
