"""PGD, eps-sweep and AutoAttack: invariants on random models, parity with torchattacks, strength on a
small model adversarially trained inside the test (scikit-learn digits)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import DIGITS_EPS as EPS  # noqa: E402
from conftest import ConstantModel
from torch import nn

from roli.attacks import PGD, clean_correct, dlr_loss, eps_sweep, run_autoattack
from roli.models import NormalizedModel


def random_model(seed=0, classes=10, dtype=torch.float32):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Dropout(0.2),
                        nn.Flatten(), nn.Linear(8 * 8 * 8, classes))  # fmt: skip
    return NormalizedModel(net, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)).to(dtype).train()


def batch(seed=1, n=24, classes=10, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g).to(dtype), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_perturbation_within_budget_and_range(norm, per_sample):
    model = random_model()
    x, y = batch()
    eps = torch.linspace(0.0, 0.2, len(y)) if per_sample else 0.1
    if norm == "l2":
        eps = eps * 5
    step = eps / 4 if per_sample else eps / 4
    x_adv = PGD(model, eps=eps, step_size=step if not per_sample else step + 1e-3, steps=7, norm=norm, seed=0)(x, y)
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(1).values if norm == "linf" else delta.norm(dim=1)
    limit = eps if per_sample else torch.full((len(y),), float(eps))
    assert bool((size <= limit * (1 + 1e-5) + 1e-7).all())
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    if per_sample:
        assert torch.equal(x_adv[0], x[0])  # eps = 0


def test_robust_accuracy_not_above_clean_and_loss_goes_up():
    model = random_model()
    x, y = batch(n=64)
    model.eval()
    with torch.no_grad():
        start_loss = F.cross_entropy(model(x), y, reduction="none")
    res = PGD(model, eps=0.05, step_size=0.01, steps=10, seed=0, keep="last", restarts=1).perturb(x, y)
    with torch.no_grad():
        logits = model(res.x_adv)
    assert float(F.cross_entropy(logits, y, reduction="none").mean()) > float(start_loss.mean())
    best = PGD(model, eps=0.05, step_size=0.01, steps=10, seed=0).perturb(x, y)
    clean = clean_correct(model, x, y)
    assert bool(best.success[~clean].all())  # clean mistakes count as broken (the clean image is an iterate)
    # success is what the returned images do: each broken sample's image is misclassified, every other one
    # is still classified correctly, and the attack broke correctly classified samples.
    with torch.no_grad():
        wrong = model(best.x_adv).argmax(1) != y
    assert torch.equal(wrong, best.success)
    assert int((clean & best.success).sum()) > 0


def test_seeded_runs_identical_and_seeds_differ():
    model = random_model()
    x, y = batch()
    a = PGD(model, eps=0.1, steps=3, seed=5, restarts=2)(x, y)
    b = PGD(model, eps=0.1, steps=3, seed=5, restarts=2)(x, y)
    c = PGD(model, eps=0.1, steps=3, seed=6, restarts=2, keep="last")(x, y)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_rng_state_continues_the_stream_on_the_generators_device():
    model = random_model()
    x, y = batch()
    attack = PGD(model, eps=0.1, steps=2, seed=5, keep="last")
    assert attack.rng_state() == {"device": None, "state": None}  # nothing drawn yet: the seed decides
    attack(x, y)
    gen = attack._gen
    saved = attack.rng_state()
    assert attack._gen is gen and saved["device"] == str(gen.device)  # reading never replaces the generator
    after = attack(x, y)
    resumed = PGD(model, eps=0.1, steps=2, seed=5, keep="last")
    resumed.set_rng_state(saved)
    assert resumed._gen.device == gen.device
    assert torch.equal(resumed(x, y), after)  # the stream continues where it was saved ...
    assert not torch.equal(PGD(model, eps=0.1, steps=2, seed=5, keep="last")(x, y), after)  # ... not from the seed
    legacy = PGD(model, eps=0.1, steps=2, seed=5, keep="last")
    legacy.set_rng_state(saved["state"])  # runs saved before rng_state() stored the bare CPU state
    assert torch.equal(legacy(x, y), after)
    unseeded = PGD(model, eps=0.1, steps=2, seed=None)
    assert unseeded.rng_state() is None


def test_no_parameter_gradient_and_mode_restored():
    model = random_model()
    model.train()
    frozen = model.model[0].bias
    frozen.requires_grad_(False)  # a user's frozen parameter must stay frozen, the others trainable
    x, y = batch()
    PGD(model, eps=0.1, steps=3, restarts=2, precision="bf16")(x, y)
    assert all(p.grad is None for p in model.parameters())
    assert model.training and all(m.training for m in model.modules())
    assert not frozen.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "model.0.bias")


def test_mode_restored_after_exception():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3 * 8 * 8, 10)
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("boom")
            return self.lin(x.flatten(1))

    model = Boom().train()
    x, y = batch()
    with pytest.raises(RuntimeError, match="boom"):
        PGD(model, eps=0.1, steps=5)(x, y)
    assert model.training and model.lin.weight.requires_grad and model.lin.weight.grad is None


def test_ddp_model_is_attacked_through_its_module(monkeypatch):
    from roli.attacks import unwrap

    inner = random_model()

    class FakeDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module):  # no process group: only the unwrapping is under test
            nn.Module.__init__(self)
            self.module = module

        def forward(self, *a, **k):
            raise AssertionError("the DDP wrapper must not be called by an attack")

    wrapped = FakeDDP(inner)
    assert unwrap(wrapped) is inner
    x, y = batch()
    x_adv = PGD(wrapped, eps=0.1, steps=2, seed=0)(x, y)
    assert torch.equal(x_adv, PGD(inner, eps=0.1, steps=2, seed=0)(x, y))


def test_parity_with_torchattacks():
    torchattacks = pytest.importorskip("torchattacks")
    model = random_model()
    x, y = batch(n=32)
    ours = PGD(model, eps=8 / 255, step_size=2 / 255, steps=10, random_start=False, keep="last")(x, y)
    model.eval()
    theirs = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=False)(x, y)
    assert (ours - theirs).abs().max().item() <= 1e-6


def test_targeted_and_dlr():
    model = random_model().eval()
    x, y = batch(n=32)
    target = (y + 1) % 10
    res = PGD(model, eps=0.3, step_size=0.05, steps=20, targeted=True, seed=0).perturb(x, y, target)
    with torch.no_grad():
        hit = model(res.x_adv).argmax(1) == target
    assert torch.equal(hit, res.success) and float(hit.float().mean()) > 0.5
    logits = torch.randn(5, 10)
    yy = torch.randint(0, 10, (5,))
    z = logits.sort(1, descending=True).values
    other = torch.stack([torch.cat([logits[i, :c], logits[i, c + 1 :]]).max() for i, c in enumerate(yy)])
    want = -(logits[torch.arange(5), yy] - other) / (z[:, 0] - z[:, 2] + 1e-12)
    torch.testing.assert_close(dlr_loss(logits, yy), want)
    x_adv = PGD(model, eps=0.05, steps=5, loss="dlr", seed=0)(x, y)
    assert float((x_adv - x).abs().max()) <= 0.05 + 1e-7


def test_early_stop_same_accuracy_less_work(digits_model):
    model, x, y = digits_model
    model64 = NormalizedModel(model.model, None, None)
    import copy

    model64 = copy.deepcopy(model64).double()
    x64 = x.double()
    calls = {"n": 0}
    hook = model64.register_forward_hook(lambda m, i, o: calls.__setitem__("n", calls["n"] + len(i[0])))
    plain = PGD(model64, eps=EPS, step_size=EPS / 8, steps=10, restarts=2, seed=3).perturb(x64, y)
    work_plain, calls["n"] = calls["n"], 0
    early = PGD(model64, eps=EPS, step_size=EPS / 8, steps=10, restarts=2, seed=3, early_stop=True).perturb(x64, y)
    hook.remove()
    assert int(plain.success.sum()) == int(early.success.sum())
    assert calls["n"] < work_plain


def test_strength_vs_torchattacks(digits_model):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = digits_model
    clean = clean_correct(model, x, y)
    ours = PGD(model, eps=EPS, step_size=EPS / 8, steps=20, restarts=3, seed=0).perturb(x, y)
    ours_acc = float((clean & ~ours.success).float().mean())
    torch.manual_seed(0)
    x_ta = torchattacks.PGD(model, eps=EPS, alpha=EPS / 8, steps=20)(x, y)
    with torch.no_grad():
        ta_acc = float((model(x_ta).argmax(1) == y).float().mean())
    assert ours_acc <= ta_acc + 0.005, (ours_acc, ta_acc)
    assert 0.3 < ours_acc < float(clean.float().mean())  # a robust model, and the attack does work


@pytest.mark.slow
def test_autoattack_standard_not_weaker_than_pgd(digits_model):
    model, x, y = digits_model
    clean = clean_correct(model, x, y)
    ours = PGD(model, eps=EPS, step_size=EPS / 8, steps=20, restarts=3, seed=0).perturb(x, y)
    pgd_acc = float((clean & ~ours.success).float().mean())
    aa = run_autoattack(model, (x, y), EPS, version="standard")
    assert set(aa.per_attack) == {"apgd-ce", "apgd-t", "fab-t", "square"}
    assert aa.robust_accuracy <= pgd_acc, (aa.robust_accuracy, pgd_acc)
    assert float((aa.x_adv - x).abs().max()) <= EPS + 1e-6


def test_autoattack_custom_with_resumable_state(digits_model, tmp_path):
    model, x, y = digits_model
    x, y = x[:64], y[:64]
    state = tmp_path / "aa_state.pt"
    attacks = ["apgd-ce", "apgd-dlr"]
    full = run_autoattack(model, (x, y), EPS, version="custom", attacks=attacks)
    assert list(full.per_attack) == attacks
    assert full.robust_accuracy <= full.clean_accuracy and full.robust_accuracy == full.per_attack["apgd-dlr"]
    assert float((full.x_adv - x).abs().max()) <= EPS + 1e-6
    # An evaluation interrupted after its first attack resumes from the state file and runs only the rest.
    import pyautoattack

    calls = []
    original = pyautoattack.AutoAttack.run_standard_evaluation

    def interrupted(self, *args, **kwargs):
        calls.append(list(self.attacks_to_run))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    pyautoattack.AutoAttack.run_standard_evaluation = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            run_autoattack(model, (x, y), EPS, version="custom", attacks=attacks, state_path=state)
        resumed = run_autoattack(model, (x, y), EPS, version="custom", attacks=attacks, state_path=state)
    finally:
        pyautoattack.AutoAttack.run_standard_evaluation = original
    assert calls == [["apgd-ce"], ["apgd-dlr"], ["apgd-dlr"]]
    assert resumed.per_attack == full.per_attack and torch.equal(resumed.robust, full.robust)
    with pytest.raises(ValueError, match="made for another evaluation"):
        run_autoattack(model, (x, y), EPS * 2, version="custom", attacks=attacks, state_path=state)
    # The state is bound to the images and labels too: other pixels (one changed by one grey level), or
    # the same images with other labels, are another evaluation.
    x_other = x.clone()
    x_other[0, 0, 0, 0] = (x_other[0, 0, 0, 0] + 1 / 255) % 1
    y_other = y.roll(1)
    for xx, yy in ((x_other, y), (x, y_other)):
        with pytest.raises(ValueError, match="made for another evaluation"):
            run_autoattack(model, (xx, yy), EPS, version="custom", attacks=attacks, state_path=state)
    with pytest.raises(ValueError, match="attacks"):
        run_autoattack(model, (x, y), EPS, version="standard", attacks=["apgd-ce"])


def test_eps_sweep_equals_separate_runs(digits_model):
    model, x, y = digits_model
    x, y = x[:80], y[:80]
    budgets = [0.0, 0.05, 0.1, 0.2]
    sweep = eps_sweep(model, (x, y), budgets, steps=5, random_start=False)
    clean = clean_correct(model, x, y)
    for e in budgets:
        if e == 0:
            assert sweep[e] == pytest.approx(float(clean.float().mean()))
            continue
        res = PGD(model, eps=e, step_size=e / 4, steps=5, random_start=False).perturb(x, y)
        assert sweep[e] == pytest.approx(float((clean & ~res.success).float().mean()), abs=1 / 80 + 1e-9)
    values = [sweep[e] for e in budgets]
    assert values == sorted(values, reverse=True)


@pytest.mark.parametrize(
    "kwargs, call, pattern",
    [
        (dict(eps=-0.1), None, "eps must be >= 0"),
        (dict(step_size=0.0), None, "step_size must be > 0"),
        (dict(steps=-1), None, "steps must be an integer >= 0"),
        (dict(restarts=0), None, "restarts must be an integer >= 1"),
        (dict(norm="l1"), None, "norm must be"),
        (dict(precision="fp64"), None, "precision must be one of"),
        (dict(), lambda x, y: (x * 2, y), r"images must lie in \[0, 1\]"),
        (dict(), lambda x, y: ((x * 255).to(torch.uint8), y), "images must be a floating-point tensor"),
        (dict(), lambda x, y: (x, y + 10), r"labels must be < the number of classes \(10\)"),
        (dict(), lambda x, y: (x, y - 20), "y must be >= 0"),
        (dict(), lambda x, y: (x, y.float()), "y must be an integer tensor"),
        (dict(), lambda x, y: (x, y[:-1]), r"y must have shape \(24,\)"),
        (dict(targeted=True), None, "targeted PGD needs target labels"),
    ],
)
def test_bad_input(kwargs, call, pattern):
    model = random_model()
    x, y = batch()
    with pytest.raises(ValueError, match=pattern):
        attack = PGD(model, **{"eps": 0.1, **kwargs})
        if call is not None:
            x, y = call(x, y)
        attack(x, y)


def test_settings_are_one_frozen_validated_config():
    from dataclasses import FrozenInstanceError

    from roli.attacks import PGDConfig

    model = random_model()
    x, y = batch()
    config = PGDConfig(eps=0.05, step_size=0.02, steps=3, seed=4, keep="last")
    attack = PGD(model, config)
    assert attack.config is config and (attack.eps, attack.steps, attack.keep) == (0.05, 3, "last")
    with pytest.raises(AttributeError, match="fixed when the attack is built"):
        attack.steps = 7
    with pytest.raises(FrozenInstanceError):
        config.steps = 7
    with pytest.raises(ValueError, match="restarts must be an integer >= 1"):
        PGDConfig(restarts=0)
    with pytest.raises(ValueError, match="restarts must be an integer >= 1"):
        PGD(model, config, restarts=0)  # an override is validated as the config is
    longer = PGD(model, config, steps=6)  # a variant: the override wins, the rest is the config's
    assert (longer.steps, longer.eps, config.steps) == (6, 0.05, 3)
    same = PGD(model, eps=0.05, step_size=0.02, steps=3, seed=4, keep="last")
    torch.testing.assert_close(attack(x, y), same(x, y), rtol=0, atol=0)
    assert not torch.equal(longer(x, y), same(x, y))
    attack.reseed(9)  # the running seed is the attack's own: per-batch seeds in evaluations
    assert attack.seed == 9 and config.seed == 4


def test_graph_module_takes_a_loop_not_the_attacks_privates():
    import inspect

    from roli.attacks import _graph

    source = inspect.getsource(_graph)
    assert "._run" not in source and "self.attack" not in source
    model = random_model()
    x, y = batch()
    plain = PGD(model, eps=0.05, step_size=0.02, steps=3, seed=2, keep="last")
    graphed = PGD(model, eps=0.05, step_size=0.02, steps=3, seed=2, keep="last", cuda_graph=True)
    torch.testing.assert_close(graphed(x, y), plain(x, y), rtol=0, atol=0)  # off CUDA: the same loop, run


def test_non_finite_logits_rejected():
    model = random_model()
    model.model[-1].bias.data[0] = float("nan")
    x, y = batch()
    with pytest.raises(ValueError, match="non-finite logits"):
        PGD(model, eps=0.1, steps=2)(x, y)


@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("memory_format", ["auto", "channels_last", "contiguous"])
def test_memory_format_keeps_caller_layout_and_result(layout, memory_format):
    model = random_model().eval()
    x, y = batch(n=16)
    x_in = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    kw = dict(eps=0.05, step_size=0.01, steps=5, random_start=False, keep="last")
    out = PGD(model, memory_format=memory_format, **kw)(x_in, y)
    want = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=want)
    ref = PGD(model, memory_format="contiguous", **kw)(x, y)
    # Convolutions may sum in another order per layout: a sign can flip where a gradient is ~0.
    assert float((out != ref).float().mean()) < 1e-3
    assert float((out - x).abs().max()) <= 0.05 + 1e-7


# -- restarts and the random start, against an independent float64 reference -----------------------------------


def _pgd_reference(model, x, y, eps, step, steps, restarts, seed):
    """Plain Linf PGD written from Madry et al. (2018), in float64: each restart starts from a uniform draw in
    the eps-box (one batch-sized float32 draw of the generator per restart, as roli.ops.pgd_init documents),
    takes `steps` signed-gradient steps with projection; a sample is broken if its clean image or any iterate
    of any restart is misclassified."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        broken = model(x).argmax(1) != y
    for _ in range(restarts):
        noise = torch.empty(x.shape, dtype=torch.float32).uniform_(-1.0, 1.0, generator=g)
        xa = (noise * eps + x.float()).clamp(0, 1).double()
        for it in range(steps + 1):
            xa.requires_grad_(True)
            logits = model(xa)
            broken |= logits.argmax(1) != y
            if it == steps:
                break
            grad = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xa)[0]
            xa = torch.minimum(torch.maximum(xa.detach() + step * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return broken


def test_restarts_break_the_union_of_independent_runs():
    model = random_model(seed=3).eval().double()
    x = batch(seed=4, n=96)[0].double()  # float32 values: the float32 start and the float64 steps see the same images
    with torch.no_grad():
        y = model(x).argmax(1)  # every clean image correct: only the attack breaks samples
    eps, step, steps = 0.02, 0.01, 2  # a weak attack, so that the restarts matter
    runs = {r: PGD(model, eps=eps, step_size=step, steps=steps, restarts=r, seed=9, fold_bn=False).perturb(x, y)
            for r in (1, 3)}  # fmt: skip
    for r, res in runs.items():
        ref = _pgd_reference(model, x, y, eps, step, steps, r, seed=9)
        assert torch.equal(res.success, ref), r
    assert int(runs[3].success.sum()) > int(runs[1].success.sum())


def test_plain_pgd_random_start_is_uniform_in_the_budget():
    torch.manual_seed(0)
    x = 0.3 + 0.4 * torch.rand(64, 3, 16, 16)  # away from the pixel range's ends: nothing is clipped
    y = torch.randint(0, 5, (64,))
    eps = 8 / 255
    delta = PGD(ConstantModel(), eps=eps, steps=1, keep="last", seed=2)(x, y) - x
    assert float(delta.abs().max()) <= eps + 1e-6
    assert float(delta.abs().max()) > 0.99 * eps  # fills the eps box
    assert abs(float(delta.abs().mean()) - eps / 2) < 0.01 * eps  # E|U(-e, e)| = e / 2
    assert abs(float(delta.mean())) < 0.01 * eps
    no_start = PGD(ConstantModel(), eps=eps, steps=1, keep="last", random_start=False)(x, y)
    assert torch.equal(no_start, x)


@pytest.mark.parametrize("options", [dict(keep="best"), dict(early_stop=True), dict(keep="last")])
def test_clean_success_is_the_clean_images_outcome(options):
    """Where the attack evaluates the clean image (keep="best", early_stop) it reports its outcome, so an
    evaluation needs no second clean forward; plain PGD (keep="last") evaluates nothing and says None."""
    model = random_model(seed=5).eval()
    x, y = batch(seed=6, n=40)
    res = PGD(model, eps=0.05, step_size=0.01, steps=3, seed=0, fold_bn=False, **options).perturb(x, y)
    if options.get("keep") == "last":
        assert res.clean_success is None and res.success is None
        return
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    assert 0 < int(wrong.sum()) < len(y) and torch.equal(res.clean_success, wrong)
    assert bool(res.success[wrong].all())


def test_attack_mode_follows_a_model_changed_after_first_use():
    """attack_mode keeps its walk over a model's modules between calls; a module or parameter added later (a
    replaced head, PEFT branches) is still put in eval mode and frozen, and every flag comes back as it was."""
    from roli.attacks import attack_mode

    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    model[0].eval()  # mixed modes: restored exactly
    model[0].bias.requires_grad_(False)
    with attack_mode(model):
        pass
    model.add_module("extra", nn.Sequential(nn.Dropout(0.3), nn.Linear(4, 2)))
    model.extra.register_parameter("gate", nn.Parameter(torch.zeros(2)))
    before = ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()])
    with attack_mode(model) as inner:
        assert not any(m.training for m in inner.modules())
        assert not any(p.requires_grad for p in inner.parameters())
    assert ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]) == before
    assert before[0] == [True, False, True, True, True, True] and before[1] == [True, False, True, True, True]


def test_autoattack_cross_checks():
    """The checks a finished AutoAttack evaluation gets: AutoAttack's own Square check on the totals (which
    attack-by-attack calls bypass), AutoAttack not weaker than PGD, clean accuracies that agree."""
    from roli.attacks.autoattack import cross_check

    ok = {"apgd-ce": 0.50, "apgd-t": 0.48, "fab-t": 0.48, "square": 0.48}
    assert cross_check(1000, 0.8, 0.8, 0.48, ok, pgd=0.49) == []
    square = cross_check(1000, 0.8, 0.8, 0.47, {**ok, "square": 0.47}, pgd=0.49)
    assert len(square) == 1 and square[0].startswith("AutoAttack: Square Attack has decreased the robust accuracy")
    weaker = cross_check(1000, 0.8, 0.8, 0.48, ok, pgd=0.465)
    assert len(weaker) == 1 and weaker[0].startswith("AutoAttack robust accuracy 48.00% is above PGD's 46.50%")
    assert cross_check(1000, 0.8, 0.8, 0.48, ok, pgd=0.475) == []  # within 1 point
    clean = cross_check(1000, 0.8, 0.795, 0.48, ok)
    assert len(clean) == 1 and "clean accuracy 79.50% differs from the evaluation's 80.00%" in clean[0]
    assert cross_check(1000, 0.8, 0.799, 0.48, ok) == []  # one image of 1000: float rounding of a folded model


def test_autoattack_own_warnings_reach_roli_log(caplog):
    """AutoAttack's own checks (here: a randomised model) are logged by roli, one line each, prefixed."""
    torch.manual_seed(0)

    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3 * 8 * 8, 5)

        def forward(self, x):
            return self.fc(x.flatten(1)) + 0.5 * torch.randn(x.shape[0], 5)

    x, y = batch(seed=2, n=8, classes=5)
    with caplog.at_level("WARNING", logger="roli.autoattack"):
        run_autoattack(Noisy().eval(), (x, y), 0.03, version="custom", attacks=["apgd-ce"], batch_size=8)
    lines = [r.getMessage() for r in caplog.records if r.name == "roli.autoattack"]
    assert lines and all(line.startswith("AutoAttack: ") for line in lines)
    assert any("randomized" in line for line in lines), lines
