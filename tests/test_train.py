"""python -m roli.train: every method and PEFT choice end to end on tiny settings, outputs, resume after
SIGKILL and SIGTERM, non-finite loss, the bad-flag matrix, and the built-in default in a reduced mode."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from roli.train import main

# A random backbone, on purpose (lp/alp/ft/roli refuse one without --random-backbone; pretrain ignores it).
TINY = ["--dataset", "digits", "--classes", "0-4", "--eps", "0.1", "--step-size", "0.025", "--steps", "1",
        "--val-steps", "2", "--epochs", "2", "--warmup", "1", "--random-backbone"]  # fmt: skip
VIT = ["--model", "vit_tiny_patch16_224", "--model-arg", "img_size=8", "--model-arg", "patch_size=4",
       "--model-arg", "depth=1", "--model-arg", "embed_dim=48", "--model-arg", "num_heads=2"]  # fmt: skip


def _plain_test_accuracy(best: Path) -> float:
    """Clean accuracy of a stage's best.pt on digits 0-4's test split: the model, data and forward built here."""
    from roli.data.arrays import digits
    from roli.models import create_classifier, load_checkpoint

    x, y = digits()[1].to_float()
    keep = y < 5
    model = create_classifier("roli.models.small:small_cnn", 5, in_chans=1)
    load_checkpoint(model, best)
    with torch.no_grad():
        return int((model.eval()(x[keep]).argmax(1) == y[keep]).sum()) / int(keep.sum())


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.parametrize("method", ["pretrain", "lp", "alp", "ft", "roli"])
def test_every_method_end_to_end(method, tmp_path, capsys):
    run = tmp_path / method
    extra = ["--compare-ranli"] if method == "roli" else []
    assert main(["--method", method, "--run-dir", str(run), *TINY, *extra]) == 0
    out = capsys.readouterr().out
    assert "| stage |" in out
    res = results(run)
    stages = {"pretrain": ["pretrain"], "lp": ["lp"], "alp": ["alp"], "ft": ["alp", "ft (full, init alp)"],
              "roli": ["alp", "RoLI-full", "RanLI-full"]}[method]  # fmt: skip
    assert list(res) == stages
    assert {r["test"]["n"] for r in res.values()} == {193}  # digits 0-4: the test split's 193 images
    # From a random backbone in 2 epochs the probes stay near chance (0.2); trained backbones learn, and the
    # attack then costs accuracy (at chance, PGD equals clean and says nothing).
    learned = {"pretrain": ("pretrain", 0.85), "roli": ("RanLI-full", 0.35)}.get(method)
    if learned is not None:
        test = res[learned[0]]["test"]
        assert test["clean"] > learned[1] and test["pgd2"] < test["clean"] - 0.05, test
    for r in res.values():  # the test figure against a plain forward of the stage's best.pt, built here
        assert r["test"]["clean"] == pytest.approx(_plain_test_accuracy(run / r["dir"] / "best.pt"), abs=1e-6)
    config = json.loads((run / "config.json").read_text())
    assert config["method"] == method and config["eps"] == 0.1
    for stage_dir in [d for d in run.iterdir() if d.is_dir()]:
        assert (stage_dir / "best.pt").is_file()
        if stage_dir.name != "lp":
            rows = [json.loads(line) for line in (stage_dir / "metrics.jsonl").read_text().splitlines()]
            assert [r["epoch"] for r in rows] == [0, 1]
            assert {"train_loss", "train_acc", "val_clean", "val_robust", "lr", "images_per_s", "seconds"} <= set(
                rows[0]
            )
            assert (stage_dir / "last.pt").is_file() and (stage_dir / "curves.png").stat().st_size > 1000


def test_training_attacks_with_and_without_batchnorm_folding(tmp_path):
    """The default folds the small CNN's BatchNorms for the attack; --no-fold-bn trains the same way up to
    float rounding (same seed and data: the same accuracies within 2 points)."""
    out = {}
    for flag in ([], ["--no-fold-bn"]):
        run = tmp_path / ("plain" if flag else "folded")
        assert (
            main(["--method", "pretrain", "--run-dir", str(run), *TINY, "--epochs", "1", "--warmup", "0", *flag]) == 0
        )
        assert json.loads((run / "config.json").read_text())["fold_bn"] is not bool(flag)
        out[bool(flag)] = results(run)["pretrain"]["test"]
    for key in ("clean", "pgd2"):
        assert abs(out[True][key] - out[False][key]) <= 0.02, out


@pytest.mark.parametrize("peft", ["lora", "adapter", "vpt", "vpt-gated", "bias", "linear"])
def test_every_peft_choice(peft, tmp_path):
    """Each PEFT choice trains exactly its own parameters: every frozen tensor of best.pt equals the model the run
    started from (built here from the seed), the head and the method's zero-initialised branch moved."""
    from roli.models import apply_peft, create_classifier

    run = tmp_path / peft
    assert main(["--method", "ft", "--peft", peft, "--init", "random", "--run-dir", str(run), *TINY, *VIT,
                 "--epochs", "1", "--warmup", "0"]) == 0  # fmt: skip
    trained = torch.load(run / "ft" / "best.pt", weights_only=True)["state_dict"]
    torch.manual_seed(0)  # the run's seed
    init = create_classifier("vit_tiny_patch16_224", 5, in_chans=1, img_size=8, patch_size=4, depth=1, embed_dim=48,
                             num_heads=2)  # fmt: skip
    apply_peft(init, peft)
    start = init.state_dict()
    assert trained.keys() == start.keys()
    marks = {"lora": ("lora_A", "lora_B"), "adapter": (".down.", ".up."), "vpt": ("vpt_prompts",),
             "vpt-gated": (".prompts", ".gate"),
             "bias": ("bias",), "linear": ()}[peft]  # fmt: skip
    trainable = {n for n, _ in init.named_parameters() if n.startswith("head.") or any(m in n for m in marks)}
    assert trainable == {n for n, p in init.named_parameters() if p.requires_grad}
    for name in set(start) - trainable:
        assert torch.equal(trained[name], start[name]), f"{peft}: frozen {name} changed"
    branch = {"lora": "lora_B", "adapter": ".up.", "vpt": "vpt_prompts", "vpt-gated": ".gate", "bias": "fc1.bias",
              "linear": "head."}[peft]  # fmt: skip
    for name in ("head.weight", *[n for n in trainable if branch in n]):
        assert not torch.equal(trained[name], start[name]), f"{peft}: {name} did not train"


def test_init_path_and_yaml_config(tmp_path):
    first = tmp_path / "alp"
    assert main(["--method", "alp", "--run-dir", str(first), *TINY]) == 0
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: ft\ndataset: digits\nclasses: 0-4\neps: 0.1\nstep-size: 0.025\nsteps: 1\nval_steps: 2\n"
                   "epochs: 3\nwarmup: 1\nrandom_backbone: true\n")  # fmt: skip
    run = tmp_path / "ft"
    assert main(["--config", str(cfg), "--init", str(first / "alp" / "best.pt"), "--epochs", "1", "--warmup", "0",
                 "--run-dir", str(run)]) == 0  # fmt: skip
    config = json.loads((run / "config.json").read_text())
    assert config["epochs"] == 1 and config["init"].endswith("best.pt") and config["method"] == "ft"


def _bad(tmp_path):
    ck10 = tmp_path / "alp10" / "alp" / "best.pt"
    not_head = tmp_path / "tensor.pt"
    torch.save({"w": torch.zeros(3)}, not_head)
    full = tmp_path / "full"
    full.mkdir()
    (full / "something").write_text("x")
    return ck10, not_head, full


BAD = [
    (["--method", "distill"], "argument --method: invalid choice"),
    (["--peft", "prefix"], "peft: 'prefix' is not one of"),
    (["--model", "not_a_model"], "model: unknown model"),
    (["--dataset", "mnist"], "dataset: unknown dataset"),
    (["--eps", "2"], "eps: 2 is out of range for Linf"),
    (["--eps", "8/0"], "eps: '8/0' is not a number"),
    (["--eps=-1/255"], "eps: must be a finite number >= 0"),
    (["--checkpoint", "/nonexistent.pt"], "checkpoint: checkpoint not found"),
    (["--batch-size", "0"], "batch-size: must be an integer >= 1"),
    (["--epochs", "0"], "epochs: must be an integer >= 1"),
    (["--warmup", "5"], "warmup: 5 warmup epochs is more than the run's 2 epochs; pass --warmup N with N < 2"),
    (["--classes", "a-b"], "classes: 'a-b' is not a list"),
    (["--classes", "0-20"], "classes: 0-20 names a class >= 10"),
    (["--val-percent", "0"], "val-percent: must be a number in (0, 100); got 0"),
    (["--lr", "-1"], "lr: must be a number >= 0"),
    (["--steps", "-1"], "steps: must be an integer >= 0"),
    (["--config", "/nonexistent.yaml"], "config: file not found"),
    (["--model-arg", "depth"], "--model-arg: expected KEY=VALUE"),
    (["--resume", "/tmp"], "resume: /tmp was not written by roli (it has no .roli-run marker)"),
    (["--cuda-graph"], "cuda-graph: records the attack on a GPU and needs --device cuda"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[b[1].split(":")[0] + str(i) for i, b in enumerate(BAD)])
def test_bad_flags_one_line_exit_2(extra, message, tmp_path, capsys):
    argv = ["--method", "alp", "--run-dir", str(tmp_path / "r"), *TINY, *extra]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err


def test_bad_combinations(tmp_path, capsys):
    ck10, not_head, full = _bad(tmp_path)
    assert main(["--method", "alp", "--run-dir", str(tmp_path / "alp10"), *TINY, "--classes", "0-9"]) == 0
    cases = [
        (["--method", "ft", "--init", str(ck10)], "init: " + str(ck10) + " has a head for 10 classes; this run has 5"),
        (["--method", "ft", "--init", str(not_head)], "is not a head checkpoint"),
        (["--method", "alp", "--run-dir", str(full)], "is not empty; pass --resume"),
    ]
    capsys.readouterr()
    for extra, message in cases:
        argv = ["--run-dir", str(tmp_path / "x"), *TINY, *extra]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert (full / "something").read_text() == "x"  # nothing lost
    assert main(["--method", "alp", "--run-dir", str(full), "--overwrite", *TINY]) == 2  # not roli's: kept
    assert "was not written by roli" in capsys.readouterr().err
    assert (full / "something").read_text() == "x"


def test_non_finite_loss_stops_with_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    run = tmp_path / "nan"
    code = main(["--method", "pretrain", "--model", "nan_model:make", "--model-arg", "after=60", "--run-dir", str(run),
                 *TINY, "--epochs", "3"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1 and "the loss became non-finite" in err and "last good checkpoint" in err
    assert (run / "pretrain" / "last.pt").is_file()  # the epoch before the NaN is kept


def _cli(run_dir: Path, extra=()) -> list[str]:
    flags = ["--method", "pretrain", "--run-dir", str(run_dir), "--dataset", "digits", "--classes", "0-4",
             "--eps", "0.1", "--step-size", "0.025", "--steps", "5", "--val-steps", "3", "--epochs", "4",
             "--warmup", "1", "--batch-size", "16"]  # fmt: skip
    return [sys.executable, "-m", "roli.train", *flags, *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    out = subprocess.run(_cli(run), capture_output=True, text=True, timeout=600, env=_env())
    assert out.returncode == 0, out.stderr[-2000:]
    return results(run), [json.loads(x) for x in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]


def _wait_for_epoch(run: Path, epochs: int, proc, timeout=300):
    deadline = time.time() + timeout
    metrics = run / "pretrain" / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= epochs:
            return
        time.sleep(0.05)
    raise AssertionError("the run did not reach the epoch in time")


def _strip_time(rows):
    return [{k: v for k, v in r.items() if k not in ("images_per_s", "seconds")} for r in rows]


def _resume_and_compare(run: Path, uninterrupted) -> None:
    """Resume `run` to the end; its results and per-epoch metrics must equal the uninterrupted run's."""
    out = subprocess.run([sys.executable, "-m", "roli.train", "--resume", str(run)], capture_output=True, text=True,
                         timeout=600, env=_env())  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    ref_results, ref_rows = uninterrupted
    assert results(run) == ref_results
    rows = [json.loads(x) for x in (run / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert _strip_time(rows) == _strip_time(ref_rows)


def test_sigkill_mid_epoch_then_resume_gives_the_same_results(uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env())
    _wait_for_epoch(run, 2, proc)
    time.sleep(0.3)  # into the third epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (run / "results.json").exists()
    _resume_and_compare(run, uninterrupted)


def test_sigterm_finishes_the_step_saves_and_resumes(uninterrupted, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli(run), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_env())
    _wait_for_epoch(run, 1, proc)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "interrupted by SIGTERM" in err and f"--resume {run}" in err
    state = torch.load(run / "pretrain" / "last.pt", weights_only=True)
    assert state["epoch"] >= 1
    _resume_and_compare(run, uninterrupted)


def test_default_run_in_reduced_mode(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ROLI_CACHE_DIR", str(tmp_path / "cache"))
    from roli.training.demo import run_demo

    summary = run_demo(run_dir=str(tmp_path / "demo"), epochs=2, source_epochs=2)
    assert set(summary) == {"clean LP", "ALP", "RanLI-FT (full)", "RoLI-FT (full)"}
    out = capsys.readouterr().out
    assert "RoLI demonstration" in out
    # The table and the verdict say what the runs measured, whichever way it went.
    for name, test in summary.items():
        assert f"| {name} | {100 * test['clean']:.2f}% | {100 * test['pgd10']:.2f}% |" in out
    gain = 100 * (summary["RoLI-FT (full)"]["pgd10"] - summary["RanLI-FT (full)"]["pgd10"])
    verdict = re.search(r"RoLI vs RanLI: ([+-]\d+\.\d\d) PGD points on this run( \(no gain in this regime\))?", out)
    assert verdict and float(verdict[1]) == pytest.approx(gain, abs=0.006) and bool(verdict[2]) == (gain <= 0)
    assert json.loads((tmp_path / "demo" / "demo.json").read_text())["results"] == summary
    # RoLI finetunes from the ALP stage's head, RanLI from a random one (the run records each stage's start).
    res = json.loads((tmp_path / "demo" / "roli" / "results.json").read_text())
    assert list(res) == ["alp", "RoLI-full", "RanLI-full"]
    again = run_demo(run_dir=str(tmp_path / "demo2"), epochs=2, source_epochs=2)  # the source backbone is cached
    assert "cached at" in capsys.readouterr().out and set(again) == set(summary)


# -- torchrun -------------------------------------------------------------------------------------------

# LayerNorm ViT (no BatchNorm) and deterministic attack starts: 2 processes compute what 1 process does.
DDP_FLAGS = ["--method", "pretrain", "--dataset", "digits", "--classes", "0-4", "--eps", "0.1", "--step-size", "0.025",
             "--steps", "2", "--val-steps", "2", "--epochs", "3", "--warmup", "1", "--batch-size", "32",
             "--optimizer", "adamw", "--lr", "0.003", "--weight-decay", "0", "--no-random-start", *VIT]  # fmt: skip


def _torchrun(nproc: int, argv: list[str]):
    env = {k: v for k, v in _env().items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER"))}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return launcher + ["-m", "roli.train", *argv], env


def test_torchrun_two_processes_match_one(tmp_path):
    one = tmp_path / "one"
    out = subprocess.run([sys.executable, "-m", "roli.train", *DDP_FLAGS, "--run-dir", str(one)], capture_output=True,
                         text=True, timeout=600, env=_env())  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    cmd, env = _torchrun(2, [*DDP_FLAGS, "--run-dir", str(tmp_path / "two")])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("| stage |") == 1  # only rank 0 prints
    a, b = results(one)["pretrain"], results(tmp_path / "two")["pretrain"]
    # The per-epoch losses agree to ~0.1% (float reduction order of the gradient average); the accuracies of
    # this briefly trained model on 193 test images move by a few near-ties.
    for key in ("clean", "pgd2"):
        assert abs(a["test"][key] - b["test"][key]) <= 0.05, (a, b)
    rows_a = [json.loads(x) for x in (one / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    rows_b = [json.loads(x) for x in (tmp_path / "two" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows_b) == 3
    assert all(abs(x["train_loss"] - y["train_loss"]) <= 3e-3 for x, y in zip(rows_a, rows_b, strict=True))


def test_torchrun_sigterm_and_resume(tmp_path):
    run = tmp_path / "run"
    flags = [*DDP_FLAGS, "--epochs", "4", "--run-dir", str(run)]
    cmd, env = _torchrun(2, flags)
    ref_cmd, _ = _torchrun(2, [*DDP_FLAGS, "--epochs", "4", "--run-dir", str(tmp_path / "ref")])
    ref = subprocess.run(ref_cmd, capture_output=True, text=True, timeout=600, env=env)
    assert ref.returncode == 0, ref.stderr[-2000:]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_epoch(run, 1, proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)  # torchrun forwards it to both workers; they stop after the same step
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and (run / "pretrain" / "last.pt").is_file()
    state = torch.load(run / "pretrain" / "last.pt", weights_only=True)
    assert len(state["torch_rng"]) == 2  # one RNG state per rank
    resume_cmd, _ = _torchrun(2, ["--resume", str(run)])
    out = subprocess.run(resume_cmd, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert results(run) == results(tmp_path / "ref")


def test_each_torchrun_rank_draws_its_own_attack_noise(monkeypatch):
    from roli import _dist
    from roli.config import TrainConfig

    cfg = TrainConfig(seed=3)
    seeds = []
    for rank in (0, 1):
        monkeypatch.setattr(_dist, "rank", lambda r=rank: r)
        seeds.append(cfg.attack_spec.training("pgd", torch.nn.Linear(2, 2)).seed)
    assert seeds[0] == 3 and seeds[1] != seeds[0]


def test_progress_lines_off_a_terminal(tmp_path, monkeypatch):
    """Off a terminal (stderr not a tty, as in a cluster job's log) the trainer logs its progress inside each
    epoch: step/steps, loss, images/s and the epoch's ETA."""
    monkeypatch.setenv("ROLI_PROGRESS_SECONDS", "0")
    run = tmp_path / "p"
    assert main(["--method", "pretrain", "--run-dir", str(run), *TINY]) == 0
    lines = [line for line in (run / "train.log").read_text().splitlines() if " step " in line]
    assert lines and re.search(r"pretrain epoch 0 step 1/\d+: loss [\d.]+, [\d.]+ img/s, epoch ETA \d+ s", lines[0])


def test_resume_restores_the_global_rng_that_dropout_draws_from(tmp_path):
    """A model with dropout draws its masks from torch's global generator: a run interrupted after an epoch
    and resumed in a process whose generator is elsewhere ends with exactly the uninterrupted weights."""
    from torch import nn

    from roli.training.loop import Stage, fit, make_optimizer, param_groups

    g = torch.Generator().manual_seed(3)
    data = [(torch.rand(8, 1, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(3)]

    def stage(train):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))
        opt = make_optimizer(param_groups(model, 0.0), "sgd", 0.5, 0.9)

        def step(x, y):
            model.train()
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss.detach(), torch.tensor(0)

        return Stage(name="ft", model=model, step=step, train=train, val=data[0], optimizer=opt, epochs=3, warmup=0,
                     attack=None, eps=0.01, step_size=0.005, val_steps=1)  # fmt: skip

    ref = stage(data)
    fit(ref, tmp_path / "ref")

    class Crashing:  # the data, with a crash in the second epoch (after the first epoch's state was saved)
        seen = 0

        def __len__(self):
            return len(data)

        def __iter__(self):
            for b in data:
                Crashing.seen += 1
                if Crashing.seen == 5:
                    raise RuntimeError("killed")
                yield b

    with pytest.raises(RuntimeError, match="killed"):
        fit(stage(Crashing()), tmp_path / "run")
    again = stage(data)
    torch.manual_seed(12345)  # a new process: the global generator is not where the run left it
    fit(again, tmp_path / "run", resume=True)
    # The final weights (last.pt: fit leaves the best epoch's in the model) and every epoch's loss.
    final = [torch.load(p / "last.pt", weights_only=True)["model"] for p in (tmp_path / "run", tmp_path / "ref")]
    assert final[0].keys() == final[1].keys() and all(torch.equal(final[0][k], final[1][k]) for k in final[0])
    losses = [[json.loads(r)["train_loss"] for r in (p / "metrics.jsonl").read_text().splitlines()]
              for p in (tmp_path / "run", tmp_path / "ref")]  # fmt: skip
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_head_init_reference_is_where_alp_starts(tmp_path, capsys):
    """--head-init reference: the run's random head is the reference's (bias -log(99) for every class); ALP at
    lr 0 keeps it, so best.pt holds it; config.json and the log say which init."""
    run = tmp_path / "run"
    assert main(["--method", "alp", "--head-init", "reference", "--lr", "0", "--run-dir", str(run), *TINY,
                 "--epochs", "1", "--warmup", "0"]) == 0  # fmt: skip
    head = torch.load(run / "alp" / "best.pt", weights_only=True)["state_dict"]
    assert torch.allclose(head["head.bias"], torch.full((5,), -4.59511985), atol=1e-6)
    assert abs(float(head["head.weight"].std()) - (2 / 5) ** 0.5) < 0.15  # fan_out = 5 classes, 320 draws
    assert json.loads((run / "config.json").read_text())["head_init"] == "reference"
    assert "head init: reference" in (run / "train.log").read_text()


@pytest.mark.parametrize("optimizer, momentum", [("adamw", 0.9), ("sgd", 0.5)])
def test_lp_trains_with_the_optimizer_it_records(tmp_path, monkeypatch, optimizer, momentum):
    """--method lp used to record --optimizer adamw in config.json and train SGD (momentum 0.9) regardless."""
    import roli.training.pipeline as pipeline

    seen = {}
    real = pipeline.train_linear_probes

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "train_linear_probes", spy)
    run = tmp_path / "lp"
    assert main(["--method", "lp", "--optimizer", optimizer, "--momentum", str(momentum), "--run-dir", str(run),
                 *TINY]) == 0  # fmt: skip
    recorded = json.loads((run / "config.json").read_text())["_resolved"]["lp"]
    assert recorded["optimizer"] == optimizer == seen["optimizer"] and seen["momentum"] == momentum


def test_lp_refuses_adamw_ref(tmp_path, capsys):
    assert main(["--method", "lp", "--optimizer", "adamw-ref", "--run-dir", str(tmp_path / "r"), *TINY]) == 2
    assert "lp.optimizer: the clean linear probe trains with sgd or adamw" in capsys.readouterr().err


def test_derived_seeds_are_the_streams_runs_were_written_with():
    """Every stream's seed as roli drew it before roli.seeds existed (hand-written numbers, not the table): a
    run's last.pt continues these streams on --resume, and evaluations repeat their random starts."""
    from roli.attacks.accuracy import batch_seed
    from roli.seeds import derive_seed

    assert [derive_seed(11, "training attack", rank=r) for r in (0, 1, 3)] == [11, 1_000_014, 3_000_020]
    assert derive_seed(11, "guard check") == 16 and derive_seed(11, "guard single-step") == 18
    assert derive_seed(11, "fallback attack", rank=2) == 11 + 2_000_003 + 2_000_006
    assert [batch_seed(4, i) for i in (0, 1, 5)] == [4, 7923, 39599]
    with pytest.raises(ValueError, match="unknown seed purpose"):
        derive_seed(0, "dropout")
