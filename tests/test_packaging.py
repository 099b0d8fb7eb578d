"""What `pip install .` ships: the wheel and the sdist built from a copy of the tracked files hold every
subpackage of roli/ (found automatically by setup.py), the Triton kernels as roli.kernels, and the
C++/CUDA sources for the just-in-time build. (CI also installs the wheel into a fresh virtual environment
and runs the built-in default outside the checkout: .ci/run.)"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def tracked_copy(dest: Path) -> Path:
    try:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.split()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    for f in files:
        if (REPO / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / f, dest / f)
    return dest


def expected_modules() -> set[str]:
    """Every package of the source tree (a folder of roli/ with an __init__.py) and the kernels."""
    pkgs = {str(p.parent.relative_to(REPO)) for p in (REPO / "roli").rglob("__init__.py")}
    assert "roli/kernels" in pkgs and "roli/training" in pkgs
    return pkgs


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    src = tracked_copy(tmp_path_factory.mktemp("src"))
    out = tmp_path_factory.mktemp("dist")
    env = dict(os.environ, ROLI_NO_EXT="1")  # the pure-Python wheel, as an isolated `pip install .` builds it
    for kind in ("sdist", "wheel"):
        code = f"import sys; from setuptools import build_meta as b; print(b.build_{kind}(sys.argv[1]))"
        r = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, env=env, capture_output=True, text=True,
                           timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_wheel_holds_every_subpackage_and_the_sources(built):
    (wheel,) = built.glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for pkg in expected_modules():
        assert f"{pkg}/__init__.py" in names, f"{pkg} is missing from the wheel"
    assert "roli/kernels/pgd_step.py" in names
    for f in ("ops.cpp", "pgd_cpu.cpp", "pgd_math.h", "cuda/pgd_kernels.cu", "cuda/ops_cuda.cpp"):
        assert f"roli/_csrc/{f}" in names, f
    assert not any(n.startswith(("kernels/", "tests/", "benchmarks/")) for n in names)  # nothing top-level


def test_sdist_holds_every_subpackage_and_the_sources(built):
    (sdist,) = built.glob("*.tar.gz")
    with tarfile.open(sdist) as t:
        names = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    for pkg in expected_modules():
        assert f"{pkg}/__init__.py" in names, f"{pkg} is missing from the sdist"
    for f in ("setup.py", "pyproject.toml", "csrc/ops.cpp", "csrc/cuda/pgd_kernels.cu", "csrc/pgd_math.h"):
        assert f in names, f
