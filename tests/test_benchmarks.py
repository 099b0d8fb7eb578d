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


def test_round_robin_spread_times_blocks_of_steps_interleaved(monkeypatch):
    """A stand-in clock: each call of a variant costs its own fixed "seconds", so the medians, spreads and the
    division by the block's steps are exact (no wall-clock timing asserted)."""
    import _common

    cost = {"a": 0.002, "b": 0.006}
    factors = iter([9, 9, 1, 1, 3, 3, 2, 2])  # per block: the warm-up round (left out), then rounds 1, 2, 3
    calls = []

    def fake_timed(fn, device="cpu"):
        start = len(calls)
        fn()
        return sum(cost[c] for c in calls[start:]) * next(factors)

    monkeypatch.setattr(_common, "timed", fake_timed)
    out = _common.round_robin_spread({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                     reps=3, warmup=1, steps=4)  # fmt: skip
    assert calls == (["a"] * 4 + ["b"] * 4) * 4  # every variant's block of 4 in each of 1 + 3 rounds
    for label, c in cost.items():  # seconds per call (a block's over its 4 calls): median, min, max of 1x, 3x, 2x
        assert out[label] == pytest.approx((2 * c, c, 3 * c)), (label, out[label])
    assert _common.host_syncs(lambda: None, "cpu") is None  # counted on a GPU only


@pytest.mark.slow  # the whole benchmark on a CPU: ~1.5 minutes on 2 cores
def test_bench_train_settle_writes_spread_and_sync_columns(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / "bench_train.py"), "--models", "cnn", "--quick", "--no-compile",
                          "--precisions", "fp32", "--settle", "--steps", "2", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    table = (tmp_path / "bench_perf_cpu.md").read_text()
    assert "| model | step | variant | steps/s | steps/s min-max | host syncs/step | images/s |" in table
    assert "3 rounds of 2 steps" in table
    rows = list(csv.DictReader((tmp_path / "bench_perf.csv").open()))
    assert rows and all(float(r["steps_per_s_min"]) <= float(r["steps_per_s"]) <= float(r["steps_per_s_max"])
                        for r in rows)  # fmt: skip
    assert not (tmp_path / "bench_train.csv").exists()


def test_gpu_check_says_so_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the check would run")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "no CUDA device here" in r.stderr


FAKE_PYTHON = r"""#!/usr/bin/env bash
# Stands in for python on a CUDA machine: logs each call and what it saw, writes what a benchmark writes.
args="$*"
echo "CALL ${args//$'\n'/ } | PYTHONPATH=$PYTHONPATH | ARCH=$TORCH_CUDA_ARCH_LIST | GPU=$ROLI_TEST_GPU" >>"$FAKE_LOG"
case "$1 $2" in
  *fp8_supported*) [[ $FAKE_FAIL == *nofp8* ]] && { echo "A100 (compute capability 8.0): no FP8"; exit 1; } ;;
  *get_device_capability*) echo 9.0 ;;
  "-m pip") ;;
  "-m pytest") [[ $FAKE_FAIL == *tests* ]] && { echo "1 failed"; exit 1; } ;;
  benchmarks/bench_*)
    name=$(basename "${1%.py}"); out=${@: -1}
    [[ $FAKE_FAIL == *$name* ]] && { echo "Traceback: $name broke"; exit 1; }
    echo "| table of $name |" > "$out/${name}_cuda.md" ;;
esac
exit 0
"""


def _gpu_check(tmp_path, *args, fail="", python_var=True):
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHON": str(fake), "FAKE_LOG": str(tmp_path / "calls.log"), "FAKE_FAIL": fail,
           "TMPDIR": str(tmp_path)}  # fmt: skip
    if not python_var:  # `python` without torch first on PATH, the stand-in as `python3`
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        (bin_dir / "python").write_text("#!/usr/bin/env bash\nexit 1\n")
        (bin_dir / "python").chmod(0o755)
        (bin_dir / "python3").symlink_to(fake)
        env = {**{k: v for k, v in env.items() if k != "PYTHON"}, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    r = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), *args], capture_output=True, text=True, timeout=120,
                       env=env, cwd=tmp_path)  # fmt: skip
    calls = (tmp_path / "calls.log").read_text().splitlines() if (tmp_path / "calls.log").exists() else []
    return r, calls


def test_gpu_check_runs_every_stage_on_the_checkout_and_bundles_the_results(tmp_path):
    """The script's own logic, with a stand-in python that reports a GPU: stage order, the checkout first on
    PYTHONPATH, offline wheels, this GPU's arch, a failed stage that does not stop the others, the bundle."""
    import tarfile

    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "torchattacks-3.5.1-py3-none-any.whl").write_bytes(b"PK")
    (tmp_path / "ship").mkdir()

    def cuda_results():  # the checkout's committed GPU tables, with their contents
        return {p.name: p.read_bytes() for p in BENCH.glob("results/*_cuda.*")}

    before = cuda_results()
    r, calls = _gpu_check(tmp_path, "--out", "res", "--wheels", "wheels", "--bundle", "ship", fail="bench_attack")
    assert r.returncode == 3, r.stdout + r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("gpu_check: FAILED: attack")
    runs = [c for c in calls if c.startswith(("CALL benchmarks/", "CALL -m pytest")) or "_ext.load" in c]
    order = ["gpu_env.py", "_ext.load", "-m pytest", "bench_pgd_step.py", "bench_attack.py", "bench_train.py",
             "bench_fp8.py", "sdpa_kernels.py"]  # fmt: skip
    assert [next(k for k in order[::-1] if k in c) for c in runs] == order
    assert all(f"PYTHONPATH={BENCH.parent}:" in c and "ARCH=9.0" in c for c in runs)  # then the wheels' folder
    assert any(c.startswith("CALL -m pip install") and str(tmp_path / "wheels") in c for c in calls)
    assert "GPU=1" in next(c for c in runs if "-m pytest" in c)
    assert "vit_base_patch16_224" in next(c for c in runs if "bench_attack" in c)
    assert "vitb" in next(c for c in runs if "bench_train" in c)
    perf = next(c for c in runs if "bench_train" in c)  # the default run: perf (train only when asked)
    assert "--settle" in perf and "swinb" in perf and "resnet50" in perf and "--largest-batch vitb" in perf
    assert "--no-compile" in perf and "--compile-only" not in " ".join(runs)  # compile: on request only
    assert "--dataset" not in next(c for c in runs if "bench_fp8" in c)  # no --data: digits
    assert all("--device cuda" in c for c in runs if "bench_" in c)
    with tarfile.open(tmp_path / "ship" / "gpu_check.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
        log = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("gpu_check_cuda.log"))).read()
    assert {"bench_pgd_step_cuda.md", "bench_train_cuda.md", "gpu_check_cuda.log"} <= names
    assert "bench_attack_cuda.md" not in names and b"bench_attack broke" in log
    assert cuda_results() == before  # --out kept the checkout as it was


def test_gpu_check_only_reruns_the_named_stages_and_refuses_bad_arguments(tmp_path):
    r, calls = _gpu_check(tmp_path, "--only", "train", "--out", "res")
    assert r.returncode == 0 and "every stage passed" in r.stdout
    ran = [c for c in calls if c.startswith(("CALL benchmarks/", "CALL -m pytest")) or "_ext.load" in c]
    assert len(ran) == 3 and "gpu_env.py" in ran[0] and "_ext.load" in ran[1] and "bench_train.py" in ran[2]
    assert (tmp_path / "res" / "bench_train_cuda.md").exists()
    for args, why in [(["--only", "tests,gpu"], "unknown stage 'gpu'"), (["--wheels", "nowhere"], "no .whl files"),
                      (["--bundle", "nowhere"], "is not a folder"), (["--fast"], "unknown argument")]:  # fmt: skip
        r, calls = _gpu_check(tmp_path, *args)
        assert r.returncode == 2 and r.stdout == "" and why in r.stderr and len(r.stderr.splitlines()) == 1


def test_sdpa_kernels_names_the_attention_backend_per_model(tmp_path):
    argv = [sys.executable, str(BENCH / "sdpa_kernels.py"), "--device", "cpu", "--models", "tiny", "--batch", "4"]
    out = subprocess.run([*argv, "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["model"]: r for r in csv.DictReader((tmp_path / "sdpa_kernels.csv").open())}
    assert rows["vit-tiny"]["fused_attn"] == "True" and rows["vit-tiny"]["backends"] == "flash"  # the CPU's flash
    assert "flash_attention_for_cpu_backward" in rows["vit-tiny"]["ops"]  # the attack's backward too
    swin = rows["swin-tiny"]  # timm keeps Swin's fused path off ("experimental"): the explicit softmax runs
    assert swin["fused_attn"] == "False" and swin["backends"] == "none (explicit softmax)" and swin["ops"] == "-"
    forced = rows["swin-tiny (fused_attn forced on)"]
    assert forced["fused_attn"] == "True" and forced["backends"] == "flash" and float(forced["ms"]) > 0


def test_gpu_check_fp8_and_compile_stages(tmp_path):
    data = tmp_path / "c10.npz"
    data.write_bytes(b"npz")
    r, calls = _gpu_check(tmp_path, "--only", "fp8,compile", "--data", "c10.npz", "--out", "res")
    assert r.returncode == 0, r.stdout + r.stderr
    fp8 = next(c for c in calls if c.startswith("CALL benchmarks/bench_fp8.py"))
    assert f"--dataset npz:{data}" in fp8 and "--device cuda" in fp8
    assert any(c.startswith("CALL -m pytest") and "-m slow -k compile tests/test_gpu.py" in c for c in calls)
    comp = next(c for c in calls if c.startswith("CALL benchmarks/bench_train.py"))
    assert "--compile-only" in comp and "--name bench_perf_compile" in comp and "--no-compile" not in comp
    (tmp_path / "calls.log").unlink()
    r, calls = _gpu_check(tmp_path, "--only", "fp8", "--out", "res", fail="nofp8")  # an A100: said, not failed
    assert r.returncode == 0 and "== fp8: skipped: A100 (compute capability 8.0): no FP8" in r.stdout
    assert not any("bench_fp8" in c for c in calls if c.startswith("CALL benchmarks/"))
    r, _ = _gpu_check(tmp_path, "--data", "missing.npz")
    assert r.returncode == 2 and "--data: " in r.stderr and len(r.stderr.splitlines()) == 1


def test_gpu_check_takes_python3_and_writes_outside_the_checkout_by_default(tmp_path):
    r, calls = _gpu_check(tmp_path, "--only", "env", python_var=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert calls and "gpu_env.py" in next(c for c in calls if "benchmarks/" in c)  # python3 ran the stages
    out = tmp_path / "roli-gpu-check"
    assert f"results in {out}" in r.stdout and (out / "gpu_check_cuda.log").is_file()
    assert "== env" in (out / "gpu_check_cuda.log").read_text()


def test_gpu_env_reports_the_stack_and_names_what_the_build_lacks(tmp_path):
    ok = subprocess.run([sys.executable, str(BENCH / "gpu_env.py")], capture_output=True, text=True, timeout=60)
    keys = [line.split(":", 1)[0] for line in ok.stdout.splitlines()]
    assert keys == ["device", "driver", "python", "torch", "triton", "nvcc", "Python headers", "c++", "ninja"]
    # No C++ compiler and no CUDA toolkit to be found: exit 1 and one line naming both.
    env = {"PATH": str(Path(sys.executable).parent), "CXX": "", "CUDA_HOME": str(tmp_path), "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, str(BENCH / "gpu_env.py")], capture_output=True, text=True, timeout=60,
                       env=env, cwd=tmp_path)  # fmt: skip
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "lacks: a CUDA toolkit" in r.stderr and "a C++ compiler" in r.stderr


def test_benchmarks_run_without_torchattacks(monkeypatch, capsys):
    """A GPU machine without network may lack torchattacks: its rows are left out with a note, ours still run,
    and ours defer the attack's checks to a device flag as the trainer does (no host sync per step)."""
    import torch

    monkeypatch.setitem(sys.modules, "torchattacks", None)  # `import torchattacks` raises ImportError
    import bench_attack
    import bench_train
    from _common import optional_torchattacks

    assert optional_torchattacks() is None and "torchattacks is not installed" in capsys.readouterr().err
    bench_train.X, bench_train.Y = torch.rand(8, 3, 32, 32), torch.randint(0, 10, (8,))
    runs = bench_train.variants("cnn", use_compile=False, device=torch.device("cpu"))
    assert ("FT", "ours fp32") in runs and ("ALP", "ours fp32") in runs and ("FT", "reference-style") in runs
    assert not any("torchattacks" in label for _, label in runs)
    for key in (("FT", "ours fp32"), ("ALP", "ours fp32")):
        runs[key][1]()  # one step each, checks deferred
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 10)).eval()
    x, y = torch.rand(4, 3, 4, 4), torch.randint(0, 10, (4,))
    attack = bench_attack.make_variants(model, x, y, 0.03, 0.01, 2, None)
    assert set(attack) == {"ours fp32", "ours bf16", "reference-style"}
    assert float((attack["ours fp32"][1]() - x).abs().max()) <= 0.03 + 1e-6
