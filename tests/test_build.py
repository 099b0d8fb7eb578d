"""The just-in-time build: with no ahead-of-time roli._C, the first use compiles csrc/ with ninja into
a cache directory, registers the ops, and a second process reuses the cache."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

CODE = """
import time, torch
from roli import _ext
t = time.time()
_ext._jit_build()
_ext._register_fakes()
x = torch.rand(3, 4); g = torch.randn(3, 4); n = x.clone()
torch.ops.roli.pgd_step_linf_(x, g, n, None, 0.1, None, 0.05, 0.0, 1.0)
want = torch.clamp(torch.clamp(n + 0.05 * g.sign(), n - 0.1, n + 0.1), 0, 1)
assert torch.equal(x, want), (x - want).abs().max()
print(f"ok {time.time() - t:.1f}")
"""


@pytest.mark.skipif(not os.environ.get("PATH"), reason="no PATH for the compiler")
def test_jit_build_and_cache(tmp_path):
    env = dict(os.environ, ROLI_EXT_DIR=str(tmp_path))
    t0 = time.time()
    first = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.startswith("ok")
    assert list(tmp_path.rglob("*.so")), "no shared object in the JIT cache"
    build_s = time.time() - t0
    second = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "building the C++ extension" not in second.stderr  # reused, not rebuilt
    assert float(second.stdout.split()[1]) < build_s


NVCC_13 = '#!/bin/sh\n[ "$1" = --version ] && echo "Cuda compilation tools, release 13.0, V13.0.48"\nexit 0\n'


def _toolkit(root, nvcc_text=NVCC_13):
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "bin" / "nvcc").write_text(nvcc_text)
    (root / "bin" / "nvcc").chmod(0o755)
    (root / "include" / "cuda_runtime.h").write_text("/* test */\n")
    return root


def test_cuda_toolkit_is_found_behind_an_nvcc_link_when_torchs_guess_has_no_headers(tmp_path, monkeypatch):
    from roli import _env

    real = _toolkit(tmp_path / "cuda-13.0")
    links = tmp_path / "local" / "bin"
    links.mkdir(parents=True)
    (links / "nvcc").symlink_to(real / "bin" / "nvcc")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{links}:{os.environ['PATH']}")
    torch_guess = str(tmp_path / "local")  # what torch derives from nvcc on PATH: no include/cuda_runtime.h
    assert _env.cuda_toolkit(torch_guess) == (str(real), "")
    assert _env.cuda_toolkit(str(real)) == (str(real), "")
    monkeypatch.setenv("CUDA_HOME", torch_guess)  # an explicit setting is never second-guessed
    root, why = _env.cuda_toolkit(str(real))
    assert root is None and f"CUDA_HOME={torch_guess}" in why
    monkeypatch.setenv("CUDA_HOME", str(real))
    assert _env.cuda_toolkit(None) == (str(real), "")


def test_cuda_toolkit_of_another_major_release_than_torchs_is_passed_over(tmp_path, monkeypatch):
    """torch refuses to build against a toolkit of another major release: a matching one elsewhere is taken,
    and with none the reason says what to install."""
    from roli import _env

    new = _toolkit(tmp_path / "cuda-13.0")
    old = _toolkit(tmp_path / "cuda-12.4", NVCC_13.replace("13.0", "12.4"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(_env.shutil, "which", lambda name: str(old / "bin" / "nvcc"))
    assert _env.toolkit_release(str(new)) == "13.0" and _env.toolkit_release(str(old)) == "12.4"
    assert _env.cuda_toolkit(str(new), "12.1") == (str(old), "")  # torch's guess is 13.0: the 12.x one on PATH
    assert _env.cuda_toolkit(str(new), "13.0") == (str(new), "")
    monkeypatch.setattr(_env.shutil, "which", lambda name: None)
    monkeypatch.setattr(_env, "_is_toolkit", lambda root: root == str(new))  # no /usr/local/cuda* either
    root, why = _env.cuda_toolkit(str(new), "12.1")
    assert root is None and f"{new} is 13.0 but torch was built with CUDA 12.1" in why and "install CUDA 12.x" in why
    monkeypatch.setenv("CUDA_HOME", str(new))
    root, why = _env.cuda_toolkit(None, "12.1")
    assert root is None and "(CUDA_HOME)" in why


FALLBACK = """
import sys, torch
torch.version.cuda = "13.0"  # a CUDA torch's view of the world on this CPU machine
sys.modules["roli._C"] = None  # as if no ahead-of-time build were installed: the just-in-time path
from roli import _ext, info
assert _ext.load(), _ext.EXT_ERROR
x = torch.rand(3, 4); g = torch.randn(3, 4); n = x.clone()
torch.ops.roli.pgd_step_linf_(x, g, n, None, 0.1, None, 0.05, 0.0, 1.0)
assert torch.equal(x, torch.clamp(torch.clamp(n + 0.05 * g.sign(), n - 0.1, n + 0.1), 0, 1))
print(info.backends()["cuda"])
"""


@pytest.mark.slow
def test_jit_build_falls_back_to_the_cpu_kernels_when_the_cuda_build_fails(tmp_path):
    """A toolkit whose nvcc fails: the just-in-time build still gives the CPU kernels, says why CUDA is missing,
    and later processes do not retry the CUDA build."""
    fails = NVCC_13.replace("exit 0", "echo 'kernels.cu(1): error: simulated nvcc failure' >&2\nexit 1")
    kit = _toolkit(tmp_path / "kit", fails)
    env = dict(os.environ, ROLI_EXT_DIR=str(tmp_path / "ext"), CUDA_HOME=str(kit), TORCH_CUDA_ARCH_LIST="9.0")
    env.pop("ROLI_NO_JIT", None)
    runs = [subprocess.run([sys.executable, "-c", FALLBACK], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]  # fmt: skip
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
        assert "unavailable: roli._C was built without CUDA kernels" in r.stdout
        assert "CUDA build failed" in r.stdout
    assert "simulated nvcc failure" in runs[0].stdout  # the compiler's own error line is the reason
    assert "building the CPU kernels only" in runs[0].stderr
    assert "earlier CUDA build failed" in runs[1].stdout and "building" not in runs[1].stderr
    assert list((tmp_path / "ext").glob("*-cpu/*.so")) and list((tmp_path / "ext").glob("*-cuda/cuda_build_failed.txt"))
    env["ROLI_BUILD_CUDA"] = "1"  # asked for CUDA explicitly: the failure is an error, not a fallback
    forced = subprocess.run([sys.executable, "-c", FALLBACK], env=env, capture_output=True, text=True, timeout=600)
    assert forced.returncode != 0 and "ROLI_BUILD_CUDA=1" in forced.stderr


def _torch_like_load(calls):
    """torch.utils.cpp_extension.load's locking: its FileBaton, whose file left by a killed build makes it wait
    forever (here: fail at once)."""
    from torch.utils.file_baton import FileBaton

    def load(name, sources, build_directory, **kw):
        baton = FileBaton(os.path.join(build_directory, "lock"))
        assert baton.try_acquire(), "torch would wait for this file forever"
        try:
            calls.append(build_directory)
        finally:
            baton.release()

    return load


def test_a_killed_builds_lock_is_removed_and_a_live_one_waited_for(tmp_path, monkeypatch, capsys):
    import threading

    from torch.utils import cpp_extension

    from roli import _ext
    from roli._io import lock_file

    calls = []
    monkeypatch.setattr(cpp_extension, "load", _torch_like_load(calls))
    build = tmp_path / "build"
    build.mkdir()
    (build / "lock").write_text("")  # a build killed before: torch's file, roli's flock free
    _ext._load(_ext.source_dir(), _ext.CPU_SOURCES, build)
    assert calls == [str(build)] and not (build / "lock").exists()
    assert f"roli: removed {build / 'lock'}, left by a build that was killed" in capsys.readouterr().err
    fd = lock_file(build / _ext.BUILD_LOCK)  # a live build in another process: roli's flock and torch's file
    (build / "lock").write_text("")
    waiting = threading.Thread(target=_ext._load, args=(_ext.source_dir(), _ext.CPU_SOURCES, build))
    waiting.start()
    try:
        time.sleep(1.0)
        assert calls == [str(build)] and (build / "lock").exists()  # waits; the live build's file stays
    finally:
        (build / "lock").unlink()  # the live build ends
        os.close(fd)
    waiting.join(60)
    assert calls == [str(build)] * 2
    err = capsys.readouterr().err
    assert f"roli: another process is building the C++ extension in {build}: waiting for it ..." in err
    assert "left by a build that was killed" not in err


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("PATH"), reason="no PATH for the compiler")
def test_a_build_killed_half_way_does_not_hang_the_next_process(tmp_path):
    import signal

    env = dict(os.environ, ROLI_EXT_DIR=str(tmp_path))
    first = subprocess.Popen([sys.executable, "-c", CODE], env=env, stderr=subprocess.PIPE, text=True)
    try:
        said = []
        while not said or said[-1] and "building the C++ extension" not in said[-1]:  # warnings may come first
            said.append(first.stderr.readline())
        assert "building the C++ extension" in said[-1], said
        time.sleep(2.0)
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    finally:
        if first.poll() is None:
            first.kill()
    assert list(tmp_path.glob("*/lock")), "the killed build left no torch lock: nothing was tested"
    second = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0 and second.stdout.startswith("ok"), second.stderr[-3000:]
    assert "left by a build that was killed" in second.stderr
