"""What the paper's rows actually trained, reproduced on purpose: the reference's PEFT inits (--peft-init
reference) per method, model family and role, what can receive a gradient, the learning rate that follows the
batch, and the reference's PGD scoring next to roli's. Expected values are written here from the reference's
code (DongXzz/RoLI: src/models/vit_lora, vit_adapter, src/adv_func.py), never taken from roli's helpers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_SWIN
from test_configs import CONFIGS, _data

from roli.models import apply_peft, create_classifier, inert_parameters, what_trains

VIT = dict(img_size=32, patch_size=4, depth=2, embed_dim=24, num_heads=2)
SWIN = dict(img_size=32, window_size=2, embed_dim=24, depths=(1, 1), num_heads=(1, 2))
FAMILIES = {"swin": ("swin_tiny_patch4_window7_224", SWIN), "vit": ("vit_tiny_patch16_224", VIT)}


def _model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    name, kw = FAMILIES[family]
    return create_classifier(name, 5, **kw)


def _tensors(model, part: str) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if part in n}


def _kaiming_uniform_a_sqrt5(t: torch.Tensor) -> bool:
    """nn.Linear's default weight init (kaiming_uniform_, a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1 / math.sqrt(t.shape[1])
    return bool(t.abs().max() <= bound and t.abs().max() > 0.5 * bound and t.std() > 0.3 * bound)


@pytest.mark.parametrize("family", ["swin", "vit"])
@pytest.mark.parametrize("role", ["roli", "ranli"])
def test_lora_reference_init_per_family_and_role(family, role):
    m = _model(family)
    apply_peft(m, "lora", peft_init="reference", role=role)
    a, b = _tensors(m, "lora_A"), _tensors(m, "lora_B")
    assert len(a) == len(b) == 2 * 2 and all(not t.any() for t in b.values())  # 2 blocks x (q, v); B zero always
    if family == "swin" and role == "roli":  # the Swin RoLI configs' ZEROINIT: A = B = 0
        assert all(not t.any() for t in a.values())
    else:  # Swin RanLI, and the reference's ViT (it ignores ZEROINIT): A kaiming-uniform
        assert all(_kaiming_uniform_a_sqrt5(t) for t in a.values())
    standard = _model(family)
    apply_peft(standard, "lora", role=role)
    assert all(_kaiming_uniform_a_sqrt5(t) for t in _tensors(standard, "lora_A").values())


@pytest.mark.parametrize("family", ["swin", "vit"])
@pytest.mark.parametrize("role", ["roli", "ranli"])
def test_adapter_reference_init_is_all_zero_and_standard_has_a_random_down(family, role):
    m = _model(family)
    apply_peft(m, "adapter", peft_init="reference", role=role)
    parts = {n: p for n, p in m.named_parameters() if ".down." in n or ".up." in n}
    assert len(parts) == 4 * 2 and all(not p.any() for p in parts.values())  # down/up weight and bias, 2 blocks
    s = _model(family)
    apply_peft(s, "adapter", role=role)
    for n, p in s.named_parameters():
        if ".down.weight" in n:
            assert _kaiming_uniform_a_sqrt5(p), n
        if ".up." in n:
            assert not p.any(), n


@pytest.mark.parametrize("method", ["vpt", "bias", "full"])
def test_methods_whose_reference_init_is_the_standard_one(method):
    a, b = _model("swin", 3), _model("swin", 3)
    torch.manual_seed(1)
    apply_peft(a, method, peft_init="reference")
    torch.manual_seed(1)
    apply_peft(b, method)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_reference_init_is_refused_where_the_reference_has_none():
    with pytest.raises(ValueError, match="vpt-gated is roli's own method"):
        apply_peft(_model("vit"), "vpt-gated", peft_init="reference")
    cnn = create_classifier("roli.models.small:small_cnn", 5, in_chans=1)
    with pytest.raises(ValueError, match="LoRA exists for Swin and ViT only"):
        apply_peft(cnn, "lora", peft_init="reference")
    with pytest.raises(ValueError, match="peft_init must be one of"):
        apply_peft(_model("vit"), "lora", peft_init="paper")


def _steps(model, optimizer: str, n: int) -> dict[str, torch.Tensor]:
    """n optimisation steps on fresh random images; returns the trainable tensors before them."""
    from roli.training.loop import make_optimizer, param_groups

    before = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    opt = make_optimizer(param_groups(model, 0.01, optimizer), optimizer, 1e-2, 0.9)
    model.train()
    g = torch.Generator().manual_seed(7)
    for _ in range(n):
        x, y = torch.rand(6, 3, 32, 32, generator=g), torch.randint(0, 5, (6,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return before


@pytest.mark.parametrize(
    "family, method, init, role, expected_inert",
    [
        ("swin", "lora", "reference", "roli", {"lora_A", "lora_B"}),  # the reference's RoLI-LoRA: head only
        ("swin", "lora", "reference", "ranli", set()),
        ("vit", "lora", "reference", "roli", set()),
        ("vit", "adapter", "reference", "roli", {"down.weight", "down.bias", "up.weight"}),  # up.bias learns
        ("swin", "adapter", "reference", "ranli", {"down.weight", "down.bias", "up.weight"}),
        ("swin", "lora", "standard", "roli", set()),
        ("vit", "adapter", "standard", "roli", set()),
    ],
)
@pytest.mark.parametrize("optimizer", ["adamw-ref", "sgd"])
def test_steps_leave_exactly_the_inert_tensors_unchanged(family, method, init, role, expected_inert, optimizer):
    m = _model(family)
    apply_peft(m, method, peft_init=init, role=role)
    inert = set(inert_parameters(m))
    kinds = {n.split(".")[-2] if "lora_" in n else ".".join(n.split(".")[-2:]) for n in inert}
    assert kinds == expected_inert
    assert all(n in dict(m.named_parameters()) for n in inert)
    before = _steps(m, optimizer, 2)  # two steps: a standard LoRA's A moves once B has
    after = dict(m.named_parameters())
    for name, t in before.items():
        assert torch.equal(after[name], t) == (name in inert), name
    t = what_trains(m)
    assert t["inert"] == sum(before[n].numel() for n in inert) and t["trainable"] == sum(
        v.numel() for v in before.values()
    )
    if expected_inert == {"lora_A", "lora_B"}:
        assert "this stage trains the head only" in t["summary"]
    elif "up.weight" in expected_inert:
        assert "the Adapters' up biases" in t["summary"] and "the head" in t["summary"]
    else:
        assert "all of them can receive a gradient" in t["summary"]


# -- the shipped configs with --peft-init reference, end to end --------------------------------------------------


def _train(tmp_path: Path, checkpoint: str, config: str, *extra: str) -> subprocess.CompletedProcess:
    """`roli train` on a shipped config, its Swin-B made tiny (the file's other settings as shipped)."""
    data = _data("cifar10", tmp_path / "data")
    text = (CONFIGS / f"{config}.yaml").read_text()
    assert "model_args: {drop_path_rate: 0.5}" in text
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(text.replace("model_args: {drop_path_rate: 0.5}", f"model_args: {json.dumps(TINY_SWIN)}"))
    argv = [sys.executable, "-m", "roli.train", "--config", str(tiny), "--checkpoint", checkpoint,
            "--dataset", data["dataset"], "--input-size", "32", "--epochs", "1", "--warmup", "0",
            "--alp-epochs", "1", "--alp-warmup", "0", "--steps", "1", "--val-steps", "2", "--workers", "0",
            "--run-dir", str(tmp_path / "run"), *extra]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def test_roli_lora_reference_trains_the_head_only_and_ranli_lora_trains(tmp_path, tiny_ares):
    out = _train(tmp_path, tiny_ares, "cifar10/roli_lora", "--peft-init", "reference", "--compare-ranli")
    assert out.returncode == 0, out.stderr[-3000:]
    run = tmp_path / "run"
    roli, ranli = _state(run / "roli-ft" / "best.pt"), _state(run / "ranli-ft" / "best.pt")
    lora = [k for k in roli if "lora_" in k]
    assert len(lora) == 8 and all(not roli[k].any() for k in lora)  # exactly zero after training
    assert any(ranli[k].any() for k in lora if "lora_B" in k)  # RanLI's B moved from zero
    log = (run / "train.log").read_text()
    assert "this stage trains the head only (as the reference's RoLI-lora)" in log
    results = json.loads((run / "results.json").read_text())
    assert results["RoLI-lora"]["trainable"]["inert"] > 0 and results["RanLI-lora"]["trainable"]["inert"] == 0
    assert results["RoLI-lora"]["trainable"]["peft_init"] == "reference"
    for r in results.values():  # both scorings of the same pass; the reference's is never below roli's
        assert r["test"]["pgd2_reference"] >= r["test"]["pgd2"]
        assert r["val"]["val_robust_reference"] >= r["val"]["val_robust"]
    assert "test PGD-2 (ref. scoring)" in out.stdout


def test_reference_adapters_move_only_their_up_biases(tmp_path, tiny_ares):
    out = _train(tmp_path, tiny_ares, "cifar10/roli_adapter", "--peft-init", "reference")
    assert out.returncode == 0, out.stderr[-3000:]
    best = _state(tmp_path / "run" / "roli-ft" / "best.pt")
    parts = {k: v for k, v in best.items() if ".down." in k or ".up." in k}
    assert len(parts) == 8
    for k, v in parts.items():
        assert bool(v.any()) == k.endswith("up.bias"), k
    assert "the Adapters' up biases" in (tmp_path / "run" / "train.log").read_text()


# -- the learning rate follows the batch ------------------------------------------------------------------------


def _print_config(*argv: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "roli.train", *argv, "--print-config"], capture_output=True, text=True,
                       timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_batch_size_scales_the_config_lr_and_lr_flags_set_it():
    half = _print_config("--config", "cifar10/roli_full", "--batch-size", "32")["_resolved"]
    assert half["ft"]["lr"] == pytest.approx(1.25e-05, rel=1e-12) and half["alp"]["lr"] == pytest.approx(0.00625)
    assert "2.5e-05 at batch 64, x 32/64" in half["ft"]["lr_from"]
    same = _print_config("--config", "cifar10/roli_full")["_resolved"]
    assert same["ft"]["lr"] == 2.5e-05 and same["alp"]["lr"] == 0.0125
    given = _print_config("--config", "cifar10/roli_full", "--batch-size", "32", "--lr", "1e-4", "--alp-lr", "0.5")
    assert given["_resolved"]["ft"]["lr"] == 1e-4 and given["_resolved"]["alp"]["lr"] == 0.5
    assert given["_resolved"]["ft"]["lr_from"].startswith("--lr")
    ranli = _print_config("--config", "cifar10/ranli_full", "--batch-size", "128")["_resolved"]["ranli"]
    assert ranli["lr"] == pytest.approx(2 * 0.000125)
    cifar = _print_config("--config", "cifar10/roli_full")
    assert cifar["record_order"] == "tfds"  # the reference's train[:45000] / train[45000:] images
    assert _print_config("--config", "cifar10/roli_full", "--dataset", "imagefolder:/x")["record_order"] == "file"
    plain = _print_config("--batch-size", "32")["_resolved"]  # no config: roli's defaults, as given
    assert plain["ft"]["lr"] == 2.5e-05 and "not scaled" in plain["ft"]["lr_from"]


def test_every_shipped_file_states_its_lr_batch():
    from roli.config import TrainConfig

    for f in CONFIGS.glob("*/*.yaml"):
        cfg = TrainConfig.from_file(f)
        assert cfg.lr_batch == 64 and cfg.batch_size == 64, f
        assert not any(cfg.settings(k).lr_from.startswith("--") for k in cfg.resolved()), f


# -- the reference's PGD scoring --------------------------------------------------------------------------------


def _reference_adv_generator(model, x, y, eps, step, steps, chunk):
    """The reference's evaluation attack and prediction, written from src/adv_func.py and trainer.eval_classifier
    (start at x: random_start off on both sides), in float64: per batch of `chunk`, keep the iterate whose
    batch-mean CE is strictly higher than the best so far, then predict on it."""
    correct = []
    for i in range(0, len(y), chunk):
        xb, yb = x[i : i + chunk], y[i : i + chunk]
        cur, best, best_loss = xb.clone(), None, None
        for t in range(steps + 1):
            cur = cur.detach().requires_grad_(t < steps)
            with torch.set_grad_enabled(t < steps):
                loss = F.cross_entropy(model(cur), yb, reduction="none")
            if best_loss is None or loss.mean().item() > best_loss:
                best, best_loss = cur.detach().clone(), loss.mean().item()
            if t < steps:
                (g,) = torch.autograd.grad(loss.mean(), cur)
                cur = torch.min(torch.max(cur.detach() + step * g.sign(), xb - eps), xb + eps).clamp(0, 1)
        with torch.no_grad():
            correct.append(model(best).argmax(1) == yb)
    return torch.cat(correct)


def test_reference_scoring_equals_an_independent_implementation(digits_model):
    from conftest import DIGITS_EPS as EPS

    from roli.attacks.pgd import PGD

    model, x, y = digits_model
    model = model.double()
    x, y = x[:200].double(), y[:200]
    try:
        attack = PGD(model, eps=EPS, step_size=EPS / 4, steps=5, random_start=False, keep="best",
                     early_stop=False, reference_chunk=64, impl="torch")  # fmt: skip
        res = attack.perturb(x, y)
        expected = _reference_adv_generator(model, x, y, EPS, EPS / 4, 5, 64)
    finally:
        model.float()
    reference = ~res.reference_success
    roli = ~res.clean_success & ~res.success
    assert torch.equal(reference, expected)
    assert bool((reference | ~roli).all())  # robust by roli's definition => robust by the reference's


def test_reference_pick_by_hand():
    """Three iterates of 5 examples in chunks of 2 ([0, 1], [2, 3], [4]); values written out by hand."""
    from roli.attacks.pgd import reference_pick

    losses = torch.tensor([[0.1, 0.9, 2.0, 0.0, 0.3],
                           [0.6, 0.6, 1.0, 1.0, 0.2],
                           [0.5, 0.5, 0.0, 3.0, 0.1]])  # fmt: skip
    success = torch.tensor([[False, True, True, False, False],
                            [True, False, False, True, True],
                            [False, False, True, True, False]])  # fmt: skip
    # chunk means: [0.5, 0.6, 0.5] -> iterate 1; [1.0, 1.0, 1.5] -> 2; [0.3, 0.2, 0.1] -> 0 (the first of equals
    # would win a tie: [0, 1] at iterates 0 and 2 have 0.5 each, both below iterate 1)
    assert reference_pick(losses, success, 2).tolist() == [True, False, True, True, False]
    # roli's scoring of the same iterates: broken if broken at any of them
    assert success.any(0).tolist() == [True, True, True, True, True]
    tie = torch.tensor([[1.0, 1.0], [0.5, 1.5], [2.0, 0.0]])
    hit = torch.tensor([[False, False], [True, True], [True, True]])
    assert reference_pick(tie, hit, 2).tolist() == [False, False]  # means 1.0, 1.0, 1.0: the first, iterate 0


@pytest.mark.parametrize("case", ["lora A zero, B not", "lora B zero, A not", "adapter down zero, up weight not"])
def test_a_branch_zero_on_one_side_only_is_not_inert(case):
    """Only a fixed point (both sides zero) is inert: with one side non-zero, the zero side gets a gradient and
    moves in the first step."""
    m = _model("vit")
    apply_peft(m, "adapter" if case.startswith("adapter") else "lora", peft_init="reference")
    with torch.no_grad():
        for name, p in m.named_parameters():
            if case == "lora A zero, B not" and "lora_" in name:
                p.copy_(torch.zeros_like(p) if "lora_A" in name else torch.randn_like(p) * 0.1)
            if case == "adapter down zero, up weight not" and name.endswith("up.weight"):
                p.copy_(torch.randn_like(p) * 0.1)
    assert inert_parameters(m) == []
    zero = {n for n, p in m.named_parameters() if p.requires_grad and not p.any() and not n.endswith("bias")}
    before = _steps(m, "sgd", 1)
    after = dict(m.named_parameters())
    assert zero and all(not torch.equal(after[n], before[n]) for n in zero), zero


def test_a_grid_reproduces_the_paper_with_one_set():
    """`roli grid ... --set peft_init=reference`: every run's finetuning takes the reference's inits, and the ALP
    stage is the one a standard grid shares (the PEFT init does not decide ALP)."""
    from roli.grid import load_configs, plan

    names = ["cifar10/roli_lora", "cifar10/roli_adapter"]
    sets = {"peft_init": "reference", "dataset": "digits", "compare_ranli": True}
    ref = plan(load_configs(names, sets, False), Path("/tmp/unused"))
    std = plan(load_configs(names, {"dataset": "digits"}, False), Path("/tmp/unused"))
    runs = [j for j in ref if not j.name.startswith("alp/")]
    assert [j.cfg.peft_init for j in runs] == ["reference"] * 4  # RoLI-lora, RoLI-adapter and their RanLI runs
    assert {j.name for j in ref if j.name.startswith("alp/")} == {j.name for j in std if j.name.startswith("alp/")}


def test_a_grid_scales_each_learning_rate_once():
    """--set batch_size=32 over the shipped configs: the shared ALP run, the finetuning run and the RanLI run each
    resolve to half the file's rate (the grid's derived configs hold resolved rates: scaled once, not twice)."""
    from roli.grid import load_configs, plan

    sets = {"dataset": "digits", "compare_ranli": True, "batch_size": 32}
    jobs = {j.name: j.cfg for j in plan(load_configs(["cifar10/roli_full"], sets, False), Path("/x"))}
    alp = next(c for n, c in jobs.items() if n.startswith("alp/"))
    assert alp.resolved()["alp"]["lr"] == pytest.approx(0.0125 / 2)
    assert jobs["cifar10/roli_full"].resolved()["ft"]["lr"] == pytest.approx(2.5e-05 / 2)
    assert jobs["cifar10/roli_full-ranli"].resolved()["ranli"]["lr"] == pytest.approx(1.25e-04 / 2)
