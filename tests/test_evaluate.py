"""python -m roli.evaluate: end to end on digits, JSON output, one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from roli.evaluate import main, parse_budget

BASE = ["--model", "roli.models.small:small_cnn", "--dataset", "digits", "--n-ex", "120"]


def _plain_accuracy(checkpoint, n: int) -> float:
    """The checkpoint's clean accuracy on the first n digits test images: the model and the data built here."""
    from roli.data.arrays import digits
    from roli.models.small import small_cnn

    x, y = digits()[1].to_float()
    model = small_cnn(10, 1)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"])
    with torch.no_grad():
        return float((model.eval()(x[:n]).argmax(1) == y[:n]).float().mean())


def test_end_to_end_subprocess(checkpoint, tmp_path):
    out = tmp_path / "res.json"
    cmd = [sys.executable, "-m", "roli.evaluate", *BASE, "--checkpoint", str(checkpoint), "--eps", "1/10",
           "--steps", "10", "--restarts", "2", "--eps-sweep", "1/20,1/10,1/5", "--out", str(out)]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "clean" in run.stdout and "PGD-10" in run.stdout and "worst case" in run.stdout
    res = json.loads(out.read_text())
    assert res["n"] == 120
    pgd = next(v for k, v in res["attacks"].items() if k.startswith("PGD-10 ("))
    assert res["clean"] == pytest.approx(_plain_accuracy(checkpoint, 120))  # a plain forward, outside evaluate
    assert 0.3 < pgd < res["clean"]  # the attack breaks some images, not all
    bits = {k: [c == "1" for c in v] for k, v in res["per_example"].items()}
    assert pgd == pytest.approx(sum(bits["pgd"]) / 120)
    worst = [c and p for c, p in zip(bits["clean"], bits["pgd"], strict=True)]
    assert res["worst_case"] == pytest.approx(sum(worst) / 120) and bits["worst_case"] == worst
    sweep = [res["eps_sweep"][k] for k in ("0.05", "0.1", "0.2")]
    assert sweep == sorted(sweep, reverse=True)


def test_bf16_and_l2(checkpoint, capsys, tmp_path):
    res = {}
    for name, extra in (("fp32", []), ("bf16", ["--precision", "bf16"]), ("l2", ["--norm", "l2", "--eps", "0.5"])):
        out = tmp_path / f"{name}.json"
        assert main([*BASE, "--checkpoint", str(checkpoint), "--steps", "3", "--out", str(out), *extra]) == 0
        r = json.loads(out.read_text())
        res[name] = (r["clean"], next(v for k, v in r["attacks"].items() if k.startswith("PGD-3")))
    printed = capsys.readouterr().out
    assert printed.count("PGD-3 (") == 3 and printed.count("PGD-3 reference scoring") == 3
    # bf16 evaluates the same model: on 120 images its figures stay within 2 images of fp32's.
    assert abs(res["bf16"][0] - res["fp32"][0]) <= 2 / 120 + 1e-9 and abs(res["bf16"][1] - res["fp32"][1]) <= 3 / 120
    # The L2 attack (eps 0.5 on 8x8 digits) works: it breaks some images, not all.
    assert res["l2"][0] == res["fp32"][0] and 0 < res["l2"][1] < res["l2"][0]


@pytest.mark.slow
def test_autoattack_from_the_cli(checkpoint, tmp_path):
    out = tmp_path / "aa.json"
    argv = [*BASE, "--checkpoint", str(checkpoint), "--eps", "0.1", "--autoattack", "standard",
            "--aa-state", str(tmp_path / "aa_state.pt"), "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert list(res["autoattack_per_attack"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    bits = {k: [c == "1" for c in v] for k, v in res["per_example"].items()}
    worst = [all(v) for v in zip(bits["clean"], bits["pgd"], bits["autoattack"], strict=True)]
    assert bits["worst_case"] == worst and res["worst_case"] == pytest.approx(sum(worst) / len(worst))
    per = list(res["autoattack_per_attack"].values())  # robust after each attack in turn: never rises
    assert per == sorted(per, reverse=True) and per[-1] == pytest.approx(sum(bits["autoattack"]) / len(worst))


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--checkpoint", "/nonexistent/ck.pt"], "--checkpoint: checkpoint not found"),
        (["--eps", "8/0"], "--eps: '8/0' is not a number"),
        (["--eps=-1/255"], "--eps: must be a finite number >= 0"),
        (["--eps-sweep", "1/255,x"], "--eps-sweep: 'x' is not a number"),
        (["--steps", "-1"], "--steps must be >= 0"),
        (["--restarts", "0"], "--restarts must be >= 1"),
        (["--n-ex", "0"], "--n-ex must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--num-classes", "5"], "--num-classes 5 but the labels go up to 9"),
        (["--mean", "0.5,0.5", "--std", "0.2,0.2"], "--mean/--std"),
        (["--mean", "0.5"], "--mean: goes with std; give both or neither"),
        (["--std", "0.5,x"], "--std: expected comma-separated numbers"),
        (["--device", "gpu0"], "--device: 'gpu0' is not auto, cpu, cuda or cuda:N"),
        (["--impl", "fastest"], "--impl: impl='fastest' is not a backend"),
        (["--impl", "cuda"], "--impl cuda cannot run here"),
        (["--device", "cuda"], "--device cuda: no CUDA device is available")
        if not torch.cuda.is_available()
        else (["--eps", "x"], "--eps: 'x' is not a number"),
    ],
)
def test_bad_flags_one_line_exit_2(extra, pattern, capsys, checkpoint):
    argv = [*BASE, *(["--checkpoint", str(checkpoint)] if "--checkpoint" not in extra else []), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("python -m roli.evaluate: error:") and pattern in err


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--model", "roli.models.small:nope", "--dataset", "digits"], "--model: cannot import model factory"),
        (["--model", "not_a_model_name", "--dataset", "digits"], "--model: unknown model"),
        (["--model", "roli.models.small:small_cnn", "--dataset", "imagenet"], "--dataset: unknown dataset"),
        (["--model", "roli.models.small:small_cnn", "--dataset", "npz:/nope.npz"], "--dataset: npz file not found"),
        (["--model", "roli.models.small:small_cnn", "--dataset", "cifar10:/nope"], "--dataset: CIFAR file not found"),
        (["--model", "roli.models.small:small_cnn", "--dataset", "digits", "--model-arg", "x"], "--model-arg"),
    ],
)
def test_bad_model_or_dataset(argv, pattern, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and pattern in err


def test_checkpoint_for_other_class_count_and_argparse_errors(tmp_path, capsys):
    from roli.models.small import small_cnn

    wrong = tmp_path / "ck5.pt"
    torch.save(small_cnn(num_classes=5).state_dict(), wrong)
    # The backbone loads but its classifier is for 5 classes: evaluating a random head would report chance
    # accuracy, so it is refused in one line.
    assert main([*BASE, "--checkpoint", str(wrong), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing supplies a classifier for 10 classes" in err
    assert "checkpoint has 5 classes" in err
    assert main([*BASE, "--steps", "1"]) == 2  # no checkpoint at all: no head either
    assert "no --checkpoint" in capsys.readouterr().err
    other = tmp_path / "wide.pt"
    torch.save(small_cnn(width=16).state_dict(), other)
    assert main([*BASE, "--checkpoint", str(other)]) == 2
    assert "other shapes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*BASE, "--attack", "fgsm"])
    assert e.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_failed_run_keeps_previous_results(checkpoint, tmp_path):
    out = tmp_path / "res.json"
    out.write_text('{"good": true}')
    assert main([*BASE, "--checkpoint", str(checkpoint), "--eps", "bad", "--out", str(out)]) == 2
    assert json.loads(out.read_text()) == {"good": True}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_npz_dataset(tmp_path, checkpoint, capsys):
    rng = torch.Generator().manual_seed(0)
    x = (torch.rand(30, 8, 8, 1, generator=rng) * 255).to(torch.uint8).numpy()  # NHWC uint8
    y = torch.randint(0, 10, (30,), generator=rng).numpy()
    import numpy as np

    np.savez(tmp_path / "d.npz", x_test=x, y_test=y)
    argv = ["--model", "roli.models.small:small_cnn", "--dataset", f"npz:{tmp_path / 'd.npz'}",
            "--num-classes", "10", "--checkpoint", str(checkpoint), "--steps", "2"]  # fmt: skip
    assert main(argv) == 0
    assert "(30 examples" in capsys.readouterr().out


def test_parse_budget():
    assert parse_budget("8/255") == pytest.approx(8 / 255)
    assert parse_budget("0.5") == 0.5


VIT = ["--model", "vit_tiny_patch16_224", "--model-arg", "img_size=8", "--model-arg", "patch_size=2",
       "--model-arg", "embed_dim=24", "--model-arg", "depth=1", "--model-arg", "num_heads=2"]  # fmt: skip


def test_evaluate_run_reproduces_a_lora_run(tmp_path, capsys):
    """evaluate --run rebuilds a LoRA run from its config.json, loads the stage's best.pt strictly and
    reproduces the run's own test figures (the same seeded PGD over the same batches)."""
    from roli.train import main as train

    run = tmp_path / "lora"
    argv = [*VIT, "--dataset", "digits", "--classes", "0-4", "--method", "roli", "--peft", "lora", "--epochs", "2",
            "--warmup", "0", "--eps", "0.1", "--step-size", "0.025", "--steps", "2", "--val-steps", "5",
            "--lr", "0.01", "--alp-lr", "0.1", "--random-backbone", "--run-dir", str(run)]  # fmt: skip
    assert train(argv) == 0
    want = json.loads((run / "results.json").read_text())["RoLI-lora"]["test"]
    out = tmp_path / "eval.json"
    assert main(["--run", str(run), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert "roli-ft" in capsys.readouterr().out
    assert got["n"] == want["n"] and got["clean"] == want["clean"]
    assert next(v for k, v in got["attacks"].items() if k.startswith("PGD-5")) == want["pgd5"]
    alp = json.loads((run / "results.json").read_text())["alp"]["test"]
    assert main(["--run", str(run), "--stage", "alp", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["clean"] == alp["clean"]
    assert main(["--run", str(run), "--stage", "ranli-ft"]) == 2
    assert "has no finished stage 'ranli-ft'" in capsys.readouterr().err
    assert main(["--run", str(tmp_path)]) == 2  # a directory of runs (as the demo writes): they are listed
    err = capsys.readouterr().err
    assert f"holds 1 runs, evaluate one of them: --run {run}" in err and len(err.splitlines()) == 1
    assert main(["--run", str(run / "lora")]) == 2
    assert "holds no config.json" in capsys.readouterr().err


LOGITS_MODULE = """
import torch.nn as nn


def net(num_classes=10, in_chans=1):  # no classifier of its own: its 10 outputs are the logits
    return nn.Sequential(nn.Flatten(), nn.Linear(64 * in_chans, num_classes))
"""


def test_a_module_returning_logits_is_evaluated_as_the_whole_classifier(tmp_path, monkeypatch, capsys):
    """--model pkg:fn whose outputs are the task's logits (no classifier to find) and --input-size N for it:
    the per-example clean outcomes equal the module's own predictions, computed here in float64."""
    from roli.data import load_dataset

    (tmp_path / "tiny_logits.py").write_text(LOGITS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    test = load_dataset("digits").test
    x, y = (torch.cat(t)[:120] for t in zip(*test.loader(batch_size=256), strict=True))
    train = load_dataset("digits").train
    xt, yt = (torch.cat(t) for t in zip(*train.loader(batch_size=512), strict=True))
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 10).double()
    with torch.no_grad():  # nearest class mean (plus noise): most digits right, some wrong
        means = torch.stack([xt[yt == c].flatten(1).mean(0) for c in range(10)]).double()
        linear.weight.copy_(means + 0.05 * torch.randn(10, 64, dtype=torch.float64))
        linear.bias.copy_(-0.5 * (means**2).sum(1))
        expected = (linear(x.flatten(1).double()).argmax(1) == y).tolist()
    ck = tmp_path / "ck.pt"
    torch.save({"1.weight": linear.weight.float(), "1.bias": linear.bias.float()}, ck)
    out = tmp_path / "res.json"
    argv = ["--model", "tiny_logits:net", "--checkpoint", str(ck), "--dataset", "digits", "--n-ex", "120",
            "--input-size", "8", "--steps", "0", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "evaluated as the whole classifier" in capsys.readouterr().out
    got = [c == "1" for c in json.loads(out.read_text())["per_example"]["clean"]]
    assert got == expected and 0.5 < sum(expected) / 120 < 1


def test_a_checkpoint_with_nan_is_refused(checkpoint, tmp_path, capsys):
    state = torch.load(checkpoint, weights_only=True)
    state = state["state_dict"]
    key = next(k for k, v in state.items() if v.is_floating_point() and v.dim() > 1)
    state[key] = state[key].clone().index_fill_(0, torch.tensor([0]), float("nan"))
    bad = tmp_path / "nan.pt"
    torch.save({"state_dict": state}, bad)
    assert main([*BASE, "--checkpoint", str(bad), "--out", str(tmp_path / "r.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--checkpoint:" in err and "non-finite values (NaN/inf)" in err
    assert not (tmp_path / "r.json").exists()
