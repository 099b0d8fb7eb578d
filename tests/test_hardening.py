"""Bad input and interrupted runs: every case ends with exit code 2 and one line on stderr that names what
was wrong, and the files that must stay untouched are byte-identical afterwards."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from roli._io import atomic_write, record, save_json
from roli.evaluate import main as evaluate
from roli.train import main as train

QUICK = ["--dataset", "digits", "--classes", "0-4", "--eps", "0.1", "--step-size", "0.05", "--steps", "1",
         "--val-steps", "1", "--epochs", "1", "--warmup", "0", "--random-backbone"]  # fmt: skip


def tree_hash(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}  # fmt: skip


def one_line(capsys, pattern: str, after_start: bool = False) -> str:
    """The error is one line on stderr. after_start: the failure came after the run began, so its log lines
    (the model it built, the epochs) precede that one error line, which comes last."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if ": error: " in line]
    assert "Traceback" not in "\n".join(lines) and len(errors) == 1 and pattern in errors[0], lines
    assert (lines[-1] == errors[0]) if after_start else len(lines) == 1, lines
    return errors[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished tiny pretraining run (its files are the ones that must stay untouched)."""
    run = tmp_path_factory.mktemp("runs") / "pre"
    assert train([*QUICK, "--method", "pretrain", "--run-dir", str(run)]) == 0
    return run


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(finished, dest)
    return dest


def test_overwrite_refuses_a_directory_roli_did_not_write(tmp_path, capsys):
    foreign = tmp_path / "paper"
    foreign.mkdir()
    (foreign / "main.tex").write_text("\\documentclass{article}")
    (foreign / "data.csv").write_text("a,b\n1,2\n")
    before = tree_hash(foreign)
    assert train([*QUICK, "--run-dir", str(foreign), "--overwrite"]) == 2
    one_line(capsys, "was not written by roli")
    assert tree_hash(foreign) == before
    cfg = tmp_path / "c.yaml"  # the run directory named only by a config file: the same rule
    cfg.write_text(f"run_dir: {foreign}\n")
    assert train([*QUICK, "--config", str(cfg), "--overwrite"]) == 2
    assert tree_hash(foreign) == before


def test_overwrite_of_a_roli_run_starts_over_and_keeps_a_users_file(run_copy, capsys):
    (run_copy / "pretrain" / "extra.txt").write_text("x")  # a user's file: roli did not write it
    old_best = (run_copy / "pretrain" / "best.pt").read_bytes()
    assert train([*QUICK, "--method", "pretrain", "--seed", "3", "--run-dir", str(run_copy), "--overwrite"]) == 0
    assert (run_copy / "pretrain" / "extra.txt").read_text() == "x" and (run_copy / ".roli-run").is_file()
    assert (run_copy / "pretrain" / "best.pt").read_bytes() != old_best  # roli's own outputs were replaced
    assert "--overwrite: kept 1 file(s) roli did not write" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--method", "alp"], "--method would change what the run computes"),
        (["--eps", "0.3"], "--eps would change what the run computes"),
        (["--overwrite"], "--overwrite cannot go with --resume"),
        (["--run-dir", "elsewhere"], "--run-dir cannot go with --resume"),
    ],
)
def test_resume_refuses_flags_that_change_the_run(run_copy, capsys, extra, pattern):
    before = tree_hash(run_copy)
    assert train(["--resume", str(run_copy), *extra]) == 2
    one_line(capsys, pattern)
    assert tree_hash(run_copy) == before


def test_resume_of_a_damaged_or_mismatched_state(run_copy, capsys):
    state = run_copy / "pretrain"
    (state / "done.json").unlink()  # the stage is unfinished again: --resume reads last.pt
    data = (state / "last.pt").read_bytes()
    (state / "last.pt").write_bytes(data[: len(data) // 3])
    assert train(["--resume", str(run_copy)]) == 2  # the manifest: not the last.pt roli wrote
    one_line(capsys, "pretrain/last.pt is not the file roli wrote there (edited or replaced)")
    atomic_write(state / "last.pt", lambda tmp: Path(tmp).write_bytes(data[: len(data) // 3]))  # recorded
    assert train(["--resume", str(run_copy)]) == 2
    one_line(capsys, "cannot be restored", after_start=True)
    atomic_write(state / "last.pt", lambda tmp: Path(tmp).write_bytes(data))
    cfg = json.loads((run_copy / "config.json").read_text())
    cfg["model_args"] = {"width": 16}  # an edited config.json: refused by the run's fingerprint, before anything
    save_json(cfg, run_copy / "config.json")
    before = tree_hash(run_copy)
    assert train(["--resume", str(run_copy)]) == 2
    one_line(capsys, "resume: the settings in config.json changed since the run started")
    assert tree_hash(run_copy) == before
    assert (state / "last.pt").read_bytes() == data


def test_stale_temporaries_removed_and_modes_follow_the_umask(run_copy):
    stale = run_copy / "pretrain" / ".last.pt.k3j2h1.tmp"
    stale.write_bytes(b"half a checkpoint")
    record(run_copy, {"tmp": "pretrain/.last.pt.k3j2h1.tmp"})  # as atomic_write names it before filling it
    mine = run_copy / "pretrain" / ".notes.tmp"  # not of roli's pattern: kept
    mine.write_text("x")
    alike = run_copy / "pretrain" / ".best.pt.u7v8w9.tmp"  # roli's pattern, but never roli's temporary: kept
    alike.write_text("a user's")
    (run_copy / "pretrain" / "done.json").unlink()
    assert train(["--resume", str(run_copy)]) == 0
    assert not stale.exists() and mine.exists() and alike.read_text() == "a user's"
    mask = os.umask(0)
    os.umask(mask)
    for name in ("config.json", "results.json", "pretrain/best.pt", "pretrain/last.pt"):
        assert (run_copy / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["--eps", "1e999"], "eps: must be a finite number"),
        (["--eps", "5"], "eps: 5 is out of range for Linf"),
        (["--momentum=-5"], "momentum: must be a number in [0, 1)"),
        (["--device", "tpu"], "device: 'tpu' is not cpu, cuda or cuda:N"),
        (["--classes", "3"], "a classifier needs at least two"),
        (["--model-arg", "width=-1"], "model: Trying to create tensor with negative dimension -1"),
        (["--model", "os:system"], "not a Python function or class"),
        (["--autoattack", "standard", "--classes", "0-2"], "needs at least 4 classes"),
        (
            ["--model", "roli.models.small:small_cnn", "--method", "roli", "--peft", "lora"],
            "peft: roli.models.small:small_cnn has no attention qkv projection",
        ),
    ],
)
def test_bad_flags_before_anything_is_written(tmp_path, capsys, argv, pattern):
    run = tmp_path / "run"
    assert train([*QUICK, *argv, "--run-dir", str(run)]) == 2
    one_line(capsys, pattern)
    assert not run.exists()


def test_half_budgets_parse(tmp_path):
    from roli.config import TrainConfig

    assert TrainConfig(eps="0.5/255", step_size="0.125/255").eps == pytest.approx(0.5 / 255)


def test_run_directory_under_a_file_and_empty_files(tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    assert train([*QUICK, "--run-dir", str(tmp_path / "file.txt" / "run")]) == 2
    one_line(capsys, "is a file, not a directory")
    (tmp_path / "empty.pt").write_bytes(b"")
    assert train([*QUICK, "--checkpoint", str(tmp_path / "empty.pt"), "--run-dir", str(tmp_path / "r")]) == 2
    one_line(capsys, "is empty")
    assert (
        train([*QUICK, "--method", "ft", "--init", str(tmp_path / "empty.pt"), "--run-dir", str(tmp_path / "r")]) == 2
    )
    one_line(capsys, "init:")
    assert not (tmp_path / "r").exists()


def _npz(path: Path, x_train, y_train, x_test, y_test):
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)


def test_npz_nan_pixels_and_unknown_test_labels(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.random((40, 8, 8), dtype=np.float32)
    y = np.repeat(np.arange(4), 10)
    bad = x.copy()
    bad[3, 2, 2] = np.nan
    _npz(tmp_path / "nan.npz", bad, y, x[:8], y[:8])
    nan = f"npz:{tmp_path / 'nan.npz'}"
    for run in (lambda: train(["--dataset", nan, "--run-dir", str(tmp_path / "r")]),
                lambda: evaluate(["--model", "roli.models.small:small_cnn", "--dataset", nan])):  # fmt: skip
        assert run() == 2
        one_line(capsys, "non-finite pixels")
    _npz(tmp_path / "extra.npz", x, y, x[:8], np.array([0, 1, 2, 3, 4, 0, 1, 2]))
    assert train(["--dataset", f"npz:{tmp_path / 'extra.npz'}", "--run-dir", str(tmp_path / "r")]) == 2
    one_line(capsys, "the test split has labels the train split lacks: [4]")
    assert not (tmp_path / "r").exists()


def test_class_sorted_sources_get_stratified_validation(tmp_path):
    from roli.data import load_dataset

    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(20), 30)  # sorted by class, as an npz built from class folders is
    _npz(tmp_path / "sorted.npz", rng.integers(0, 256, (600, 8, 8), dtype=np.uint8), y,
         rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), np.arange(20))  # fmt: skip
    s = load_dataset(f"npz:{tmp_path / 'sorted.npz'}")
    counts = torch.bincount(s.val.y, minlength=20)
    assert (counts == 3).all() and "stratified" in s.val_split  # every class, in proportion (10% of 30)
    assert torch.bincount(s.train.y, minlength=20).min() == 27
    from test_data import _png

    for c in range(4):
        for i in range(10):
            _png(tmp_path / "folder" / "train" / f"c{c}" / f"{i}.png", rng, size=(10, 10))
        _png(tmp_path / "folder" / "test" / f"c{c}" / "0.png", rng, size=(10, 10))
    f = load_dataset(f"imagefolder:{tmp_path / 'folder'}", resize=8, crop_size=8, val_percent=20)
    assert torch.bincount(f.val.y, minlength=4).tolist() == [2, 2, 2, 2]
    cifar_like = load_dataset("digits")  # not CIFAR: stratified too; CIFAR keeps its tail split (test_data)
    assert "stratified" in cifar_like.val_split


def test_corrupt_image_in_a_training_folder(tmp_path, capsys):
    rng = np.random.default_rng(2)
    from test_data import _png

    for split in ("train", "test"):
        for c in range(2):
            for i in range(6):
                _png(tmp_path / split / f"c{c}" / f"{i}.png", rng, size=(10, 10))
    (tmp_path / "train" / "c1" / "3.png").write_bytes(b"not a png")
    argv = ["--dataset", f"imagefolder:{tmp_path}", "--resize", "8", "--crop-size", "8", "--epochs", "1",
            "--warmup", "0", "--steps", "1", "--val-steps", "1", "--eps", "0.1", "--step-size", "0.05",
            "--workers", "1", "--method", "pretrain", "--run-dir", str(tmp_path / "run")]  # fmt: skip
    assert train(argv) == 2
    one_line(capsys, "unreadable image", after_start=True)


def test_evaluate_bad_budgets_classes_and_outputs(tmp_path, capsys):
    from roli.models.small import small_cnn

    ck = tmp_path / "ck.pt"
    torch.save(small_cnn(num_classes=10).state_dict(), ck)
    base = ["--model", "roli.models.small:small_cnn", "--dataset", "digits", "--checkpoint", str(ck), "--n-ex", "20"]
    assert evaluate([*base, "--eps", "5"]) == 2
    one_line(capsys, "out of range for Linf")
    assert evaluate([*base, "--num-classes", "0"]) == 2
    one_line(capsys, "--num-classes must be >= 2")
    assert evaluate([*base, "--out", str(tmp_path)]) == 2
    one_line(capsys, "is a directory")
    (tmp_path / "aa.pt").write_bytes(b"\x00garbage")
    assert evaluate([*base, "--autoattack", "standard", "--aa-state", str(tmp_path / "aa.pt")]) == 2
    one_line(capsys, "is a file; give a directory")
    (tmp_path / "aa").mkdir()
    (tmp_path / "aa" / "batch0.pt").write_bytes(b"\x00garbage")
    assert evaluate([*base, "--autoattack", "standard", "--aa-state", str(tmp_path / "aa")]) == 2
    one_line(capsys, "--aa-state:")
    assert (tmp_path / "aa" / "batch0.pt").read_bytes() == b"\x00garbage"  # nothing replaced


def test_autoattack_state_is_bound_to_its_model(tmp_path):
    from roli.attacks import run_autoattack
    from roli.models import NormalizedModel
    from roli.models.small import small_cnn

    torch.manual_seed(0)
    x, y = torch.rand(6, 1, 8, 8), torch.randint(0, 10, (6,))
    a, b = NormalizedModel(small_cnn(), None, None), NormalizedModel(small_cnn(), None, None)
    state = tmp_path / "aa.pt"
    run_autoattack(a, (x, y), 0.1, version="custom", attacks=["apgd-ce"], state_path=state)
    with pytest.raises(ValueError, match="made for another evaluation"):
        run_autoattack(b, (x, y), 0.1, version="custom", attacks=["apgd-ce"], state_path=state)


@pytest.mark.slow
def test_trainer_autoattack_keeps_state_files_and_resumes_from_them(tmp_path):
    run = tmp_path / "aa"
    argv = ["--dataset", "digits", "--classes", "0-3", "--eps", "0.1", "--step-size", "0.05", "--steps", "1",
            "--val-steps", "2", "--epochs", "1", "--warmup", "0", "--method", "pretrain", "--autoattack", "standard",
            "--run-dir", str(run)]  # fmt: skip
    assert train(argv) == 0
    first = json.loads((run / "results.json").read_text())["pretrain"]["test"]
    states = sorted((run / "autoattack" / "pretrain").glob("batch*.pt"))
    assert states and first["autoattack"] <= first["pgd2"] <= first["clean"]
    assert list(first["autoattack_per_attack"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    before = {p.name: p.stat().st_mtime_ns for p in states}
    (run / "results.json").unlink()
    assert train(["--resume", str(run)]) == 0  # the finished batches come from their state files
    assert json.loads((run / "results.json").read_text())["pretrain"]["test"] == first
    assert {p.name: p.stat().st_mtime_ns for p in states} == before
