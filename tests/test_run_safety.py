"""No data lost and no wrong figure from a changed run: --overwrite deletes only roli's outputs and never an
input of the new run; --resume only of roli's runs, and of unchanged ones (settings and data fingerprinted);
evaluate --run refuses changed data unless told; one process at a time in a run directory; a file never names
code to run (registry, timm and roli's own models only) without --trust-code. Each case: exit code 2, one line
on stderr, no Traceback, and every file hashed before and after."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from roli._io import atomic_write, record, save_json
from roli.evaluate import main as evaluate
from roli.rundir import OUTPUTS, RunLock, written_by_roli
from roli.train import main as train

QUICK = ["--eps", "0.1", "--step-size", "0.05", "--steps", "1", "--val-steps", "1", "--epochs", "1", "--warmup", "0",
         "--random-backbone"]  # fmt: skip


def tree_hash(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}  # fmt: skip


def one_line(capsys, pattern: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and pattern in lines[0], lines
    return lines[0]


def make_npz(path: Path, seed: int = 0, n: int = 120) -> Path:
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 4
    x = (rng.random((n, 8, 8)) * 0.3 + y[:, None, None] * 0.2).astype(np.float32)  # learnable: brightness
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x_train=x, y_train=y, x_test=x[:40], y_test=y[:40])
    return path


@pytest.fixture(scope="module")
def npz_run(tmp_path_factory) -> tuple[Path, Path]:
    """A finished tiny ALP run on an npz dataset: (run directory, the npz)."""
    base = tmp_path_factory.mktemp("safety")
    data = make_npz(base / "data" / "d.npz")
    run = base / "run"
    assert train(["--method", "alp", "--dataset", f"npz:{data}", *QUICK, "--run-dir", str(run)]) == 0
    return run, data


@pytest.fixture
def run_copy(npz_run, tmp_path) -> tuple[Path, Path]:
    run, data = npz_run
    dest, data_dest = tmp_path / "run", tmp_path / "data" / "d.npz"
    shutil.copytree(run, dest)
    data_dest.parent.mkdir()
    shutil.copy(data, data_dest)
    cfg = json.loads((dest / "config.json").read_text())
    cfg["dataset"] = f"npz:{data_dest}"  # the copy reads its own copy of the data
    save_json(cfg, dest / "config.json")  # as roli writes them: recorded in the copy's manifest
    save_json(_fingerprint_of(dest), dest / "fingerprint.json")
    return dest, data_dest


def _fingerprint_of(run: Path) -> dict:
    from roli.config import TrainConfig
    from roli.rundir import fingerprint

    cfg = TrainConfig.from_file(run / "config.json", run_dir=str(run))
    splits = cfg.data_spec.load()
    return {
        "format": "roli run fingerprint 2",
        **fingerprint(cfg.to_dict(), splits, getattr(splits[0], "classes", None)),
    }


# --overwrite


def test_every_file_a_run_writes_is_a_known_output(npz_run):
    run, _ = npz_run
    files = [p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()]
    assert files and all(written_by_roli(f) for f in files), [f for f in files if not written_by_roli(f)]
    assert not written_by_roli("alp/notes.txt") and not written_by_roli("paper.tex")
    assert written_by_roli("alp/.best.pt.x1y2z3.tmp") and not written_by_roli("alp/.notes.tmp")
    assert "alp/best.pt" in OUTPUTS


@pytest.mark.parametrize("which", ["--checkpoint", "--init", "--dataset"])
def test_overwrite_never_deletes_an_input_of_the_new_run(run_copy, capsys, which, checkpoint):
    run, data = run_copy
    if which == "--checkpoint":
        inside = run / "bb.pt"
        shutil.copy(checkpoint, inside)
        argv = ["--method", "alp", "--dataset", f"npz:{data}", "--checkpoint", str(inside)]
    elif which == "--init":
        inside = run / "alp" / "best.pt"  # a head from the run itself
        argv = ["--method", "ft", "--init", str(inside), "--dataset", f"npz:{data}"]
    else:
        inside = run / "d.npz"
        shutil.copy(data, inside)
        argv = ["--method", "alp", "--dataset", f"npz:{inside}"]
    before = tree_hash(run)
    extra = [] if which == "--checkpoint" else ["--random-backbone"]
    assert train([*argv, *[q for q in QUICK if q != "--random-backbone"], *extra, "--run-dir", str(run),
                  "--overwrite"]) == 2  # fmt: skip
    line = one_line(capsys, f"--overwrite: {which} {inside} lies inside the run directory")
    assert "move it out first" in line and tree_hash(run) == before


def test_resume_refuses_a_directory_roli_did_not_make(tmp_path, capsys, npz_run):
    run, _ = npz_run
    foreign = tmp_path / "mine"
    foreign.mkdir()
    shutil.copy(run / "config.json", foreign / "config.json")  # a config.json alone does not make it roli's
    (foreign / "notes.txt").write_text("mine")
    before = tree_hash(foreign)
    assert train(["--resume", str(foreign)]) == 2
    one_line(capsys, f"resume: {foreign} was not written by roli (it has no .roli-run marker)")
    assert tree_hash(foreign) == before


# --resume and evaluate --run of a changed run


@pytest.mark.parametrize(
    "change, named",
    [
        ("eps", "the settings in config.json"),
        ("seed", "the settings in config.json"),
        ("labels", "the train split's labels"),
        ("images", "the train split's images"),
    ],
)
def test_a_changed_run_is_never_resumed(run_copy, capsys, change, named):
    run, data = run_copy
    (run / "alp" / "done.json").unlink()  # unfinished again: --resume would train
    if change in ("eps", "seed"):  # config.json rewritten as roli writes it (its manifest agrees): the fingerprint
        cfg = json.loads((run / "config.json").read_text())
        cfg[change] = 0.2 if change == "eps" else 5
        save_json(cfg, run / "config.json")
    else:
        with np.load(data) as f:
            arrays = dict(f)
        if change == "labels":
            arrays["y_train"] = np.roll(arrays["y_train"], 1)
        else:
            arrays["x_train"] = arrays["x_train"][:, ::-1].copy()
        np.savez(data, **arrays)
    before = tree_hash(run)
    assert train(["--resume", str(run)]) == 2
    line = one_line(capsys, "changed since the run started")
    assert line.split("error: ")[1].startswith(f"resume: {named}") and "start a new run" in line
    assert tree_hash(run) == before


def test_evaluate_run_refuses_changed_data_unless_allowed(run_copy, capsys):
    run, data = run_copy
    assert evaluate(["--run", str(run), "--out", str(run.parent / "a.json")]) == 0
    first = json.loads((run.parent / "a.json").read_text())
    with np.load(data) as f:
        arrays = dict(f)
    arrays["y_test"] = np.roll(arrays["y_test"], 1)  # labels swapped under the run
    np.savez(data, **arrays)
    capsys.readouterr()
    before = tree_hash(run)
    assert evaluate(["--run", str(run)]) == 2
    one_line(capsys, "--run: the test split's labels changed since the run started")
    assert tree_hash(run) == before
    assert evaluate(["--run", str(run), "--allow-changed-data", "--out", str(run.parent / "b.json")]) == 0
    second = json.loads((run.parent / "b.json").read_text())
    assert second["config"]["changed_since_run"] == ["the test split's labels"]
    assert "changed_since_run" not in first["config"] or first["config"]["changed_since_run"] == []


def test_runs_of_an_earlier_roli_without_a_fingerprint_still_resume(run_copy, capsys):
    run, _ = run_copy
    (run / "fingerprint.json").unlink()
    (run / "alp" / "done.json").unlink()
    before = tree_hash(run)
    assert train(["--resume", str(run)]) == 2  # this roli's run (a manifest): a deleted fingerprint is refused
    one_line(capsys, "fingerprint.json is missing (deleted?)")
    assert tree_hash(run) == before
    (run / ".roli-manifest.jsonl").unlink()  # as an earlier roli left it: no manifest, a marker without format
    (run / ".roli-run").write_text(json.dumps({"created_by": "roli train"}))
    assert train(["--resume", str(run)]) == 0
    assert "has no fingerprint.json (a run of an earlier roli)" in capsys.readouterr().err


# one process at a time


def test_a_run_in_use_is_refused_and_a_stale_lock_taken_over(run_copy, capsys):
    run, _ = run_copy
    (run / "alp" / "done.json").unlink()
    with RunLock(run, "roli train --method alp"):  # as a trainer still running would hold it
        before = tree_hash(run)
        assert train(["--resume", str(run)]) == 2
        line = one_line(capsys, f"run directory {run} is in use (pid ")
        assert "roli train --method alp" in line
        assert evaluate(["--run", str(run)]) == 2
        one_line(capsys, "is in use")
        assert tree_hash(run) == before
    (run / ".roli-lock").write_text("pid 999999999: roli train --method alp")  # its process is gone
    assert train(["--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "took over the lock left by pid 999999999: roli train --method alp (no longer running)" in err
    assert (run / ".roli-lock").read_text() == ""  # released at the end


# code named in files


def test_a_model_spec_from_a_file_never_names_code(tmp_path, capsys, monkeypatch):
    """A file names registry/timm models and roli's own constructors only: installed packages' functions (the two
    routes to a shell: sympy's sympify on a model_args string, roli.train:main with an argv), a local module and
    one under a folder named site-packages are all refused without --trust-code, before anything is imported."""
    evil = tmp_path / "site-packages" / "evil.py"
    evil.parent.mkdir()
    marker = tmp_path / "ran"
    evil.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\ndef make(**kw):\n    pass\n")
    monkeypatch.syspath_prepend(str(evil.parent))
    shell = f"__import__('os').system('touch {marker}')"
    cfg = tmp_path / "c.yaml"
    for spec, args in (("sympy:sympify", f"model_args: {{a: \"{shell}\"}}\n"),
                       ("roli.train:main", "model_args: {argv: ['--config', 'x']}\n"),
                       ("evil:make", ""), ("os:popen", ""), ("subprocess:getoutput", ""),
                       ("timm.models.resnet:resnet18", "")):  # fmt: skip
        cfg.write_text(f"model: {spec}\n{args}dataset: digits\nmethod: alp\n")
        assert train(["--config", str(cfg), "--run-dir", str(tmp_path / "r")]) == 2
        one_line(capsys, f"model: {spec} (from {cfg}) would import and run that code")
        assert not marker.exists() and not (tmp_path / "r").exists()
    for ok in ("resnet18", "roli.models.small:small_cnn", "ares_swin_b"):  # timm, roli's own, the registry
        cfg.write_text(f"model: {ok}\ndataset: digits\nmethod: alp\n")
        assert train(["--config", str(cfg), "--print-config"]) == 0
    cfg.write_text("model: evil:make\ndataset: digits\nmethod: alp\n")
    assert train(["--config", str(cfg), "--trust-code", "--print-config"]) == 0  # trusted on purpose
    assert not marker.exists()  # --print-config builds nothing


def test_grid_refuses_code_from_its_configs(tmp_path, capsys):
    from roli.grid import main as grid

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: sympy:sympify\nmodel_args: {{a: \"open('{tmp_path / 'ran'}', 'w')\"}}\n"
                   "dataset: digits\nmethod: alp\n")  # fmt: skip
    assert grid([str(cfg), "--out", str(tmp_path / "g")]) == 2
    one_line(capsys, "would import and run that code")
    assert not (tmp_path / "ran").exists() and not (tmp_path / "g").exists()


def test_resume_of_an_edited_config_refuses_before_building(run_copy, capsys, tmp_path, monkeypatch):
    run, _ = run_copy
    (tmp_path / "payload.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('x')\ndef make(**kw): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "model": "payload:make"}))
    assert train(["--resume", str(run)]) == 2  # the manifest: config.json is not what roli wrote
    one_line(capsys, "config.json is not the file roli wrote there (edited or replaced)")
    save_json({**cfg, "model": "payload:make"}, run / "config.json")  # the manifest forged too
    assert train(["--resume", str(run)]) == 2
    one_line(capsys, "would import and run that code")
    save_json({**cfg, "model_args": {"width": 8}}, run / "config.json")  # a registry-free edit
    assert train(["--resume", str(run)]) == 2  # the fingerprint, checked before the model is built
    one_line(capsys, "changed since the run started")
    assert not (tmp_path / "ran").exists()


def test_evaluate_run_of_a_downloaded_run_does_not_run_its_code(run_copy, capsys, tmp_path, monkeypatch):
    run, _ = run_copy
    (tmp_path / "payload.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('x')\ndef make(**kw): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = json.loads((run / "config.json").read_text())
    cfg["model"] = "payload:make"
    (run / "config.json").write_text(json.dumps(cfg))
    assert evaluate(["--run", str(run)]) == 2  # edited after roli wrote it: the manifest says so
    one_line(capsys, "config.json is not the file roli wrote there")
    save_json(cfg, run / "config.json")  # a downloaded run: its manifest agrees with the edit
    assert evaluate(["--run", str(run)]) == 2
    one_line(capsys, "would import and run that code")
    assert not (tmp_path / "ran").exists()


# combinations that were silently ignored


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--method", "roli", "--init", "random"], "init: --method roli finetunes from the ALP head"),
        (["--method", "alp", "--compare-ranli"], "compare-ranli: runs the random-head baseline beside --method roli"),
        (["--method", "alp", "--ema"], "ema: loads a checkpoint's EMA weights; give --checkpoint FILE"),
    ],
)
def test_ignored_combinations_are_errors(tmp_path, capsys, argv, pattern):
    run = tmp_path / "r"
    assert train([*argv, "--dataset", "digits", *QUICK, "--run-dir", str(run)]) == 2
    one_line(capsys, pattern)
    assert not run.exists()


def test_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    """At the first write (nothing is left: run the command again) and at a checkpoint, where torch.save fails
    with PytorchStreamWriter's RuntimeError rather than an OSError (the run resumes)."""
    import shutil
    import sys

    import torch

    run_module = sys.modules["roli.training.run"]  # (roli.training.run is also the name of the function)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(run_module, "save_json", full)
        run = tmp_path / "r"
        assert train(["--method", "alp", "--dataset", "digits", *QUICK, "--run-dir", str(run)]) == 2
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if ": error: " in line]
        assert "Traceback" not in err and len(lines) == 1 and f"disk full while writing into {run}" in lines[0], err
        assert "run the same command again" in lines[0] and not run.exists()
        assert list(tmp_path.iterdir()) == []  # the start's temporary sibling is gone too
    real_save, usage = torch.save, shutil.disk_usage

    def save_on_a_full_disk(obj, f, *a, **k):
        if str(f).endswith(".tmp") and ".last.pt." in str(f):
            Path(f).write_bytes(b"PK\x03\x04 half")
            raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                               "data/3: file write failed")  # fmt: skip
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(p)._replace(free=1 << 20))
    assert train(["--method", "alp", "--dataset", "digits", *QUICK, "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert "Traceback" not in err and len(lines) == 1 and f"disk full while writing into {run} (1 MiB free)" in lines[0]
    assert f"continue with --resume {run}" in lines[0] and not list(run.rglob("*.tmp"))
    monkeypatch.undo()
    assert train(["--resume", str(run)]) == 0


def test_ctrl_c_outside_the_training_loop_is_one_line(tmp_path, capsys, monkeypatch):
    """Ctrl-C during the test evaluation after a stage (AutoAttack's place) or while a grid or evaluate starts:
    one line, exit 130, and the run resumes to its end."""
    import sys

    from roli._cli import quiet_pipe
    from roli.training.pipeline import Stages

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    run = tmp_path / "r"
    monkeypatch.setattr(Stages, "test", ctrl_c)
    monkeypatch.setattr(sys, "argv", ["x", "--method", "alp", "--dataset", "digits", *QUICK, "--run-dir", str(run)])
    assert quiet_pipe(train) == 130
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("python -m roli.train: interrupted")
    assert err.strip().splitlines()[-1] == lines[0]
    monkeypatch.undo()
    assert train(["--resume", str(run)]) == 0 and (run / "results.json").is_file()
    capsys.readouterr()
    monkeypatch.setattr("roli.grid.plan", ctrl_c)
    monkeypatch.setattr(sys, "argv", ["x", "cifar10/roli_lora", "--out", str(tmp_path / "g")])
    from roli.grid import main as grid

    assert quiet_pipe(grid) == 130
    err = capsys.readouterr().err
    assert err.startswith("python -m roli.grid: interrupted (Ctrl-C)") and len(err.strip().splitlines()) == 1


# values that used to end in a traceback: one line each, nothing written


@pytest.mark.parametrize(
    "yaml_text, pattern",
    [
        ("seed: abc\n", "seed: must be an integer in [0, 2**63); got 'abc'"),
        ("seed: 1.5\n", "seed: must be an integer in [0, 2**63); got 1.5"),
        ("seed: 99999999999999999999999\n", "seed: must be an integer in [0, 2**63)"),
        ("run_dir: 5\n", "run-dir: must be a non-empty string; got 5"),
        ("dataset: [x]\n", "dataset: must be a non-empty string; got ['x']"),
        ("fold_bn: 'false'\n", "fold-bn: must be true or false; got 'false'"),
        ("random_start: 'no'\n", "random-start: must be true or false; got 'no'"),
        ("val_percent: abc\n", "val-percent: must be a number in (0, 100); got 'abc'"),
    ],
)
def test_bad_config_values_are_one_line(tmp_path, capsys, yaml_text, pattern):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("method: pretrain\n" + yaml_text)
    where = [] if yaml_text.startswith("run_dir") else ["--run-dir", str(tmp_path / "r")]
    assert train(["--config", str(cfg), *where]) == 2
    one_line(capsys, pattern)
    assert not (tmp_path / "r").exists()


def _npz(path: Path, x_train, y_train, x_test, y_test) -> Path:
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.mark.parametrize("case", ["rgba", "sizes", "one-label"])
def test_bad_arrays_are_one_line(tmp_path, capsys, case):
    rng = np.random.default_rng(0)
    y = np.arange(20) % 2
    if case == "rgba":
        path = _npz(tmp_path / "d.npz", rng.random((20, 8, 8, 4)), y, rng.random((6, 8, 8, 4)), y[:6])
        pattern = "images must have 1 (grey) or 3 (RGB) channels; got shape (20, 4, 8, 8) read as 4 channels (RGBA?"
    elif case == "sizes":
        path = _npz(tmp_path / "d.npz", rng.random((20, 8, 8)), y, rng.random((6, 16, 16)), y[:6])
        pattern = "the test images are (1, 16, 16) (CHW), the train images (1, 8, 8); every split needs one size"
    else:
        path = _npz(
            tmp_path / "d.npz", rng.random((20, 8, 8)), np.ones(20, int), rng.random((6, 8, 8)), np.ones(6, int)
        )
        pattern = "every training label is [1]; a classifier needs at least two classes"
    assert train(["--method", "pretrain", "--dataset", f"npz:{path}", "--run-dir", str(tmp_path / "r")]) == 2
    one_line(capsys, pattern)
    assert not (tmp_path / "r").exists()


def test_a_nan_checkpoint_is_refused_before_writing(tmp_path, capsys, checkpoint):
    import torch

    state = torch.load(checkpoint, weights_only=True)
    state["state_dict"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in state["state_dict"].items()}
    bad = tmp_path / "nan.pt"
    torch.save(state, bad)
    run = tmp_path / "r"
    assert train(["--method", "alp", "--dataset", "digits", "--checkpoint", str(bad), "--run-dir", str(run)]) == 2
    one_line(capsys, f"checkpoint: {bad} holds non-finite values (NaN/inf) in")
    assert not run.exists()


def test_evaluate_flags_that_used_to_traceback(npz_run, capsys):
    run, _ = npz_run
    before = tree_hash(run)
    for argv, pattern in [
        (["--run", str(run), "--input-size", "4"], "--run rebuilds the model as the run trained it: drop --input-size"),
        (["--model", "roli.models.small:small_cnn", "--dataset", "digits", "--input-size", "-4"],
         "--input-size must be >= 1; got -4"),
        (["--model", "roli.models.small:small_cnn", "--dataset", "digits", "--device", "meta"],
         "--device: 'meta' is not auto, cpu, cuda or cuda:N"),
    ]:  # fmt: skip
        assert evaluate(argv) == 2
        one_line(capsys, pattern)
    assert tree_hash(run) == before


def test_report_names_or_skips_malformed_files(run_copy, capsys, tmp_path):
    from roli.report import main as report

    run, _ = run_copy
    with open(run / "alp" / "metrics.jsonl", "a") as f:
        f.write("not json\n")
    assert report([str(run), "--out", str(tmp_path / "rep")]) == 0
    assert "report: skipped line 2 of" in capsys.readouterr().err
    (run / "results.json").write_text("[1]")
    assert report([str(run), "--out", str(tmp_path / "rep")]) == 2
    one_line(capsys, "results.json and config.json must each hold a JSON object")
    (run / "results.json").write_text("{")
    assert report([str(run), "--out", str(tmp_path / "rep")]) == 2
    one_line(capsys, "cannot read its results")


def test_damaged_data_files_are_one_line(tmp_path, capsys):
    import pickle

    (tmp_path / "empty.npz").write_bytes(b"")
    good = _npz(tmp_path / "good.npz", np.random.rand(20, 8, 8), np.arange(20) % 2, np.random.rand(6, 8, 8),
                np.arange(6) % 2)  # fmt: skip
    (tmp_path / "cut.npz").write_bytes(good.read_bytes()[:300])
    c10 = tmp_path / "c10" / "cifar-10-batches-py"
    c10.mkdir(parents=True)
    for i in range(1, 6):
        pickle.dump({b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 9}, open(c10 / f"data_batch_{i}", "wb"))
    pickle.dump({b"labels": [0] * 5}, open(c10 / "test_batch", "wb"))
    (tmp_path / "js" / "img").mkdir(parents=True)
    (tmp_path / "js" / "train.json").write_text(json.dumps({"../../etc/hostname": 0, "a.png": 1}))
    (tmp_path / "js" / "test.json").write_text(json.dumps({"a.png": 0}))
    cases = [
        (["--dataset", f"npz:{tmp_path / 'empty.npz'}"], "as an npz file (EOFError"),
        (["--dataset", f"npz:{tmp_path / 'cut.npz'}"], "as an npz file (BadZipFile"),
        (["--dataset", f"cifar10:{tmp_path / 'c10'}"], "data_batch_1: 10 images of shape (3072,) and 9 labels"),
        (["--dataset", f"json:{tmp_path / 'js'}", "--image-root", str(tmp_path / "js" / "img")],
         "paths must stay inside the image root (relative, no '..'); got e.g. ['../../etc/hostname']"),
    ]  # fmt: skip
    for argv, pattern in cases:
        assert train(["--method", "pretrain", *argv, "--run-dir", str(tmp_path / "r")]) == 2
        one_line(capsys, pattern)
        assert not (tmp_path / "r").exists()
    for i in range(1, 6):
        pickle.dump({b"labels": [0] * 10}, open(c10 / f"data_batch_{i}", "wb"))
    assert train(["--method", "pretrain", "--dataset", f"cifar10:{tmp_path / 'c10'}", "--run-dir", "x"]) == 2
    one_line(capsys, "lacks b'data' or b'labels': not a cifar10 batch")


def test_more_inputs_that_used_to_traceback(run_copy, tmp_path, capsys):
    from roli.report import main as report

    run, _ = run_copy
    (tmp_path / "afile").write_text("x")
    assert report([str(run), "--out", str(tmp_path / "afile" / "sub")]) == 2
    one_line(capsys, "--out: cannot create")
    labels = _npz(tmp_path / "s.npz", np.random.rand(8, 8, 8), np.array(list("abababab")), np.random.rand(4, 8, 8),
                  np.array(list("abab")))  # fmt: skip
    assert train(["--method", "pretrain", "--dataset", f"npz:{labels}", "--run-dir", str(tmp_path / "r")]) == 2
    one_line(capsys, "labels must be a 1-D integer array")
    link = tmp_path / "link"  # a run reached through a symlink resumes and evaluates as the run itself
    link.symlink_to(run)
    (run / "alp" / "done.json").unlink()
    assert train(["--resume", str(link)]) == 0
    assert evaluate(["--run", str(link), "--out", str(tmp_path / "e.json")]) == 0
    assert (run / "alp" / "done.json").is_file() and not (tmp_path / "afile").is_dir()


def test_a_run_written_before_the_specs_still_matches_its_fingerprint():
    """config.json and fingerprint.json as roli wrote them before the specs refactor (commit b197307, a
    `--method roli --peft lora` run on digits 0-4): the options read back, and the data loaded through today's
    DataSpec, give the same fingerprint, so such runs still --resume and evaluate --run."""
    from roli.config import TrainConfig
    from roli.rundir import fingerprint

    here = Path(__file__).parent / "fixtures" / "run_before_specs"
    saved = json.loads((here / "fingerprint.json").read_text())
    cfg = TrainConfig.from_file(here / "config.json", run_dir="unused", device="cpu")
    splits = cfg.data_spec.load()
    now = fingerprint(cfg.to_dict(), splits, getattr(splits[0], "classes", None))
    from roli.rundir import changed

    assert saved.pop("format") == "roli run fingerprint 1"
    old = {k: {p: now[k][p] for p in v} if isinstance(v, dict) else now[k] for k, v in saved.items()}
    # every part the old format holds, equal (today's adds the whole content), but the class names: that roli
    # recorded digits 0-4 with the names of all ten digits, today's the five kept (the old ones are recognised)
    assert old | {"classes": now["classes_before_subset"]} == saved and now["classes"] != saved["classes"]
    assert changed(saved, now) == []
    assert set(now["train"]) == {"n", "labels", "pixels", "content"} and len(now["train"]["content"]) == 64
    assert now["train"]["n"] + now["val"]["n"] == 637 + 71 and cfg.peft_spec.method == "lora"


# a run directory's own files replaced by something else


def test_a_lock_that_is_a_symlink_or_a_directory_is_refused(run_copy, capsys, tmp_path):
    run, _ = run_copy
    precious = tmp_path / "precious.txt"
    precious.write_text("the user's file")
    (run / ".roli-lock").unlink(missing_ok=True)
    (run / ".roli-lock").symlink_to(precious)
    assert train(["--resume", str(run)]) == 2
    one_line(capsys, "holds a symlink roli did not make (.roli-lock)")
    assert precious.read_text() == "the user's file"  # never emptied through the link
    from roli.rundir import RunLock

    with pytest.raises(Exception, match="its lock .roli-lock is a symlink, not roli's lock file"):
        RunLock(run, "test").acquire()  # the lock itself never follows a link either
    assert precious.read_text() == "the user's file"
    (run / ".roli-lock").unlink()
    (run / ".roli-lock").mkdir()
    assert train(["--resume", str(run)]) == 2
    one_line(capsys, "its lock .roli-lock is a directory")


@pytest.mark.parametrize("content", ['{"format": "roli run fingerprint 1", "train": 5}', "[1, 2]", '{"options": "x"}'])
def test_a_malformed_fingerprint_is_one_line(run_copy, capsys, content):
    run, _ = run_copy
    (run / "fingerprint.json").write_text(content)
    assert train(["--resume", str(run)]) == 2
    one_line(capsys, "fingerprint.json is not the file roli wrote there")
    atomic_write(run / "fingerprint.json", lambda tmp: Path(tmp).write_text(content))  # the manifest forged too
    assert train(["--resume", str(run)]) == 2
    one_line(capsys, "fingerprint.json is damaged; the run cannot be checked")


def test_report_skips_epoch_records_with_bad_numbers(run_copy, capsys, tmp_path):
    from roli.report import main as report

    run, _ = run_copy
    metrics = run / "alp" / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows[0]["seconds"] = "abc"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert report([str(run), "--out", str(tmp_path / "rep")]) == 0
    assert "skipped line 1 of" in capsys.readouterr().err


def test_evaluate_out_never_replaces_an_input_or_a_run_file(run_copy, capsys, tmp_path):
    run, data = run_copy
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    for out, pattern in ((run / "config.json", "lies inside the run directory"),
                         (run / "alp" / "best.pt", "lies inside the run directory"),
                         (data, "is an input of this evaluation"),
                         (mine, "exists and is not a result of roli evaluate")):  # fmt: skip
        before = out.read_bytes()
        assert evaluate(["--run", str(run), "--out", str(out)]) == 2
        one_line(capsys, pattern)
        assert out.read_bytes() == before
    ok = tmp_path / "res.json"
    assert evaluate(["--run", str(run), "--out", str(ok)]) == 0
    assert evaluate(["--run", str(run), "--out", str(ok)]) == 0  # its own result: replaced


def test_overwrite_and_resume_touch_only_roli_names(run_copy, capsys, tmp_path):
    """A '*' of roli's output names never spans folders; a user's '.x.y.tmp' is not roli's temporary."""
    run, data = run_copy
    mine = {run / "alp" / "evaluations" / "sub" / "keep.json": "{}",
            run / "autoattack" / "alp" / "batch_backup" / "important.pt": "x",
            run / "alp" / ".notes.txt.abc.tmp": "my notes"}  # fmt: skip
    for path, text in mine.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    stale = run / "alp" / ".best.pt.k3j2.tmp"  # atomic_write's leftover of roli's best.pt (named in the manifest)
    stale.write_text("half")
    record(run, {"tmp": "alp/.best.pt.k3j2.tmp"})
    alike = run / "alp" / ".last.pt.zz99.tmp"  # of the same pattern, but not named: a user's, kept
    alike.write_text("mine")
    mine[alike] = "mine"
    (run / "alp" / "done.json").unlink()
    assert train(["--resume", str(run)]) == 0
    assert all(p.read_text() == t for p, t in mine.items()) and not stale.exists()
    cfg = json.loads((run / "config.json").read_text())
    argv = ["--method", "alp", "--dataset", cfg["dataset"], *QUICK, "--run-dir", str(run), "--overwrite"]
    assert train(argv) == 0
    assert all(p.read_text() == t for p, t in mine.items())


def test_a_symlink_inside_a_run_directory_is_refused(run_copy, capsys, tmp_path):
    run, _ = run_copy
    outside = tmp_path / "outside"
    outside.mkdir()
    (run / "alp" / "done.json").unlink()
    (run / "alp" / "best.pt").rename(outside / "best.pt")
    (run / "alp" / "best.pt").symlink_to(outside / "best.pt")
    before = (outside / "best.pt").read_bytes()
    assert train(["--resume", str(run)]) == 2
    one_line(capsys, "holds a symlink roli did not make (alp/best.pt)")
    assert (outside / "best.pt").read_bytes() == before


def test_report_out_never_replaces_a_run_file_or_a_users_report(run_copy, capsys, tmp_path):
    from roli.report import main as report

    run, _ = run_copy
    mine = tmp_path / "paper"
    mine.mkdir()
    (mine / "report.md").write_text("# my report, by hand\n")
    (mine / "report.csv").write_text("a,b\n1,2\n")
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / "report.png").write_bytes(b"\x89PNG my figure")
    for out, pattern in ((run, "lies inside the run directory"),
                         (run / "alp", "lies inside the run directory"),
                         (mine, "report.md exists and is not a roli report"),
                         (tmp_path / "figs", "report.png exists beside no roli report.csv")):  # fmt: skip
        before = tree_hash(run) | tree_hash(tmp_path / "paper") | tree_hash(tmp_path / "figs")
        assert report([str(run), "--out", str(out)]) == 2
        one_line(capsys, pattern)
        assert before == tree_hash(run) | tree_hash(tmp_path / "paper") | tree_hash(tmp_path / "figs")
    ok = tmp_path / "rep"
    assert report([str(run), "--out", str(ok)]) == 0
    assert report([str(run), "--out", str(ok)]) == 0  # its own report: replaced


def test_a_dangling_symlink_as_run_dir_or_grid_out_is_one_line(tmp_path, capsys):
    from roli.grid import main as grid

    dangling = tmp_path / "runs"
    dangling.symlink_to(tmp_path / "nowhere" / "x")
    assert train(["--method", "alp", "--dataset", "digits", *QUICK, "--run-dir", str(dangling)]) == 2
    one_line(capsys, f"run directory {dangling} is a symlink to {tmp_path / 'nowhere' / 'x'}, which does not exist")
    assert grid(["cifar10/roli_lora", "--out", str(dangling)]) == 2
    one_line(capsys, "which does not exist")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"] and dangling.is_symlink()
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "linked").symlink_to(real)  # a link to an empty folder: the run is made there
    assert train(["--method", "alp", "--dataset", "digits", *QUICK, "--run-dir", str(tmp_path / "linked")]) == 0
    assert (real / "results.json").is_file() and (tmp_path / "linked").is_symlink()


def test_a_checkpoint_copied_in_from_another_run_is_refused(run_copy, capsys, tmp_path):
    """best.pt and last.pt carry the identity of the run that wrote them (its marker's): another run's file, copied
    in and even recorded in the manifest as roli would, is refused by --resume and evaluate --run."""
    run, data = run_copy
    other = tmp_path / "other"
    assert train(["--method", "alp", "--dataset", f"npz:{data}", *QUICK, "--seed", "7", "--run-dir", str(other)]) == 0
    mine = {n: (run / "alp" / n).read_bytes() for n in ("best.pt", "last.pt")}
    for name in ("last.pt", "best.pt"):
        blob = (other / "alp" / name).read_bytes()
        atomic_write(run / "alp" / name, lambda tmp, b=blob: Path(tmp).write_bytes(b))  # the manifest agrees
        (run / "alp" / "done.json").unlink(missing_ok=True)
        capsys.readouterr()
        assert train(["--resume", str(run)]) == 2
        line = [x for x in capsys.readouterr().err.splitlines() if ": error: " in x]
        assert len(line) == 1 and f"alp/{name} was written by another run (copied in?)" in line[0], line
        if name == "best.pt":
            assert evaluate(["--run", str(run)]) == 2
            one_line(capsys, "best.pt was written by another run (copied in?)")
        atomic_write(run / "alp" / name, lambda tmp, b=mine[name]: Path(tmp).write_bytes(b))
    assert train(["--resume", str(run)]) == 0 and evaluate(["--run", str(run), "--out", str(tmp_path / "e.json")]) == 0


def test_a_full_disk_under_evaluate_report_and_grid_is_one_line(run_copy, capsys, tmp_path, monkeypatch):
    """The commands as run (through their entry point): ENOSPC at their first write is one line naming the file,
    exit 2, and no file left half-written."""
    import sys

    import roli._io
    from roli._cli import quiet_pipe
    from roli.grid import main as grid
    from roli.report import main as report

    run, _ = run_copy
    config = tmp_path / "c.yaml"
    config.write_text("method: alp\ndataset: digits\nrandom_backbone: true\nepochs: 1\nwarmup: 0\n")

    def full(path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(roli._io, "_fsync", full)
    cases = [(evaluate, ["--run", str(run), "--out", str(tmp_path / "e.json")], tmp_path / "e.json"),
             (report, [str(run), "--out", str(tmp_path / "rep")], tmp_path / "rep" / "report.md"),
             (grid, [str(config), "--out", str(tmp_path / "g")], tmp_path / "g" / ".roli-grid")]  # fmt: skip
    for main, argv, first in cases:
        monkeypatch.setattr(sys, "argv", ["x", *argv])
        capsys.readouterr()
        assert quiet_pipe(main) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
        assert len(err) == 1 and f"disk full ({first.parent}" in err[0] and "run the same command again" in err[0]
        assert not first.exists() and not list(tmp_path.rglob("*.tmp")), err
