"""Inputs that used to go through unchecked (issue 38): an empty --checkpoint, an empty split, a non-finite --init
head, figures in a results file that are not accuracies. Each: exit code 2, one line on stderr, nothing written."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

from roli.report import main as report
from roli.train import main as train

QUICK = ["--eps", "0.1", "--step-size", "0.05", "--steps", "1", "--val-steps", "1", "--epochs", "1", "--warmup", "0"]


def _one_line(capsys, contains: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0] and contains in err[0], err
    return err[0]


def test_an_empty_checkpoint_path_is_refused(tmp_path, capsys):
    run = tmp_path / "r"
    assert train(["--method", "alp", "--dataset", "digits", *QUICK, "--checkpoint", "", "--run-dir", str(run)]) == 2
    _one_line(capsys, "checkpoint: '' is not a path; give --checkpoint FILE, or leave it out")
    assert not run.exists()


def test_an_empty_test_split_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), y_train=np.arange(40) % 4,
             x_test=np.zeros((0, 8, 8), np.uint8), y_test=np.zeros(0, np.int64))  # fmt: skip
    run = tmp_path / "r"
    assert train(["--method", "pretrain", "--dataset", f"npz:{data}", *QUICK, "--run-dir", str(run)]) == 2
    _one_line(capsys, "the test split is empty")
    assert not run.exists()
    assert train(["--method", "pretrain", "--dataset", "digits", "--classes", "0,12", *QUICK,
                  "--run-dir", str(run)]) == 2  # fmt: skip
    _one_line(capsys, "classes: 0,12 names a class >= 10")


def test_a_non_finite_init_head_is_refused(tmp_path, capsys):
    from roli.models import create_classifier, save_checkpoint

    model = create_classifier("roli.models.small:small_cnn", 10, in_chans=1)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    head = tmp_path / "head.pt"
    save_checkpoint(model, head)
    run = tmp_path / "r"
    argv = ["--method", "ft", "--init", str(head), "--dataset", "digits", *QUICK, "--random-backbone"]
    assert train([*argv, "--run-dir", str(run)]) == 2
    _one_line(capsys, "holds non-finite values (head.weight)")
    assert not run.exists()


@pytest.mark.parametrize("value", [1.5, -0.2, "abc", float("nan"), True])
def test_report_refuses_figures_that_are_not_accuracies(tmp_path, capsys, value):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"peft": "full", "eps": 0.1, "norm": "linf"}))
    results = {"alp": {"val": {"epoch": 0}, "test": {"n": 10, "clean": 0.5, "pgd2": value}, "dir": "alp"}}
    (run / "results.json").write_text(json.dumps(results))
    out = tmp_path / "rep"
    assert report([str(run), "--out", str(out)]) == 2
    _one_line(capsys, "not an accuracy in [0, 1]")
    assert not out.exists()
    results["alp"]["test"]["pgd2"] = 0.25  # a real accuracy: the report is written
    (run / "results.json").write_text(json.dumps(results))
    assert report([str(run), "--out", str(out)]) == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "roli.train", "--list-configs"],
        ["-m", "roli.train", "--config", "cifar10/roli_full", "--print-config"],
        ["-m", "roli", "--help"],
        ["-m", "roli", "zoo"],
    ],  # fmt: skip
)
def test_output_into_a_closed_pipe_is_quiet(argv):
    """`roli zoo | head`: the reader is gone before roli writes; no BrokenPipeError traceback. (argparse's own
    --help output swallows the error by itself: not a case here.)"""
    import os
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader closes first, as head does after its lines
    try:
        proc = subprocess.run([sys.executable, *argv], stdout=write, stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    assert proc.returncode == 141  # as a process killed by SIGPIPE


def test_pgd_reads_like_torchattacks():
    from roli.attacks import PGD

    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    a = PGD(net, 8 / 255, alpha=2 / 255, steps=3, random_start=True)
    assert (a.eps, a.step_size, a.steps, a.random_start) == (8 / 255, 2 / 255, 3, True)
    assert dataclasses.asdict(PGD(net, eps=0.1).config) == dataclasses.asdict(PGD(net, 0.1).config)
    for bad, pattern in ((dict(alpha=0.1, step_size=0.1), "alpha or step_size"), (dict(eps=0.2), "eps given twice")):
        with pytest.raises(TypeError, match=pattern):
            PGD(net, 0.1, **bad)
    with pytest.raises(TypeError, match="got str"):
        PGD(net, "8/255")
    res = a.perturb(torch.rand(5, 3, 2, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1]))
    text = repr(res)
    assert text.startswith("PGDResult(x_adv (5, 3, 2, 2), success ") and len(text) < 200 and "tensor" not in text


def test_train_switches_over_a_config(capsys):
    assert train(["--config", "cifar10/roli_lora", "--autoattack", "none", "--model-arg", "img_size=32",
                  "--print-config"]) == 0  # fmt: skip
    shown = json.loads(capsys.readouterr().out)
    assert shown["autoattack"] is None  # the file's "standard" turned off
    assert shown["model_args"] == {"drop_path_rate": 0.5, "img_size": 32}  # merged into the file's
    assert train(["--config", "cifar10/roli_lora", "--model", "resnet18", "--model-arg", "drop_rate=0.25",
                  "--print-config"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["model_args"] == {"drop_rate": 0.25}  # another model: its own only


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--set", "frob=1"], "--set: frob is not a config option"),
        (["--set", "dataset=npz:nowhere.npz"], "npz file not found: nowhere.npz"),
        (["--set", "classes=0-99"], "classes: 0-99 names a class >= 10"),
        (["--launcher", "slurm", "--slurm-time", "-5"], "--slurm-time: -5 is not a number of minutes >= 1"),
        (["--launcher", "slurm", "--slurm-cpus", "0"], "--slurm-cpus: 0 is not a CPU count >= 1"),
    ],
)
def test_grid_validates_before_writing(tmp_path, capsys, extra, pattern):
    from roli.grid import main as grid

    out = tmp_path / "g"
    data = [] if any(a.startswith("dataset=") for a in extra) else ["--set", "dataset=digits"]
    assert grid(["cifar10/alp", "--out", str(out), *data, *extra]) == 2
    _one_line(capsys, pattern)
    assert not out.exists()


def test_a_path_the_file_system_refuses_is_one_line(capsys):
    import errno

    from roli._cli import quiet_pipe

    long = "/data/" + "x" * 300 + "/config.json"
    for code, said in (
        (errno.ENAMETOOLONG, "a name in a path is longer than the file system allows (/data/" + "x" * 74 + "..."
         + "x" * 48 + "/config.json): give a shorter one"),
        (errno.EACCES, f"permission denied ({long[:80]}...{long[-60:]}): give a path this user may read (and write, "
         "for outputs)"),
        (errno.EPERM, f"operation not permitted ({long[:80]}...{long[-60:]}): give a path this user may read (and "
         "write, for outputs)"),
        (errno.EROFS, f"read-only file system ({long[:80]}...{long[-60:]}): give an output path on a writable one"),
        (errno.ENOSPC, f"disk full ({long[:80]}...{long[-60:]}): free space there and run the same command again"),
        (errno.ENOTDIR, f"a path goes through a file where a folder should be ({long[:80]}...{long[-60:]}): give "
         "another path"),
    ):  # fmt: skip

        def main(code=code):
            raise OSError(code, os.strerror(code), long)

        assert quiet_pipe(main, "roli train") == 2
        assert _one_line(capsys, "") == f"roli train: error: {said}"

    def short():
        raise PermissionError(errno.EACCES, "Permission denied", "/root/w.pt")

    assert quiet_pipe(short, "roli evaluate") == 2
    assert _one_line(capsys, "") == (
        "roli evaluate: error: permission denied (/root/w.pt): give a path this user may read (and write, for outputs)"
    )

    def other():
        raise OSError(errno.EIO, "Input/output error", "/dev/sdz")

    with pytest.raises(OSError, match="Input/output error"):  # not a path the user gave: the traceback stays
        quiet_pipe(other, "roli train")


@pytest.mark.parametrize(
    "argv, program",
    [(["-m", "roli.train", "--config"], "python -m roli.train"), (["-m", "roli", "report"], "roli report"),
     (["-m", "roli.grid", "cifar10/alp", "--out"], "python -m roli.grid")],
)  # fmt: skip
def test_a_name_too_long_is_one_line_from_every_entry_point(tmp_path, argv, program):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, *argv, str(tmp_path / ("x" * 300))], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)  # fmt: skip
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"{program}: error: a name in a path is longer than the file system allows (")
    assert os.listdir(tmp_path) == []
