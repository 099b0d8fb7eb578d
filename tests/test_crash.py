"""Killed at any write, a run resumes (or starts again) to exactly the uninterrupted result.

Each case runs roli in a forked child (torch already imported: no start-up cost per kill) that SIGKILLs itself
just before its k-th rename of a file into place (every write roli makes goes through atomic_write's rename;
a new run directory through one rename of its temporary sibling), for every k the run has. Then `--resume`
(or, where the kill came before the run directory existed, the same command again) runs in a fresh child, and
every tensor of every best.pt and the test figures must equal those of a run that was never killed."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from test_grid import BASE

from roli._io import manifest
from roli.train import main as train

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child per kill")

DIGITS = ["--dataset", "digits", "--classes", "0-3", "--eps", "0.1", "--step-size", "0.05", "--steps", "1",
          "--val-steps", "1", "--epochs", "2", "--warmup", "0", "--random-backbone", "--batch-size", "64",
          "--alp-lr", "0.5", "--lr", "0.1"]  # fmt: skip


def in_child(main, argv: list[str], kill_at: int = 0, count_to: Path | None = None) -> int | str:
    """main(argv) in a forked child with one thread; SIGKILLed before its kill_at-th rename (1-based; 0: never).
    Returns main's exit code, or "killed". count_to: the child writes how many renames it made there."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 70
        try:
            torch.set_num_threads(1)
            renames = [0]

            def counting(real):
                def rename(src, dst, *a, **kw):
                    renames[0] += 1
                    if renames[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                    return real(src, dst, *a, **kw)

                return rename

            os.replace, os.rename = counting(os.replace), counting(os.rename)
            code = main(argv)
            if count_to is not None:
                count_to.write_text(str(renames[0]))
        except BaseException as e:  # noqa: BLE001 - reported through the exit code
            print(f"child failed: {e!r}", file=sys.stderr)
        finally:
            os._exit(code if isinstance(code, int) else 71)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return "killed"
    return os.WEXITSTATUS(status)


def outcome(run: Path) -> dict:
    """Every tensor of every stage's best.pt, and the test figures."""
    out = {"results": {k: v["test"] for k, v in json.loads((run / "results.json").read_text()).items()}}
    for best in sorted(run.glob("*/best.pt")):
        state = torch.load(best, map_location="cpu", weights_only=True)
        meta = {k: v for k, v in state["meta"].items() if k != "run"}  # "run": each run's own random identity
        out[best.parent.name] = {**state["state_dict"], "meta": meta}
        last = torch.load(best.parent / "last.pt", map_location="cpu", weights_only=True)
        out[best.parent.name + "/last"] = last["model"]  # the final weights, whichever epoch was best
    return out


def same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            if not isinstance(y, dict) or not same(x, y):
                return False
        elif isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def kill_everywhere(tmp_path: Path, argv: list[str], run: Path) -> tuple[int, int]:
    """(writes, how many kills came before the run directory existed): each k from 1 to the run's count."""
    count = tmp_path / "count"
    assert train([*argv, "--run-dir", str(tmp_path / "warm")]) == 0  # imports all it needs before the forks
    assert in_child(train, [*argv, "--run-dir", str(run)], count_to=count) == 0
    writes, expected = int(count.read_text()), outcome(run)
    assert writes >= 10, writes
    before_dir = 0
    for k in range(1, writes + 1):
        where = tmp_path / f"k{k}" / "run"
        assert in_child(train, [*argv, "--run-dir", str(where)], kill_at=k) == "killed", k
        if where.exists():  # a run directory exists only whole: marker, manifest, config and fingerprint
            assert all((where / n).is_file() for n in (".roli-run", ".roli-manifest.jsonl", "config.json")), k
            assert manifest(where), k
            assert in_child(train, ["--resume", str(where)]) == 0, k
        else:
            before_dir += 1
            assert in_child(train, [*argv, "--run-dir", str(where)]) == 0, k
        assert same(outcome(where), expected), f"killed before write {k}: resumed differently"
        leftovers = [p.name for p in where.parent.iterdir() if p.name != "run"]
        assert not leftovers, (k, leftovers)  # a killed start's temporary sibling was removed
        temporaries = [p for p in where.rglob("*.tmp")]
        assert not temporaries, (k, temporaries)  # a killed write's temporary was removed
    return writes, before_dir


def test_train_killed_at_every_write_resumes_identically(tmp_path):
    writes, before_dir = kill_everywhere(tmp_path, ["--method", "roli", "--peft", "full", *DIGITS], tmp_path / "ref")
    assert before_dir >= 1 and writes - before_dir >= 10  # both kinds were exercised


def figures(path: Path) -> dict:
    """An evaluation's figures (per example included), without its timings and paths."""
    out = json.loads(path.read_text())
    keys = ("n", "clean", "attacks", "worst_case", "per_example", "autoattack_per_attack")
    return {k: out.get(k) for k in keys}


@pytest.mark.slow  # AutoAttack 18 times in one thread: about 3.5 minutes on 2 cores
def test_evaluate_autoattack_killed_at_every_write_resumes_identically(tmp_path):
    from roli.evaluate import main as evaluate

    run = tmp_path / "run"
    assert train(["--method", "alp", *DIGITS, "--run-dir", str(run)]) == 0
    argv = ["--run", str(run), "--attack", "none", "--autoattack", "standard", "--batch-size", "16", "--n-ex", "32"]
    count = tmp_path / "count"
    ref = tmp_path / "ref.json"
    assert evaluate([*argv, "--aa-state", str(tmp_path / "aa-warm"), "--out", str(tmp_path / "warm.json")]) == 0
    assert in_child(evaluate, [*argv, "--aa-state", str(tmp_path / "aa"), "--out", str(ref)], count_to=count) == 0
    writes, expected = int(count.read_text()), figures(ref)
    assert writes == 9 and expected["n"] == 32, writes  # the state of each batch of 16 after each attack, the result
    for k in range(1, writes + 1):
        state, out = tmp_path / f"aa{k}", tmp_path / f"out{k}.json"
        assert in_child(evaluate, [*argv, "--aa-state", str(state), "--out", str(out)], kill_at=k) == "killed"
        assert not out.exists() and len(list(state.glob("batch*.pt"))) == min(2, (k + 2) // 4)
        assert in_child(evaluate, [*argv, "--aa-state", str(state), "--out", str(out)]) == 0, k
        assert figures(out) == expected, f"killed before write {k}: resumed differently"
        assert not list(state.glob(".*.tmp")), k


HOOK = """
import fcntl, os, signal
_at, _counter = int(os.environ.get("ROLI_TEST_KILL_AT", "0")), os.environ.get("ROLI_TEST_COUNTER")
if _counter:
    def _counting(real):
        def rename(src, dst, *a, **kw):
            with open(_counter, "a+") as f:  # one count for the grid and every run it forks
                fcntl.flock(f, fcntl.LOCK_EX)
                f.seek(0)
                n = int(f.read() or 0) + 1
                f.seek(0)
                f.truncate()
                f.write(str(n))
                f.flush()
            if n == _at:
                os.killpg(os.getpgrp(), signal.SIGKILL)  # the grid, its fork server and its runs
            return real(src, dst, *a, **kw)
        return rename
    os.replace, os.rename = _counting(os.replace), _counting(os.rename)
"""

GRID_CONFIG = BASE + "method: roli\npeft: lora\n"  # test_grid's roli_lora: an ALP run and a RoLI run


def grid_in_group(tmp_path: Path, out: Path, kill_at: int = 0) -> int | str:
    """`python -m roli.grid` in a process group of its own, every process of it counting renames in one file
    (a sitecustomize on PYTHONPATH) and the whole group SIGKILLed before rename kill_at."""
    import subprocess

    hook = tmp_path / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    counter = tmp_path / f"count-{out.name}"
    counter.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]),
           "ROLI_TEST_COUNTER": str(counter), "ROLI_TEST_KILL_AT": str(kill_at), "OMP_NUM_THREADS": "1"}  # fmt: skip
    argv = [sys.executable, "-m", "roli.grid", str(tmp_path / "roli_lora.yaml"), "--out", str(out)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, start_new_session=True, timeout=600)
    if proc.returncode == -signal.SIGKILL:
        return "killed"
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(counter.read_text())


def grid_outcome(out: Path) -> dict:
    runs = {p.parent for p in out.rglob("results.json")}
    return {r.relative_to(out).as_posix() if "alp" not in r.parts else "alp": outcome(r) for r in runs}


@pytest.mark.slow  # a grid (an ALP run and a RoLI run) killed at each of its writes: 12 minutes here (2 cores)
def test_grid_killed_at_every_write_reruns_to_the_same_figures(tmp_path):
    (tmp_path / "roli_lora.yaml").write_text(GRID_CONFIG)
    writes = grid_in_group(tmp_path, tmp_path / "ref")
    expected = grid_outcome(tmp_path / "ref")
    assert writes >= 20 and set(expected) == {"alp", "roli_lora"}, (writes, expected.keys())
    for k in range(1, writes + 1):
        out = tmp_path / f"g{k}"
        assert grid_in_group(tmp_path, out, kill_at=k) == "killed", k
        assert grid_in_group(tmp_path, out) > 0, k  # the same command again: resumes what was killed
        assert same(grid_outcome(out), expected), f"killed before write {k}: rerun differently"
        assert not [p for p in out.rglob("*.tmp")], k
        assert not [p for p in out.rglob(".*roli-new-*")], k
