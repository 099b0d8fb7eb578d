"""A researcher's first hour on their own data and GPU (issue 39): --set and --n-ex on roli train, registry models
without their file, hub names and an offline hub, one data interface for a loop of one's own, one calling
convention for the accuracy helpers and AutoAttack, experiment tracking, fp16 with a GradScaler, gradient
accumulation, every option's default in --help, the grid report's names, roli zoo's width."""

from __future__ import annotations

import csv
import io
import json
import logging
import re
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import roli
from roli._cli import BadValue, budget_text
from roli.train import main as train

QUICK = ["--eps", "0.1", "--step-size", "0.05", "--steps", "1", "--val-steps", "1", "--epochs", "2", "--warmup", "0",
         "--random-backbone"]  # fmt: skip


def printed_config(*argv: str) -> dict:
    out = io.StringIO()
    with redirect_stdout(out):
        assert train([*argv, "--print-config"]) == 0
    return json.loads(out.getvalue())


def refused(capsys, *argv: str) -> str:
    assert train([*argv, "--print-config"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --set on roli train: any option, YAML values, KEY.SUBKEY into a mapping (the grid's parser)


def test_set_reaches_nested_keys_and_merges_with_the_file():
    sets = ["alp.lr=0.02", "model_args.drop_path_rate=0.3", "steps=3", "compare_ranli=true"]
    argv = [a for s in sets for a in ("--set", s)]
    cfg = printed_config("--config", "cifar10/roli_lora", *argv, "--alp-weight-decay", "0.001")
    assert cfg["alp"] == {"optimizer": "sgd", "lr": 0.02, "weight_decay": 0.001}  # the file's optimizer kept
    assert cfg["model_args"] == {"drop_path_rate": 0.3} and cfg["steps"] == 3 and cfg["compare_ranli"] is True
    assert cfg["_resolved"]["alp"]["lr"] == 0.02


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--set", "alp.frob=1"], "a stage's keys are"),
        (["--set", "nosuch=1"], "nosuch is not a config option"),
        (["--set", "peft.x=1"], "peft is not a mapping"),
        (["--set", "eps=4/255", "--eps", "8/255"], "also given as --eps"),
        (["--set", "steps=3", "--set", "steps=4"], "steps is set twice"),
        (["--set", "steps"], "expected KEY=VALUE"),
    ],
)
def test_set_refusals_are_one_line(capsys, argv, says):
    assert says in refused(capsys, *argv)


def test_grid_and_train_read_set_alike():
    from roli.config import parse_set_options
    from roli.grid import parse_sets

    items = ["alp.lr=0.01", "alp.epochs=3", "dataset=digits", "model_args.img_size=32"]
    expected = {"alp": {"lr": 0.01, "epochs": 3}, "dataset": "digits", "model_args": {"img_size": 32}}
    assert parse_sets(items) == parse_set_options(items) == expected
    with pytest.raises(BadValue, match="the grid's to choose"):
        parse_sets(["run_dir=x"])


# --n-ex: the test evaluation on the first N images, marked partial


def test_n_ex_tests_on_the_first_images_and_report_marks_them(tmp_path, capsys):
    from roli.report import main as report

    run = tmp_path / "run"
    assert train(["--method", "alp", "--dataset", "digits", *QUICK, "--n-ex", "50", "--run-dir", str(run)]) == 0
    out = capsys.readouterr().out
    test = json.loads((run / "results.json").read_text())["alp"]["test"]
    full = len(roli.load_dataset("digits").test)
    assert test["n"] == 50 and test["of"] == full == 360
    assert f"the first 50 of {full} test images" in out
    assert report([str(run), "--out", str(tmp_path / "rep")]) == 0
    rows = list(csv.DictReader(open(tmp_path / "rep" / "report.csv")))
    assert rows[0]["test images"] == f"50 of {full} (partial)"


# registry models without their file; hub names; an offline hub fails in seconds


def test_registry_model_with_random_backbone_builds_its_architecture(tmp_path, monkeypatch, caplog):
    from conftest import TINY_SWIN

    from roli.specs import ModelSpec

    monkeypatch.setenv("ROLI_CACHE_DIR", str(tmp_path))
    with pytest.raises(BadValue, match="needs its weights file ARES_Swin_base"):
        ModelSpec("ares_swin_b").weights()
    cached = tmp_path / "weights" / "ARES_Swin_base_patch4_window7_224_AT.pth"
    cached.parent.mkdir()
    cached.write_bytes(b"not read")  # a cached file is not taken when a random backbone is asked for
    spec = ModelSpec("ares_swin_b", args=TINY_SWIN, random_backbone=True, input_size=32)
    assert spec.weights() is None
    with caplog.at_level(logging.INFO, logger="roli.train"):
        model = spec.build(10, 3, "cpu")
    assert type(model.backbone).__name__ == "SwinTransformer" and model.head.out_features == 10
    assert "its architecture swin_base_patch4_window7_224 with random weights" in caplog.text
    with pytest.raises(BadValue, match="no timm weights"):
        ModelSpec("singh2023_convnext_t_convstem", pretrained=True).weights()


def test_hub_names_go_to_timm_and_an_offline_hub_fails_at_once(monkeypatch):
    import timm
    from huggingface_hub import constants

    from roli import _env
    from roli.models import create_classifier

    calls = []

    def create_model(name, **kw):
        calls.append((name, kw.get("pretrained"), constants.HF_HUB_OFFLINE))
        raise RuntimeError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm, "create_model", create_model)
    monkeypatch.setattr(_env, "reachable", lambda *a, **k: False)
    before = constants.HF_HUB_OFFLINE
    for name, pretrained in (("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", False), ("vit_tiny_patch16_224", True)):
        with pytest.raises(ValueError, match="not reachable.*give --checkpoint FILE"):
            create_classifier(name, 3, pretrained=pretrained)
    assert calls == [
        ("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k", False, True),
        ("vit_tiny_patch16_224", True, True),
    ]
    assert constants.HF_HUB_OFFLINE == before  # the hub's own switch restored


def test_pretrained_offline_is_one_line_naming_checkpoint(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert train(["--model", "vit_tiny_patch16_224", "--pretrained", "--method", "alp", "--dataset", "digits",
                  "--run-dir", str(tmp_path / "r")]) == 2  # fmt: skip
    line = capsys.readouterr().err.strip()
    assert "--checkpoint FILE" in line and "\n" not in line and not (tmp_path / "r").exists()


# one data interface for a loop of one's own


def _image_folder(root: Path, per_class: int = 12) -> Path:
    from PIL import Image

    digits = roli.load_dataset("digits")
    for split, data in (("train", digits.train), ("test", digits.test)):
        for c in range(10):
            idx = torch.nonzero(data.y == c)[:per_class, 0]
            (root / split / str(c)).mkdir(parents=True)
            for i in idx.tolist():
                Image.fromarray(data.x[i, 0].numpy()).save(root / split / str(c) / f"{i}.png")
    return root


@pytest.mark.parametrize("kind", ["digits", "imagefolder"])
def test_batches_cover_the_split_once_per_pass_and_reshuffle(tmp_path, kind):
    name = "digits" if kind == "digits" else f"imagefolder:{_image_folder(tmp_path)}"
    data = roli.load_dataset(name, resize=8, crop_size=8, train_augment=False)
    assert data.in_chans == (1 if kind == "digits" else 3)
    split = data.train
    x_all, y_all = split.to_float()
    batches = split.batches(16, shuffle=True)
    assert len(batches) == -(-len(split) // 16)
    orders = []
    for _ in range(2):
        xs, ys = zip(*batches, strict=True)
        x, y = torch.cat(xs), torch.cat(ys)
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1 and x.shape[1:] == x_all.shape[1:]
        assert sorted(y.tolist()) == sorted(y_all.tolist())  # every example once per pass
        key = {tuple(img.flatten().tolist()) for img in x}
        assert key == {tuple(img.flatten().tolist()) for img in x_all}
        orders.append(y.tolist())
    assert orders[0] != orders[1]  # the second pass is the next epoch, reshuffled


# one calling convention


def test_run_autoattack_takes_data_as_the_accuracy_helpers_do():
    from roli import run_autoattack

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 5)).eval()
    x, y = torch.rand(12, 1, 4, 4), torch.randint(0, 5, (12,))
    with pytest.raises(TypeError, match=r"call run_autoattack\(model, \(x, y\), eps\)"):
        run_autoattack(model, x, y, 0.1)
    whole = run_autoattack(model, (x, y), 0.1, version="custom", attacks=["apgd-ce"])
    split = run_autoattack(model, [(x[:5], y[:5]), (x[5:], y[5:])], 0.1, version="custom", attacks=["apgd-ce"])
    assert torch.equal(whole.robust, split.robust) and 0 <= whole.robust_accuracy <= whole.clean_accuracy


# experiment tracking


def test_log_tensorboard_and_csv_hold_every_epoch_record(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    argv = ["--method", "alp", "--dataset", "digits", *QUICK, "--log", "tensorboard", "--log", "csv"]
    assert train([*argv, "--run-dir", str(run)]) == 0
    history = [json.loads(line) for line in (run / "alp" / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in ("val_robust", "val_clean", "train_loss", "lr"):
        points = events.Scalars(f"alp/{key}")
        assert [p.step for p in points] == [0, 1]
        assert [p.value for p in points] == pytest.approx([h[key] for h in history], rel=1e-6)
    test = json.loads((run / "results.json").read_text())["alp"]["test"]
    assert events.Scalars("alp/test_clean")[0].value == pytest.approx(test["clean"])
    rows = list(csv.DictReader(open(run / "alp" / "metrics.csv")))
    assert [float(r["val_robust"]) for r in rows] == pytest.approx([h["val_robust"] for h in history])


class FakeWandb:
    """The part of wandb's API roli calls, recording what it is given."""

    def __init__(self):
        self.inits, self.logged, self.summary, self.finished = [], [], {}, 0
        self.util = type("util", (), {"generate_id": staticmethod(lambda: "abc123")})

    def init(self, **kw):
        self.inits.append(kw)
        return self

    def log(self, values):
        self.logged.append(values)

    def finish(self):
        self.finished += 1


def test_log_wandb_offline_without_network_and_resumes_the_same_run(tmp_path, monkeypatch):
    from roli import _env

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(_env, "reachable", lambda *a, **k: False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run = tmp_path / "run"
    assert train(["--method", "alp", "--dataset", "digits", *QUICK, "--log", "wandb", "--run-dir", str(run)]) == 0
    history = [json.loads(line) for line in (run / "alp" / "metrics.jsonl").read_text().splitlines()]
    assert fake.inits[0]["mode"] == "offline" and fake.inits[0]["id"] == "abc123" and fake.finished == 1
    assert [v["alp/val_robust"] for v in fake.logged] == [h["val_robust"] for h in history]
    assert fake.summary["alp/test_clean"] == json.loads((run / "results.json").read_text())["alp"]["test"]["clean"]
    fake.util.generate_id = staticmethod(lambda: "other")
    assert train(["--resume", str(run), "--log", "wandb"]) == 0
    assert fake.inits[1]["id"] == "abc123"  # the same wandb run continues
    (run / "tracking.json").write_text('{"wandb_id": ')  # truncated (or edited): a new run, said, never a crash
    assert train(["--resume", str(run), "--log", "wandb"]) == 0
    assert fake.inits[2]["id"] == "other" and "names no wandb run" in (run / "train.log").read_text()


def test_log_refuses_a_missing_library_before_writing(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    run = tmp_path / "run"
    assert train(["--method", "alp", "--dataset", "digits", *QUICK, "--log", "wandb", "--run-dir", str(run)]) == 2
    assert "pip install wandb" in capsys.readouterr().err and not run.exists()


# fp16: the attack's gradient sign survives float16; the update goes through a GradScaler


def test_fp16_attack_keeps_the_sign_of_tiny_input_gradients():
    """A confident model (logit margin ~19) has a loss gradient of ~6e-9 at its logits: float16 flushes that to
    zero unless the attack scales its loss. One PGD step from the clean image must move every pixel as a float64
    step does."""
    from roli import PGD

    torch.manual_seed(0)
    v = torch.rand(48) * 0.5 + 0.5
    lin = nn.Linear(48, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.stack([v, -v]))
        lin.bias.copy_(torch.tensor([-8.5, 8.5]))  # margin 2 v.x - 17 = 19 +- 0.5 on these images
    model = nn.Sequential(nn.Flatten(), lin)
    x, y = 0.5 + 0.1 * (torch.rand(32, 3, 4, 4) - 0.5), torch.zeros(32, dtype=torch.long)
    x64 = x.double().requires_grad_()
    F.cross_entropy(model.double()(x64), y, reduction="sum").backward()
    expected = x64.grad.sign().float()
    assert (expected != 0).all()
    model.float()
    step = PGD(model, eps=0.05, step_size=0.01, steps=1, random_start=False, precision="fp16", keep="last")(x, y)
    assert ((step - x).sign() == expected).float().mean().item() == 1.0


def test_fp16_update_matches_fp32_and_saves_its_scaler(tmp_path):
    from roli._amp import grad_scaler
    from roli.training.loop import ft_step

    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 5)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    x, y = torch.rand(16, 3, 4, 4), torch.randint(0, 5, (16,))
    opts = [torch.optim.SGD(n.parameters(), lr=0.5) for n in nets]
    scaler = grad_scaler("fp16", "cpu")
    assert scaler is not None and grad_scaler("bf16", "cpu") is None
    ft_step(nets[0], None, opts[0], x, y, "fp32")
    ft_step(nets[1], None, opts[1], x, y, "fp16", scaler)
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-2)
    run = tmp_path / "run"
    argv = ["--method", "pretrain", "--dataset", "digits", *QUICK[:-1], "--precision", "fp16"]
    assert train([*argv, "--run-dir", str(run)]) == 0
    state = torch.load(run / "pretrain" / "last.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0


# --accumulate: K micro-batches, one update, the same as the whole batch


@pytest.mark.parametrize("stage", ["ft", "alp"])
def test_accumulated_step_equals_the_whole_batch(stage):
    from roli import PGD, create_classifier
    from roli.features.alp_step import alp_step
    from roli.models import apply_peft
    from roli.training.loop import ft_step

    torch.manual_seed(1)
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(48, 24), nn.Tanh())
    models = [create_classifier(backbone, 5, mean=None, std=None, input_size=None, feat_dim=24)]
    models.append(create_classifier(nn.Sequential(nn.Flatten(), nn.Linear(48, 24), nn.Tanh()), 5, mean=None, std=None,
                                    input_size=None, feat_dim=24))  # fmt: skip
    models[1].load_state_dict(models[0].state_dict())
    x, y = torch.rand(22, 3, 4, 4), torch.randint(0, 5, (22,))
    results = []
    for model, k in zip(models, (1, 4), strict=True):
        apply_peft(model, "linear" if stage == "alp" else "full")
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3, momentum=0.9)
        attack = PGD(model, eps=0.1, step_size=0.03, steps=3, random_start=False, keep="last")
        if stage == "ft":
            results.append(ft_step(model, attack, opt, x, y, accumulate=k))
        else:
            results.append(alp_step(model, attack, opt, x, y, accumulate=k))
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)  # float32 sums in another order
    assert results[0][0].item() == pytest.approx(results[1][0].item(), rel=1e-6)
    assert int(results[0][1]) == int(results[1][1])


def test_accumulate_larger_than_the_batch_is_refused(capsys):
    assert "accumulate: must be an integer in [1, batch-size 8]" in refused(
        capsys, "--batch-size", "8", "--accumulate", "9"
    )


# --help: every option says its default or that it is required


@pytest.mark.parametrize("command", ["train", "evaluate", "grid", "report", "zoo"])
def test_every_option_shows_its_default(command, capsys):
    import importlib

    with pytest.raises(SystemExit):
        importlib.import_module(f"roli.{command}").main(["--help"])
    text = capsys.readouterr().out
    entries = re.split(r"\n  (?=-|[A-Z_a-z]+\s)", text.split("\n\n", 2)[-1])
    options = [" ".join(e.split()) for e in entries if e.lstrip().startswith("-") and not e.startswith("-h")]
    assert options
    missing = [o[:60] for o in options if "default" not in o and "required" not in o]
    assert not missing, missing
    if command == "train":
        flat = " ".join(text.split())
        assert "--no-fold-bn training attacks: do not fold the Conv->BatchNorm pairs (default: off)" in flat
        assert "(default: per stage: pretrain 0.1, lp 0.1, alp 0.0125, ft 2.5e-05, ranli 0.000125)" in flat


# the grid report's names, roli zoo's width, budgets as written


def test_grid_report_names_runs_by_config_and_the_shared_alp_by_what_shares_it(tmp_path):
    from roli.grid import Job, label
    from roli.report import main as report

    alp = Job("alp/3fa9c0d1", None, sources=["cifar10/roli_lora", "cifar10/roli_full"])
    assert label(alp) == "cifar10/alp (shared by 2 configs)"
    assert label(Job("alp/77", None, sources=["cifar10/alp"])) == "cifar10/alp"
    assert label(Job("cifar10/roli_lora-ranli", None)) == "cifar10/roli_lora-ranli"
    run = tmp_path / "grid" / "alp" / "3fa9c0d1"
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")
    (run / "results.json").write_text(json.dumps({"alp": {"val": {"epoch": 1}, "test": {"clean": 0.5, "pgd10": 0.25}}}))
    assert report([str(run), f"--label={run}={label(alp)}", "--out", str(tmp_path / "rep")]) == 0
    assert list(csv.DictReader(open(tmp_path / "rep" / "report.csv")))[0]["run"] == label(alp)


def test_zoo_fits_a_terminal_and_keeps_the_full_table(capsys):
    from roli import zoo

    assert zoo.main([]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 100 and any(line.startswith("ares_swin_b ") for line in lines)
    assert zoo.main(["--markdown"]) == 0
    assert "ARES_Swin_base_patch4_window7_224_AT.pth](https" in capsys.readouterr().out


def test_budgets_print_as_people_write_them():
    assert [budget_text(v) for v in (8 / 255, 2 / 255, 0.1, 3.0, 0.0)] == ["8/255", "2/255", "0.1", "3", "0"]


def test_pgd_shows_its_defaults_as_torchattacks_users_expect():
    import dataclasses
    import inspect

    params = inspect.signature(roli.PGD).parameters
    assert (
        list(params)[:3] == ["model", "eps", "step_size"]
        and params["eps"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    )
    assert (params["eps"].default, params["step_size"].default, params["steps"].default) == (8 / 255, 2 / 255, 10)
    assert params["random_start"].default is True and "alpha" in params
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    a, b = roli.PGD(model, 8 / 255, alpha=1 / 255, steps=3), roli.PGD(model, eps=8 / 255, step_size=1 / 255, steps=3)
    assert dataclasses.asdict(a.config) == dataclasses.asdict(b.config)


def test_grid_alp_key_ignores_logging_and_keeps_old_keys():
    import dataclasses

    from roli.config import TrainConfig
    from roli.grid import alp_key

    cfg = TrainConfig(dataset="digits", random_backbone=True)
    key = alp_key(cfg, {})
    assert alp_key(dataclasses.replace(cfg, log=["csv"]), {}) == key  # tracking does not decide ALP
    assert alp_key(dataclasses.replace(cfg, accumulate=2), {}) != key  # micro-batches draw other random starts
    assert alp_key(dataclasses.replace(cfg, n_ex=100), {}) != key
    from roli.rundir import ADDED_OPTIONS

    old = {k: v for k, v in cfg.to_dict().items() if k not in (*ADDED_OPTIONS, "log")}  # a config of before them
    assert (
        alp_key(type("Old", (), {"to_dict": lambda self: old, "checkpoint": None, "settings": cfg.settings})(), {})
        == key
    )
