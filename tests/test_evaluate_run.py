"""roli evaluate: --run's refusals word for word, which files it reads (and so may not have changed), the stage's
model as the stage trained it (a linear probe and a pretraining run whose config names a PEFT method for
another stage, a backbone file gone since), --trust-code, the line that names the stage evaluated, and the
--model path's --interpolation, --non-strict and --out rules. Tiny runs of the digits (seconds)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_run_safety import one_line

from roli.evaluate import main as evaluate
from roli.train import main as train

QUICK = ["--dataset", "digits", "--classes", "0-4", "--eps", "0.1", "--step-size", "0.05", "--steps", "1",
         "--val-steps", "2", "--epochs", "2", "--warmup", "0", "--n-ex", "40"]  # fmt: skip
VIT = {"img_size": 8, "patch_size": 4, "depth": 1, "embed_dim": 24, "num_heads": 2}
ERR = "python -m roli.evaluate: error: "


@pytest.fixture(scope="module")
def runs(tmp_path_factory, checkpoint) -> Path:
    """A finished RoLI run from a backbone file that is then moved away, and beside it nothing else."""
    root = tmp_path_factory.mktemp("evaluate_run")
    backbone = root / "backbone.pt"
    shutil.copy(checkpoint, backbone)
    assert train(["--method", "roli", "--checkpoint", str(backbone), *QUICK, "--run-dir", str(root / "roli")]) == 0
    backbone.rename(root / "gone.pt")  # the run holds its model: evaluating it needs no backbone file
    return root


@pytest.fixture
def run(runs, tmp_path) -> Path:
    shutil.copytree(runs / "roli", tmp_path / "roli")
    return tmp_path / "roli"


def _results(run: Path, stage: str) -> dict:
    return json.loads((run / "results.json").read_text())[stage]


def test_a_run_is_evaluated_as_it_tested_itself_and_the_stage_is_named(run, capsys):
    out = run.parent / "r.json"
    assert evaluate(["--run", str(run), "--n-ex", "40", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    best = torch.load(run / "roli-ft" / "best.pt", map_location="cpu", weights_only=True)["meta"]
    robust = f"{100 * best['val_robust']:.2f}%"
    assert printed[0] == f"run: {run / 'roli-ft'} (best epoch {best['epoch']}, val PGD {robust})"
    res, ran = json.loads(out.read_text()), _results(run, "RoLI-full")["test"]
    assert (res["n"], res["clean"]) == (ran["n"], ran["clean"])
    assert res["attacks"] == {"PGD-2 (linf, eps=0.1)": ran["pgd2"]}
    assert evaluate(["--run", str(run), "--stage", "alp", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"run: {run / 'alp'} (best epoch ")
    assert json.loads(out.read_text())["clean"] == _results(run, "alp")["test"]["clean"]


def test_a_folder_of_runs_lists_them_and_a_folder_without_one_is_named(tmp_path, runs, capsys):
    for name in ("b", "a"):
        shutil.copytree(runs / "roli", tmp_path / "runs" / name)
    assert evaluate(["--run", str(tmp_path / "runs")]) == 2
    line = one_line(capsys, ERR)
    a, b = tmp_path / "runs" / "a", tmp_path / "runs" / "b"
    assert line == f"{ERR}--run: {tmp_path / 'runs'} holds 2 runs, evaluate one of them: --run {a} | --run {b}"
    for empty in (tmp_path / "runs" / "a" / "alp", tmp_path / "nothing"):
        assert evaluate(["--run", str(empty)]) == 2
        line = one_line(capsys, ERR)
        assert line == f"{ERR}--run: {empty} holds no config.json: not a run directory of python -m roli.train"


def test_model_flags_with_run_are_all_named(run, capsys):
    flags = ["--model", "m", "--checkpoint", "c.pt", "--model-arg", "a=1", "--mean", "0.5", "--std", "0.5",
             "--input-size", "9", "--num-classes", "5", "--ema", "--timm-pretrained"]  # fmt: skip
    assert evaluate(["--run", str(run), *flags]) == 2
    assert one_line(capsys, ERR) == (
        f"{ERR}--run rebuilds the model as the run trained it: drop --model, --checkpoint, --model-arg, --mean, "
        "--std, --input-size, --num-classes, --ema, --timm-pretrained"
    )


def test_only_the_files_it_reads_must_be_as_roli_wrote_them(run, capsys):
    log = run / "train.log"
    log.write_text(log.read_text() + "a line of the user's\n")  # not read by evaluate
    other = run / "alp" / "best.pt"
    kept = other.read_bytes()
    other.write_bytes(kept[:-1] + bytes([kept[-1] ^ 1]))  # another stage's checkpoint than the one evaluated
    assert evaluate(["--run", str(run), "--attack", "none"]) == 0
    capsys.readouterr()
    assert evaluate(["--run", str(run), "--stage", "alp", "--attack", "none"]) == 2
    assert one_line(capsys, ERR) == (
        f"{ERR}--run: in {run}, alp/best.pt is not the file roli wrote there (edited or replaced); evaluate the files "
        "roli wrote (or train the run again)"
    )
    other.write_bytes(kept)
    best = run / "roli-ft" / "best.pt"
    best.write_bytes(best.read_bytes() + b"\0")
    assert evaluate(["--run", str(run), "--attack", "none"]) == 2  # the default stage's: the last finished
    assert one_line(capsys, ERR).startswith(f"{ERR}--run: in {run}, roli-ft/best.pt ")


def test_a_stage_that_is_not_there_names_those_that_are(run, tmp_path, capsys):
    assert evaluate(["--run", str(run), "--stage", "lp"]) == 2
    assert one_line(capsys, ERR) == (
        f"{ERR}--stage: {run} has no finished stage 'lp' (stages with a best.pt: roli-ft, alp)"
    )
    for stage in ("roli-ft", "alp"):
        shutil.rmtree(run / stage)
    assert evaluate(["--run", str(run)]) == 2
    assert one_line(capsys, ERR) == f"{ERR}--stage: {run} has no finished stage None (stages with a best.pt: none)"


def test_a_checkpoint_copied_from_another_run_is_one_line_naming_it(run, tmp_path, capsys):
    from roli._io import atomic_write

    other = tmp_path / "other"
    assert train(["--method", "alp", "--random-backbone", *QUICK, "--run-dir", str(other)]) == 0
    capsys.readouterr()
    blob = (other / "alp" / "best.pt").read_bytes()
    atomic_write(run / "alp" / "best.pt", lambda tmp: Path(tmp).write_bytes(blob))  # the manifest agrees
    assert evaluate(["--run", str(run), "--stage", "alp", "--attack", "none"]) == 2
    assert one_line(capsys, ERR) == (
        f"{ERR}--run: {run / 'alp' / 'best.pt'} was written by another run (copied in?), not by the run in {run}; "
        "move it away"
    )


@pytest.mark.parametrize("method", ["lp", "pretrain"])
def test_a_stage_without_finetuning_is_rebuilt_without_the_configs_peft(tmp_path, method, capsys):
    """A config file may name a PEFT method (for its finetuning); --method lp or pretrain has no finetuning stage,
    so the stage's model is the plain classifier, and evaluate --run builds that (a LoRA branch would not load)."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"peft": "lora", "model": "vit_tiny_patch16_224", "model_args": VIT}))
    run = tmp_path / method
    extra = ["--random-backbone"] if method == "lp" else ["--epochs", "1"]
    assert train(["--config", str(config), "--method", method, *QUICK, *extra, "--run-dir", str(run)]) == 0
    capsys.readouterr()
    out = tmp_path / "r.json"
    assert evaluate(["--run", str(run), "--n-ex", "40", "--out", str(out)]) == 0
    res, ran = json.loads(out.read_text()), _results(run, method)["test"]
    assert (res["clean"], res["attacks"]["PGD-2 (linf, eps=0.1)"]) == (ran["clean"], ran["pgd2"])


def test_trust_code_builds_a_run_of_a_users_module(tmp_path, monkeypatch, capsys):
    (tmp_path / "usernet.py").write_text(
        "from roli.models.small import small_cnn\n\ndef make(in_chans=1):\n    return small_cnn(in_chans=in_chans)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    assert (
        train(["--method", "alp", "--model", "usernet:make", "--random-backbone", *QUICK, "--run-dir", str(run)]) == 0
    )
    capsys.readouterr()
    assert evaluate(["--run", str(run), "--attack", "none"]) == 2
    assert one_line(capsys, ERR).startswith(
        f"{ERR}--run: model: usernet:make (from {run / 'config.json'}) would import and run that code; "
    )
    argv = ["--run", str(run), "--attack", "none", "--trust-code", "--n-ex", "40", "--out", str(tmp_path / "r.json")]
    assert evaluate(argv) == 0
    meta = torch.load(run / "alp" / "best.pt", map_location="cpu", weights_only=True)["meta"]
    assert 0 < meta["val_robust"] < 1  # (the other test's run is robust on every validation image)
    line = f"run: {run / 'alp'} (best epoch {meta['epoch']}, val PGD {100 * meta['val_robust']:.2f}%)"
    assert capsys.readouterr().out.splitlines()[0] == line
    assert json.loads((tmp_path / "r.json").read_text())["clean"] == _results(run, "alp")["test"]["clean"]


BASE = ["--model", "roli.models.small:small_cnn", "--dataset", "digits", "--n-ex", "120", "--attack", "none"]


def _hand_bits(checkpoint, **resize) -> str:
    """Which of the first 120 digits test images the checkpoint classifies correctly, computed here."""
    from roli.data.arrays import digits
    from roli.models.small import small_cnn

    x, y = digits()[1].to_float()
    x, y = x[:120], y[:120]
    if resize:
        x = F.interpolate(x, align_corners=False, **resize)
    model = small_cnn(10, 1)
    model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"])
    with torch.no_grad():
        return "".join("1" if c else "0" for c in (model.eval()(x).argmax(1) == y).tolist())


def test_the_resize_inside_the_model_is_the_interpolation_asked_for(checkpoint, tmp_path):
    bits = {}
    for mode in ("bilinear", "bicubic"):
        out = tmp_path / f"{mode}.json"
        argv = [*BASE, "--checkpoint", str(checkpoint), "--input-size", "7", "--interpolation", mode]
        assert evaluate([*argv, "--out", str(out)]) == 0
        bits[mode] = json.loads(out.read_text())["per_example"]["clean"]
        assert bits[mode] == _hand_bits(checkpoint, size=7, mode=mode)
    assert bits["bilinear"] != bits["bicubic"]  # the two resizes differ on these images: the test can tell them


def test_non_strict_loads_a_checkpoint_with_a_key_too_many(checkpoint, tmp_path, capsys):
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state["state_dict"]["extra.weight"] = torch.randn(3)
    extra = tmp_path / "extra.pt"
    torch.save(state, extra)
    assert evaluate([*BASE, "--checkpoint", str(extra)]) == 2
    assert "extra.weight" in one_line(capsys, ERR)
    out = tmp_path / "r.json"
    assert evaluate([*BASE, "--checkpoint", str(extra), "--non-strict", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["per_example"]["clean"] == _hand_bits(checkpoint)


@pytest.mark.parametrize(
    "content, replaced",
    [
        ('{"n": 1, "clean": 1.0, "attacks": {}, "per_example": {}}', True),  # exactly a result's keys
        ('{"n": 1, "clean": 1.0, "attacks": {}}', False),
        ('[{"n": 1, "clean": 1.0, "attacks": {}, "per_example": {}}]', False),
        ("not json", False),
        (b"\xff\xfe", False),
    ],
)
def test_out_replaces_only_an_earlier_result(checkpoint, tmp_path, capsys, content, replaced):
    out = tmp_path / "r.json"
    out.write_bytes(content if isinstance(content, bytes) else content.encode())
    code = evaluate([*BASE, "--checkpoint", str(checkpoint), "--out", str(out)])
    assert code == (0 if replaced else 2)
    if replaced:
        assert json.loads(out.read_text())["n"] == 120
    else:
        assert (
            one_line(capsys, ERR)
            == f"{ERR}--out: {out} exists and is not a result of roli evaluate; give another file name"
        )
        assert out.read_bytes() == (content if isinstance(content, bytes) else content.encode())


def test_the_table_as_written():
    from roli.evaluate import render

    results = {"n": 7, "seconds": 1.5, "clean": 0.5, "worst_case": 0.0625, "processes": 2, "device": "cpu",
               "attacks": {"PGD-2 (linf, eps=8/255)": 0.25, "AutoAttack-standard (linf, eps=8/255)": 0.125},
               "attacks_reference_scoring": {"PGD-2 reference scoring (per batch of 64)": 0.3},
               "eps_sweep": {f"{4 / 255:.6g}": 0.4, "0.05": 0.123456}}  # fmt: skip
    assert render(results) == (
        "evaluation                                | accuracy\n"
        "------------------------------------------|---------\n"
        "clean                                     |   50.00%\n"
        "PGD-2 (linf, eps=8/255)                   |   25.00%\n"
        "AutoAttack-standard (linf, eps=8/255)     |   12.50%\n"
        "worst case (all attacks)                  |    6.25%\n"
        "PGD-2 reference scoring (per batch of 64) |   30.00%\n"
        "PGD sweep eps=4/255                       |   40.00%\n"
        "PGD sweep eps=0.05                        |   12.35%\n"
        "(7 examples, 1.5 s, 2 processes, cpu)"
    )
    alone = {"n": 3, "seconds": 0.25, "clean": 1.0, "attacks": {}, "worst_case": 1.0}
    assert render(alone) == "evaluation | accuracy\n-----------|---------\nclean      |  100.00%\n(3 examples, 0.25 s)"
    # (the header is the widest name here: the rows are as wide as it)


def test_the_results_name_each_attack_as_run(checkpoint, tmp_path):
    out = tmp_path / "r.json"
    argv = ["--model", "roli.models.small:small_cnn", "--dataset", "digits", "--n-ex", "70", "--batch-size", "32",
            "--checkpoint", str(checkpoint), "--steps", "2", "--restarts", "2",
            "--eps-sweep", "8/255,0.05"]  # fmt: skip
    assert evaluate([*argv, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert list(res["attacks"]) == ["PGD-2 (linf, eps=8/255, 2 restarts)"]
    assert list(res["eps_sweep"]) == ["0.0313725", "0.05"]
    assert 1 >= res["eps_sweep"]["0.0313725"] >= res["eps_sweep"]["0.05"] >= 0  # fractions, falling with the budget
    # scored as the reference scores: per batch of its 64 examples, whatever the evaluation's batch
    assert list(res["attacks_reference_scoring"]) == ["PGD-2 reference scoring (per batch of 64)"]
    assert list(res["per_example"]) == ["clean", "pgd", "pgd_reference", "worst_case"]
    assert {k: len(v) for k, v in res["per_example"].items()} == dict.fromkeys(res["per_example"], 70)
    assert (res["n"], res["processes"], res["device"]) == (70, 1, "cpu")
    assert res["config"]["restarts"] == 2 and res["config"]["eps_sweep"] == "8/255,0.05"
    for name, key in (("clean", "clean"), ("worst_case", "worst_case")):
        assert res[key] == res["per_example"][name].count("1") / 70


def test_autoattack_from_the_command_line_and_its_state_folder(checkpoint, tmp_path, capsys, monkeypatch):
    """A budget that APGD-CE already breaks everywhere (fast: the later attacks have no point left to attack):
    what the results name, the progress lines, the state folder made with its parents, a killed evaluation's
    temporary removed (and nothing else), and a second evaluation that reads the states instead of attacking."""
    import re

    monkeypatch.setenv("ROLI_PROGRESS_SECONDS", "0")
    state = tmp_path / "deep" / "aa"
    argv = ["--model", "roli.models.small:small_cnn", "--dataset", "digits", "--n-ex", "10", "--batch-size", "4",
            "--checkpoint", str(checkpoint), "--eps", "0.4", "--steps", "2", "--autoattack", "standard",
            "--aa-state", str(state)]  # fmt: skip
    out = tmp_path / "r.json"
    assert evaluate([*argv, "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    label = "AutoAttack-standard (linf, eps=102/255)"
    assert list(res["attacks"]) == ["PGD-2 (linf, eps=102/255)", label]
    assert res["attacks"][label] == 0.0 and res["attacks"]["PGD-2 (linf, eps=102/255)"] > 0
    assert res["autoattack_per_attack"] == {"apgd-ce": 0.0, "apgd-t": 0.0, "fab-t": 0.0, "square": 0.0}
    assert res["per_example"]["autoattack"] == "0" * 10 and res["per_example"]["worst_case"] == "0" * 10
    assert res["worst_case"] == 0.0 and res["autoattack_warnings"] == []
    err = capsys.readouterr().err.splitlines()
    assert err[0] == (
        "evaluate: AutoAttack-standard on 10 images in 3 batches (a progress line at most every 0 s: "
        "ROLI_PROGRESS_SECONDS)"
    )
    aa_lines = [e for e in err if "AutoAttack apgd-ce" in e]
    assert [e.split(":")[1] for e in aa_lines] == [" batch 1/3", " batch 2/3", " batch 3/3"]
    assert all(re.search(r": 0/\d still robust \(\d+ s\)$", e) for e in aa_lines), aa_lines  # (seconds vary)
    progress = [e for e in err if ", ETA " in e]
    assert [e.split(",")[0] for e in progress[-2:]] == ["evaluate: batch 1/3", "evaluate: batch 2/3"]
    assert sorted(p.name for p in state.iterdir()) == ["batch0.pt", "batch1.pt", "batch2.pt"]
    # a killed evaluation's temporary (atomic_write's name) goes; a file of the user's stays
    for name in (".batch1.pt.abcdefgh.tmp", ".batch1.pt.abc.tmp", "notes.txt"):
        (state / name).write_text("x")
    assert evaluate([*argv, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["per_example"] == res["per_example"]
    assert sorted(p.name for p in state.iterdir()) == [".batch1.pt.abc.tmp", "batch0.pt", "batch1.pt", "batch2.pt",
                                                       "notes.txt"]  # fmt: skip
    assert not [e for e in capsys.readouterr().err.splitlines() if "AutoAttack apgd" in e]  # read, not attacked


def test_autoattack_figures_of_points_it_cannot_break(tmp_path, monkeypatch):
    """A linear model whose bias decides (weights of 1e-3: a budget of 0.1 moves a logit by at most 0.0064 < 1):
    the digits of class 0 are robust to every attack, the others are wrong from the start. Each figure is then
    the share of 0s among the images, counted here."""
    from test_evaluate import LOGITS_MODULE

    from roli.data.arrays import digits

    (tmp_path / "tiny_logits.py").write_text(LOGITS_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    torch.manual_seed(0)
    ck = tmp_path / "ck.pt"
    bias = torch.zeros(10)
    bias[0] = 1.0
    torch.save({"1.weight": 1e-3 * torch.randn(10, 64), "1.bias": bias}, ck)
    y = digits()[1].y[:30]
    zeros = "".join("1" if v == 0 else "0" for v in y.tolist())
    share = zeros.count("1") / 30
    assert 0 < share < 1
    out = tmp_path / "r.json"
    argv = ["--model", "tiny_logits:net", "--checkpoint", str(ck), "--dataset", "digits", "--n-ex", "30",
            "--input-size", "8", "--eps", "0.1", "--steps", "2", "--autoattack", "standard",
            "--out", str(out)]  # fmt: skip
    assert evaluate(argv) == 0
    res = json.loads(out.read_text())
    assert res["clean"] == share and res["worst_case"] == share
    assert res["attacks"] == {"PGD-2 (linf, eps=0.1)": share, "AutoAttack-standard (linf, eps=0.1)": share}
    assert res["autoattack_per_attack"] == dict.fromkeys(("apgd-ce", "apgd-t", "fab-t", "square"), share)
    assert res["per_example"] == dict.fromkeys(("clean", "pgd", "pgd_reference", "autoattack", "worst_case"), zeros)
    assert res["autoattack_warnings"] == []


def test_ema_evaluates_the_checkpoints_ema_weights(checkpoint, tmp_path):
    """A timm CheckpointSaver file: the model under "state_dict", its EMA under "state_dict_ema" (here: other
    weights with noise added). --ema evaluates the EMA's, computed here."""
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    torch.manual_seed(1)
    ema = {k: v + 0.3 * torch.randn_like(v) if v.is_floating_point() and v.dim() > 1 else v for k, v in state.items()}
    saver = tmp_path / "saver.pth.tar"
    torch.save({"state_dict": state, "state_dict_ema": ema}, saver)
    torch.save({"state_dict": ema}, tmp_path / "ema.pt")
    bits = {}
    for name, extra in (("plain", []), ("ema", ["--ema"])):
        out = tmp_path / f"{name}.json"
        assert evaluate([*BASE, "--checkpoint", str(saver), *extra, "--out", str(out)]) == 0
        bits[name] = json.loads(out.read_text())["per_example"]["clean"]
    assert bits["plain"] == _hand_bits(checkpoint)
    assert bits["ema"] == _hand_bits(tmp_path / "ema.pt") != bits["plain"]


def test_download_and_timm_pretrained_reach_the_model(tmp_path, monkeypatch, capsys):
    """Offline here: --download tries the registry's URL (refused in one line when unreachable), and without it
    the file is asked for; --timm-pretrained asks timm's hub (offline: one line), and without it the model has
    no weights to evaluate."""
    import urllib.request

    monkeypatch.setenv("ROLI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tried = []

    def offline(url, timeout=None):
        tried.append(url)
        raise OSError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    zoo = ["--model", "ares_vit_b", "--dataset", "digits", "--n-ex", "4", "--attack", "none"]
    assert evaluate(zoo) == 2
    assert "or add --download where the host is reachable" in one_line(capsys, ERR) and tried == []
    assert evaluate([*zoo, "--download"]) == 2
    assert "ares_vit_b: cannot download https://" in one_line(capsys, ERR) and len(tried) == 1
    timm = ["--model", "vit_tiny_patch16_224", "--dataset", "digits", "--n-ex", "4", "--attack", "none"]
    assert evaluate([*timm, "--timm-pretrained"]) == 2
    assert "timm's weights are not in the local cache" in one_line(capsys, ERR)
    assert evaluate(timm) == 2  # no weights asked for: nothing holds a classifier to evaluate
    assert "--checkpoint: nothing supplies a classifier for 10 classes (no --checkpoint)" in one_line(capsys, ERR)


def test_out_inside_a_run_only_under_evaluations(run, capsys):
    ok = run / "roli-ft" / "evaluations" / "mine.json"
    ok.parent.mkdir()
    assert evaluate(["--run", str(run), "--attack", "none", "--n-ex", "1", "--out", str(ok)]) == 0
    res = json.loads(ok.read_text())
    assert res["n"] == 1 and res["clean"] in (0.0, 1.0) and res["clean"] == int(res["per_example"]["clean"])
    capsys.readouterr()
    bad = run / "roli-ft" / "mine.json"
    assert evaluate(["--run", str(run), "--attack", "none", "--out", str(bad)]) == 2
    assert one_line(capsys, ERR) == (
        f"{ERR}--out: {bad} lies inside the run directory {run}; give a file outside it (or no --out with --run: "
        "the result goes to STAGE/evaluations/)"
    )
    assert not bad.exists()


def test_out_is_never_the_dataset_even_under_a_colon(checkpoint, tmp_path, capsys):
    import numpy as np

    data = tmp_path / "a:b" / "d.npz"
    data.parent.mkdir()
    rng = np.random.default_rng(0)
    np.savez(data, x_test=(rng.random((6, 8, 8)) * 255).astype(np.uint8), y_test=np.arange(6) % 10)
    before = data.read_bytes()
    argv = ["--model", "roli.models.small:small_cnn", "--dataset", f"npz:{data}", "--num-classes", "10",
            "--checkpoint", str(checkpoint), "--attack", "none", "--out", str(data)]  # fmt: skip
    assert evaluate(argv) == 2
    assert one_line(capsys, ERR) == f"{ERR}--out: {data} is an input of this evaluation; give another file name"
    assert data.read_bytes() == before


def test_moved_data_is_evaluated_where_it_now_is_and_changed_data_is_named(tmp_path, capsys):
    import numpy as np
    from test_run_safety import make_npz

    data = make_npz(tmp_path / "old" / "d.npz")
    run = tmp_path / "run"
    argv = ["--method", "alp", "--dataset", f"npz:{data}", *QUICK[4:], "--random-backbone", "--run-dir", str(run)]
    assert train(argv) == 0
    moved = tmp_path / "new" / "d.npz"
    moved.parent.mkdir()
    data.rename(moved)
    capsys.readouterr()
    out = tmp_path / "r.json"
    assert evaluate(["--run", str(run), "--dataset", f"npz:{moved}", "--n-ex", "40", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["clean"] == _results(run, "alp")["test"]["clean"]
    with np.load(moved) as f:
        arrays = dict(f)
    arrays["y_test"] = np.roll(arrays["y_test"], 1)
    np.savez(moved, **arrays)
    capsys.readouterr()
    assert evaluate(["--run", str(run), "--dataset", f"npz:{moved}"]) == 2
    assert one_line(capsys, ERR) == (  # (it said "--dataset: --run: ...")
        f"{ERR}--run: the test split's labels changed since the run started in {run}; start a new run for changed "
        "data or settings (--allow-changed-data to evaluate anyway, recorded in the results)"
    )
    argv = ["--run", str(run), "--dataset", f"npz:{moved}", "--allow-changed-data", "--out", str(out)]
    assert evaluate(argv) == 0
    assert json.loads(out.read_text())["config"]["changed_since_run"] == ["the test split's labels"]
    capsys.readouterr()
    assert evaluate(["--run", str(run)]) == 2  # the run's own path: gone
    assert one_line(capsys, ERR) == f"{ERR}--dataset: npz file not found: {data}"


def test_the_validation_split_of_a_run_is_the_one_it_validated_on(run, capsys):
    out = run.parent / "val.json"
    assert evaluate(["--run", str(run), "--stage", "alp", "--split", "val", "--attack", "none", "--out", str(out)]) == 0
    meta = torch.load(run / "alp" / "best.pt", map_location="cpu", weights_only=True)["meta"]
    res = json.loads(out.read_text())
    assert res["clean"] == meta["val_clean"]
    assert (
        evaluate(["--run", str(run), "--stage", "alp", "--split", "train", "--attack", "none", "--out", str(out)]) == 0
    )
    n_train = json.loads(out.read_text())["n"]
    from roli.data.arrays import digits

    five = int((digits()[0].y < 5).sum())  # digits 0-4 in the fixed 80% split: train and validation share them
    assert n_train + res["n"] == five and abs(res["n"] - five / 10) < 5


def test_without_out_the_result_goes_into_the_stages_evaluations(run, capsys):
    import hashlib
    import re

    assert evaluate(["--run", str(run), "--attack", "none", "--n-ex", "5"]) == 0
    (written,) = (run / "roli-ft" / "evaluations").iterdir()
    assert re.fullmatch(r"\d{8}-\d{6}-\d{6}-\d+\.json", written.name), written.name  # to the microsecond, pid
    assert capsys.readouterr().out.splitlines()[-1] == f"results written to {written}"
    record = json.loads(written.read_text())["checkpoint"]
    assert record == {
        "file": "best.pt",
        "sha256": hashlib.sha256((run / "roli-ft" / "best.pt").read_bytes()).hexdigest(),
    }
    assert evaluate(["--run", str(run), "--attack", "none", "--n-ex", "5"]) == 0  # a second one beside it (it
    # replaced the first when both started in the same second)
    assert len(list((run / "roli-ft" / "evaluations").iterdir())) == 2


def test_a_best_pt_that_does_not_load_is_one_line(run, capsys):
    from roli._io import atomic_write

    atomic_write(run / "roli-ft" / "best.pt", lambda tmp: Path(tmp).write_bytes(b"not a checkpoint"))
    assert evaluate(["--run", str(run), "--attack", "none"]) == 2
    assert one_line(capsys, ERR).startswith(f"{ERR}--run: ")


def test_each_attack_setting_reaches_the_attack(checkpoint, tmp_path, capsys):
    """--seed, --restarts and --loss each change which images PGD breaks (so each reached it), the same settings
    twice give the same images, and --attack none runs no attack at all. (--precision bf16 flips at most one of
    these images on a CPU: too few to tell; test_evaluate's bf16 test compares its figures.)"""
    base = ["--model", "roli.models.small:small_cnn", "--dataset", "digits", "--n-ex", "360", "--checkpoint",
            str(checkpoint), "--eps", "0.16", "--steps", "3"]  # fmt: skip

    def bits(*extra):
        out = tmp_path / "r.json"
        assert evaluate([*base, *extra, "--out", str(out)]) == 0
        return json.loads(out.read_text())["per_example"]

    first = bits()
    default = first["pgd"]
    assert bits()["pgd"] == default
    both = "".join("1" if c == p == "1" else "0" for c, p in zip(first["clean"], default, strict=True))
    assert first["worst_case"] == both and "0" in default and default != first["clean"]  # PGD broke some
    for extra in (["--seed", "5"], ["--restarts", "2"], ["--loss", "dlr"]):
        changed = bits(*extra)["pgd"]
        assert changed != default and bits(*extra)["pgd"] == changed, extra
    none = tmp_path / "none.json"
    capsys.readouterr()
    assert evaluate([*base, "--attack", "none", "--out", str(none)]) == 0
    res = json.loads(none.read_text())
    assert res["attacks"] == {} and sorted(res["per_example"]) == ["clean", "worst_case"]
    assert res["worst_case"] == res["clean"] and capsys.readouterr().err == ""  # no AutoAttack line without it


def test_a_moved_run_is_evaluated_where_it_is(runs, tmp_path, capsys):
    """config.json names the folder the run trained in; a run moved since is read (and locked) where it is now,
    and its config.json as roli wrote it."""
    shutil.copytree(runs / "roli", tmp_path / "a")
    (tmp_path / "a").rename(tmp_path / "b")
    run = tmp_path / "b"
    assert json.loads((run / "config.json").read_text())["run_dir"] == str(runs / "roli")
    shutil.copytree(run, tmp_path / "c")
    out = tmp_path / "r.json"
    assert evaluate(["--run", str(run), "--attack", "none", "--n-ex", "5", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["n"] == 5
    config = run / "config.json"
    config.write_text(config.read_text().replace('"seed": 0', '"seed": 1'))  # edited: not what roli wrote
    capsys.readouterr()
    assert evaluate(["--run", str(run), "--attack", "none"]) == 2
    assert one_line(capsys, ERR).startswith(f"{ERR}--run: in {run}, config.json is not the file roli wrote there")


def test_a_split_the_data_lacks_and_an_image_root_elsewhere(checkpoint, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(6)
    np.savez(tmp_path / "t.npz", x_test=rng.integers(0, 256, (4, 8, 8), dtype=np.uint8), y_test=[0, 1, 2, 3])
    base = ["--model", "roli.models.small:small_cnn", "--checkpoint", str(checkpoint), "--num-classes", "10",
            "--attack", "none"]  # fmt: skip
    assert evaluate([*base, "--dataset", f"npz:{tmp_path / 't.npz'}", "--split", "train"]) == 2
    assert one_line(capsys, ERR) == f"{ERR}--dataset: npz:{tmp_path / 't.npz'} has no train split"
    images, splits = tmp_path / "images", tmp_path / "splits"
    splits.mkdir()
    mapping = {}
    for i in range(30):
        rel = f"{i % 2}/{i}.png"
        (images / str(i % 2)).mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((8, 8)) * 255).astype(np.uint8)).save(images / rel)
        mapping[rel] = i % 2
    for name in ("train.json", "test.json"):
        (splits / name).write_text(json.dumps(mapping))
    from roli.models.small import small_cnn

    torch.save({"state_dict": small_cnn(10, 3).state_dict()}, tmp_path / "rgb.pt")  # image files load as RGB
    base[3] = str(tmp_path / "rgb.pt")
    data = ["--dataset", f"json:{splits}"]
    assert evaluate([*base, *data]) == 2  # the images are not under the split files' folder
    assert one_line(capsys, ERR).startswith(f"{ERR}--dataset: ")
    out = tmp_path / "r.json"
    assert evaluate([*base, *data, "--image-root", str(images), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["n"] == 30


def test_flag_refusals_and_defaults_word_for_word(checkpoint, tmp_path, capsys):
    base = ["--model", "roli.models.small:small_cnn", "--dataset", "digits", "--n-ex", "60", "--checkpoint",
            str(checkpoint)]  # fmt: skip
    cases = [
        (["--eps", "0"], "--step-size must be > 0 (with --eps 0, give --step-size explicitly)"),
        (["--num-classes", "1"], "--num-classes must be >= 2; got 1"),
        (["--num-classes", "2"], "--num-classes 2 but the labels go up to 9"),  # 2 is a class count: the labels decide
        (["--num-classes", "9"], "--num-classes 9 but the labels go up to 9"),
        (["--input-size", "0"], "--input-size must be >= 1; got 0"),
        (["--mean", "0.5,0.5", "--std", "0.2,0.2"], "--mean/--std have 2 channels but the images have 1"),
        (["--stage", "alp"], "--stage goes with --run"),
        (["--aa-state", str(checkpoint)], f"--aa-state: {checkpoint} is a file; give a directory (one state file per "
                                          "batch goes there)"),
    ]  # fmt: skip
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: no CUDA device is available"))
    for extra, message in cases:
        assert evaluate([*base, *extra]) == 2, extra
        assert one_line(capsys, ERR) == f"{ERR}{message}", extra
    for partial in (base[:2], base[2:4]):
        assert evaluate(partial) == 2
        assert one_line(capsys, ERR) == f"{ERR}give --model and --dataset (or --run RUN_DIR)"
    (tmp_path / "aa").mkdir()
    (tmp_path / "aa" / "batch0.pt").write_bytes(b"not a state")
    assert evaluate([*base, "--aa-state", str(tmp_path / "aa"), "--autoattack", "standard"]) == 2
    assert one_line(capsys, ERR).startswith(f"{ERR}--aa-state: ")
    out = tmp_path / "r.json"
    assert evaluate([*base, "--eps", "0", "--attack", "none", "--out", str(out)]) == 0  # no attack: no step needed
    bits = {}
    for name, extra in (("default", []), ("quarter", ["--step-size", "0.025"])):  # default step: eps / 4
        assert evaluate([*base, "--eps", "0.1", "--steps", "3", *extra, "--out", str(out)]) == 0
        res = json.loads(out.read_text())
        bits[name] = res["per_example"]["pgd"]
        assert 0 <= res["seconds"] < 600 and res["seconds"] == round(res["seconds"], 2)
    assert bits["default"] == bits["quarter"]
    assert list(json.loads(out.read_text())["attacks"]) == ["PGD-3 (linf, eps=0.1)"]
    assert evaluate([*base, "--out", str(out)]) == 0  # the defaults: PGD-10 at 8/255
    assert list(json.loads(out.read_text())["attacks"]) == ["PGD-10 (linf, eps=8/255)"]


def test_autoattack_takes_four_classes(tmp_path):
    from test_run_safety import make_npz

    from roli.models.small import small_cnn

    data = make_npz(tmp_path / "d.npz")  # 4 classes
    torch.manual_seed(0)
    torch.save({"state_dict": small_cnn(4, 1).state_dict()}, tmp_path / "four.pt")
    argv = ["--model", "roli.models.small:small_cnn", "--checkpoint", str(tmp_path / "four.pt"), "--dataset",
            f"npz:{data}", "--n-ex", "4", "--eps", "1", "--steps", "1", "--autoattack", "standard",
            "--out", str(tmp_path / "r.json")]  # fmt: skip
    assert evaluate(argv) == 0
    assert "AutoAttack-standard (linf, eps=255/255)" in json.loads((tmp_path / "r.json").read_text())["attacks"]
