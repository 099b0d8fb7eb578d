"""The benchmark scripts' shared timing, and bench_train end to end on the small CNN (slow marker)."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

from _common import round_robin, timed  # noqa: E402


def test_timed_and_round_robin_measure_the_calls():
    assert 0.018 <= timed(lambda: time.sleep(0.02)) < 0.5
    order = []
    runs = {"a": lambda: (order.append("a"), time.sleep(0.002)), "b": lambda: (order.append("b"), time.sleep(0.02))}
    med = round_robin(runs, reps=3, warmup=1)
    assert order == ["a", "b"] * 4  # every variant once per round, warm-up round included
    assert med["b"] > med["a"] >= 0.0018


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512; without it torch emulates bf16 at a few GFLOP/s
    and the bf16 rows would take most of an hour)."""
    import torch

    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


@pytest.mark.slow
def test_bench_train_runs_and_writes_its_results(tmp_path):
    bf16 = native_bf16()
    out = subprocess.run([sys.executable, str(BENCH / "bench_train.py"), "--models", "cnn", "--quick", "--no-compile",
                          "--precisions", "fp32,bf16" if bf16 else "fp32", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "bench_train.csv").open()))
    want = {("FT", "ours fp32"), ("FT", "reference-style"), ("FT", "torchattacks+loop")}
    want |= {("ALP", "ours bf16")} if bf16 else set()
    assert {(r["step"], r["variant"]) for r in rows} >= want
    assert all(float(r["steps_per_s"]) > 0 and 0 < float(r["utilisation"]) for r in rows)
    assert "| cnn | FT | ours fp32 |" in (tmp_path / "bench_train_cpu.md").read_text()
    assert (tmp_path / "bench_train_cpu.png").stat().st_size > 1000


def test_gpu_check_says_so_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the check would run")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "no CUDA device here" in r.stderr
