"""Loads the compiled extension ``roli._C`` once and remembers why it could not.

Order: the ahead-of-time build from ``setup.py`` (``import roli._C``); else a just-in-time build with
ninja into a cache directory (first use only, ~15-30 s); else nothing, with the reason kept for
``python -m roli.info`` and for the errors of a forced ``impl="cpp"``/``"cuda"``. Loading is lazy
(first op call that wants it), never at import, and makes no CUDA calls.

Environment: ``ROLI_NO_EXT=1`` disables the extension; ``ROLI_NO_JIT=1`` disables only the
just-in-time build; ``ROLI_EXT_DIR`` sets the build cache (default ``~/.cache/roli/ext``);
``ROLI_BUILD_CUDA=auto|0|1`` decides whether the JIT build includes the CUDA sources.
"""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import torch

from roli import _env

OPS = ("pgd_step_linf_", "pgd_step_l2_", "keep_best_")
CPU_SOURCES = ("ops.cpp", "pgd_cpu.cpp")
CUDA_SOURCES = ("cuda/pgd_kernels.cu", "cuda/ops_cuda.cpp")

HAS_EXT: bool = False
EXT_MODE: str | None = None  # "aot" | "jit"
EXT_ERROR: str | None = None
_loaded = False
_lock = threading.Lock()


def cpu_cflags() -> list[str]:
    """Flags of the CPU sources, shared with setup.py: OpenMP makes at::parallel_for parallel."""
    return ["-O3", "-g0", "-fopenmp", "-fopenmp-simd", "-std=c++20"]


def source_dir() -> Path | None:
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    return None


def want_cuda_build() -> tuple[bool, str]:
    """Whether to compile the CUDA sources, and why not."""
    setting = _env.build_cuda()
    if setting == "0":
        return False, "ROLI_BUILD_CUDA=0"
    if torch.version.cuda is None:
        return False, "this torch has no CUDA (torch.version.cuda is None)"
    from torch.utils import cpp_extension

    root, why = _env.cuda_toolkit(cpp_extension.CUDA_HOME, torch.version.cuda)
    return (True, "") if root else (False, why)


CUDA_BUILD_ERROR: str | None = None  # why a just-in-time build went ahead without the CUDA sources
_CUDA_FAILED = "cuda_build_failed.txt"  # left in the CUDA build's folder: later processes build CPU-only


def _first_line(error: BaseException) -> str:
    """The compiler's first error line where there is one (a build failure's text starts with the commands)."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    found = [ln for ln in lines if "error:" in ln.lower()]
    return ((found or lines)[0] if lines else repr(error))[:300]


def _jit_build() -> None:
    """Builds roli._C with the CUDA sources where wanted; when that build fails, the CPU sources alone (the
    CPU kernels still work) and the CUDA failure is kept in CUDA_BUILD_ERROR and in a file that stops later
    processes from retrying (delete it, or set ROLI_BUILD_CUDA=1, to try again)."""
    global CUDA_BUILD_ERROR
    src = source_dir()
    if src is None:
        raise RuntimeError("the C++ sources (csrc/) are not installed with this copy of roli")
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    with_cuda, why = want_cuda_build()
    if with_cuda:
        cuda_dir = _env.ext_dir() / f"{tag}-cuda"
        failed = cuda_dir / _CUDA_FAILED
        if failed.is_file() and _env.build_cuda() == "auto":
            CUDA_BUILD_ERROR = f"an earlier CUDA build failed ({failed}; delete it to retry)"
        else:
            from torch.utils import cpp_extension

            root, _ = _env.cuda_toolkit(cpp_extension.CUDA_HOME, torch.version.cuda)
            if root != cpp_extension.CUDA_HOME:  # torch compiles with its module-level CUDA_HOME
                os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = root
            os.environ.setdefault("TORCH_CUDA_ARCH_LIST", CUDA_ARCHS)
            try:
                _load(src, CPU_SOURCES + CUDA_SOURCES, cuda_dir)
                return
            except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to the CPU sources
                CUDA_BUILD_ERROR = f"the CUDA build failed: {_first_line(e)}"
                if _env.build_cuda() == "1":
                    raise RuntimeError(f"ROLI_BUILD_CUDA=1 and {CUDA_BUILD_ERROR}") from None
                failed.write_text(f"{e}\n")
                print(f"roli: {CUDA_BUILD_ERROR}; building the CPU kernels only", file=sys.stderr)
    elif _env.build_cuda() == "1":
        raise RuntimeError(f"ROLI_BUILD_CUDA=1 but the CUDA sources cannot be built: {why}")
    _load(src, CPU_SOURCES, _env.ext_dir() / f"{tag}-cpu")


BUILD_LOCK = ".roli-build.lock"  # an flock held by the roli process that builds or loads in a build folder
TORCH_BATON = "lock"  # torch's own (cpp_extension's FileBaton): a file that exists while a build runs


def _load(src: Path, names: tuple[str, ...], build_dir: Path) -> None:
    """torch's just-in-time load, one roli process at a time per build folder. torch marks a build in progress by
    the existence of a file, which a killed build (SIGKILL, SIGTERM, a closed terminal) leaves behind: every later
    load would then wait for it forever. Under roli's flock no other roli process is building there, so that file
    is a dead build's and is removed."""
    from torch.utils.cpp_extension import load

    from roli._io import lock_file

    build_dir.mkdir(parents=True, exist_ok=True)
    fd = lock_file(
        build_dir / BUILD_LOCK,
        waiting=f"roli: another process is building the C++ extension in {build_dir}: waiting for it ...",
    )
    try:
        baton = build_dir / TORCH_BATON
        if baton.is_file() and not baton.is_symlink():
            baton.unlink()
            print(f"roli: removed {baton}, left by a build that was killed", file=sys.stderr)
        if not any(build_dir.glob("*.so")):
            print("roli: building the C++ extension just in time (first use only) ...", file=sys.stderr)
        load(
            name="roli_C",
            sources=[str(src / s) for s in names],
            extra_cflags=cpu_cflags(),
            extra_ldflags=["-fopenmp"],
            extra_cuda_cflags=["-O3", "-std=c++20"],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=_env.verbose_build(),
        )
    finally:
        os.close(fd)


def _register_fakes() -> None:
    # Mutating ops with no outputs: the fake kernel only has to exist (torch.compile traces through it).
    def step_fake(x_adv, grad, x_nat, eps_t, eps, step_t, step, lo, hi):
        return None

    def keep_best_fake(best_x, best_score, x_adv, score):
        return None

    torch.library.register_fake("roli::pgd_step_linf_")(step_fake)
    torch.library.register_fake("roli::pgd_step_l2_")(step_fake)
    torch.library.register_fake("roli::keep_best_")(keep_best_fake)


def load() -> bool:
    """Load the extension if not done yet. Returns HAS_EXT."""
    global HAS_EXT, EXT_MODE, EXT_ERROR, _loaded
    if _loaded:
        return HAS_EXT
    with _lock:
        if _loaded:
            return HAS_EXT
        try:
            if _env.no_ext():
                raise RuntimeError("disabled by ROLI_NO_EXT=1")
            try:
                import roli._C  # noqa: F401

                EXT_MODE = "aot"
            except ImportError as aot_error:
                if _env.no_jit():
                    raise RuntimeError(f"roli._C not built ({aot_error}) and ROLI_NO_JIT=1") from None
                try:
                    _jit_build()
                except Exception as jit_error:  # noqa: BLE001 - any build failure becomes the recorded reason
                    raise RuntimeError(
                        f"roli._C not built ({aot_error}) and the just-in-time build failed: {_first_line(jit_error)}"
                    ) from None
                EXT_MODE = "jit"
            _register_fakes()
            HAS_EXT = True
        except RuntimeError as e:
            EXT_ERROR = str(e)
            HAS_EXT = False
        _loaded = True
    return HAS_EXT


def has_cuda_kernels() -> bool:
    return load() and torch._C._dispatch_has_kernel_for_dispatch_key("roli::pgd_step_linf_", "CUDA")


CUDA_ARCHS = "8.0;9.0+PTX"  # the default TORCH_CUDA_ARCH_LIST of both builds (setup.py and just in time)
_RUNS_ON: dict[int, str | None] = {}


def cuda_image_error(device: torch.device) -> str | None:
    """None when roli._C's CUDA kernels have an image for this GPU (probed once per device with a one-element
    launch), else why not: a binary without SASS for the GPU's architecture, nor PTX it can compile, fails
    with "no kernel image" although CUDA itself works."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _RUNS_ON:
        try:
            with torch.cuda.device(index):
                best = torch.zeros(1, 1, device=f"cuda:{index}")
                score = torch.zeros(1, device=f"cuda:{index}")
                torch.ops.roli.keep_best_(best, score.clone(), best.clone(), score)
                torch.cuda.synchronize(index)
            _RUNS_ON[index] = None
        except RuntimeError as e:
            major, minor = torch.cuda.get_device_capability(index)
            _RUNS_ON[index] = (
                f"roli._C's CUDA kernels have no image for this GPU (sm_{major}{minor}): rebuild "
                f"with TORCH_CUDA_ARCH_LIST including {major}.{minor} "
                f"({str(e).splitlines()[0][:80]})"
            )
    return _RUNS_ON[index]
