"""Evaluation across processes (torchrun, gloo on CPU): `python -m roli.evaluate` and the trainer's test-time
AutoAttack give each rank its batches, seed every batch on its own and reduce; the results equal one
process's example by example, and a sharded AutoAttack interrupted by SIGKILL resumes to the same result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from roli import _dist

BASE = ["--model", "roli.models.small:small_cnn", "--dataset", "digits", "--n-ex", "64", "--batch-size", "16",
        "--eps", "0.1", "--steps", "4"]  # fmt: skip


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER"))}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _cmd(nproc: int, module: str, argv: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", module, *argv]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module,
            *argv]  # fmt: skip


def _evaluate(nproc: int, argv: list[str], out) -> dict:
    run = subprocess.run(_cmd(nproc, "roli.evaluate", [*argv, "--out", str(out)]), capture_output=True, text=True,
                         timeout=900, env=_env())  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("evaluation ") == 1  # one table, from rank 0
    return json.loads(out.read_text())


def _same(a: dict, b: dict) -> None:
    for key in ("n", "clean", "attacks", "worst_case", "per_example", "eps_sweep", "autoattack_per_attack"):
        assert a.get(key) == b.get(key), key


def test_two_processes_equal_one_example_by_example(checkpoint, tmp_path):
    argv = [*BASE, "--checkpoint", str(checkpoint), "--eps-sweep", "0.05,0.1", "--autoattack", "standard"]
    one = _evaluate(1, argv, tmp_path / "one.json")
    two = _evaluate(2, argv, tmp_path / "two.json")
    assert one["processes"] == 1 and two["processes"] == 2
    _same(one, two)
    per = one["per_example"]
    assert len(per["clean"]) == 64 and set(per["pgd"]) == {"0", "1"}  # both outcomes occur
    assert per["worst_case"] == "".join(str(int(a == b == c == "1")) for a, b, c in
                                        zip(per["clean"], per["pgd"], per["autoattack"], strict=True))  # fmt: skip


@pytest.mark.slow
def test_sharded_autoattack_resumes_after_sigkill(checkpoint, tmp_path):
    argv = [*BASE, "--checkpoint", str(checkpoint), "--attack", "none", "--autoattack", "standard"]
    ref = _evaluate(2, argv, tmp_path / "ref.json")
    state = tmp_path / "aa"
    cmd = _cmd(2, "roli.evaluate", [*argv, "--aa-state", str(state), "--out", str(tmp_path / "x")])
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                            start_new_session=True)  # fmt: skip
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None and len(list(state.glob("batch*.pt"))) < 2:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both workers
    proc.wait(timeout=60)
    done = sorted(p.name for p in state.glob("batch*.pt"))
    assert 2 <= len(done) and not (tmp_path / "x").exists()
    # Resumed with another number of processes: the state is per batch, not per rank.
    resumed = _evaluate(3, [*argv, "--aa-state", str(state)], tmp_path / "resumed.json")
    _same(resumed, ref)
    assert sorted(p.name for p in state.glob("batch*.pt")) == [f"batch{i}.pt" for i in range(4)]


@pytest.mark.parametrize("classes", [None, "0-4"])  # 0-4: one test batch, so rank 1 attacks none
def test_trainer_test_autoattack_runs_once_sharded(tmp_path, classes):
    """Under torchrun the trainer's test-time AutoAttack runs on each batch once (one state file per batch),
    and its figures equal a one-process evaluation of the same model. With fewer batches than ranks, the
    stop check after each batch is still called as often on every rank (the code before the one evaluator
    crashed there: "Is there a distributed collective mismatch in your code?")."""
    run = tmp_path / "run"
    flags = ["--method", "alp", "--dataset", "digits", "--eps", "0.1", "--step-size", "0.025", "--steps", "2",
             "--val-steps", "2", "--epochs", "1", "--warmup", "0", "--batch-size", "32", "--autoattack", "standard",
             "--random-backbone", "--run-dir", str(run), *(["--classes", classes] if classes else [])]  # fmt: skip
    out = subprocess.run(_cmd(2, "roli.train", flags), capture_output=True, text=True, timeout=900, env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    test = json.loads((run / "results.json").read_text())["alp"]["test"]
    n_batches = -(-test["n"] // 256)
    assert sorted(p.name for p in (run / "autoattack" / "alp").glob("*.pt")) == [f"batch{i}.pt" for i in
                                                                                range(n_batches)]  # fmt: skip
    one = _evaluate(1, ["--run", str(run), "--stage", "alp", "--autoattack", "standard"], tmp_path / "one.json")
    assert one["clean"] == test["clean"]
    assert one["attacks"]["PGD-2 (linf, eps=0.1)"] == test["pgd2"]
    assert next(v for k, v in one["attacks"].items() if k.startswith("AutoAttack")) == test["autoattack"]


def test_local_device_and_batch_shards(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert _dist.local_device("cuda:0") == "cuda:2" and _dist.local_device("cuda") == "cuda:2"
    assert _dist.local_device("cpu") == "cpu"
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert _dist.local_device("cuda:1") == "cuda:1"
    monkeypatch.setattr(_dist, "rank", lambda: 1)
    monkeypatch.setattr(_dist, "world", lambda: 3)
    assert list(_dist.shard(8)) == [1, 4, 7]


def test_evaluate_progress_lines_off_a_terminal(checkpoint, tmp_path):
    env = {**_env(), "ROLI_PROGRESS_SECONDS": "0"}
    argv = [*BASE, "--checkpoint", str(checkpoint), "--out", str(tmp_path / "o.json")]
    run = subprocess.run(_cmd(1, "roli.evaluate", argv), capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = [line for line in run.stderr.splitlines() if line.startswith("evaluate: batch ")]
    assert lines and "img/s, ETA" in lines[0] and lines[0].startswith("evaluate: batch 1/4")


def test_evaluate_run_dir_passes_through_torchrun():
    """torchrun reads `--run` as an abbreviation of its own `--run-path` and stops; `--run-dir` reaches roli."""
    from torch.distributed.run import get_args_parser

    from roli.evaluate import build_parser

    torchrun = get_args_parser()
    with pytest.raises(SystemExit):
        torchrun.parse_args(["--standalone", "-m", "roli.evaluate", "--run", "r"])
    args = torchrun.parse_args(["--standalone", "-m", "roli.evaluate", "--run-dir", "r"])
    assert build_parser().parse_args(args.training_script_args).run == "r"
