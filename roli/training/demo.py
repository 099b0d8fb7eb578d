"""The built-in default of `python -m roli.train`: a complete, real RoLI demonstration offline.

No robust checkpoint can be downloaded here, so the demonstration makes its own:
1. Adversarially pretrain a small CNN on scikit-learn's digits 0-4 (the source task; cached under
   ~/.cache/roli/demo after the first run, keyed by its configuration).
2. Transfer to digits 5-9 (the target task) with the robust backbone, and compare clean LP, ALP,
   RanLI-FT (full finetuning from a random head) and RoLI-FT (full finetuning from the ALP head).
The threat model is Linf with eps 0.1 on 8x8 digits in [0, 1] (8/255 would be a negligible budget at
that resolution). Whatever the comparison shows is printed; RoLI's gain depends on the regime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch

import roli
from roli import _env
from roli._cli import BadValue
from roli._io import lock_file, nearest_existing, save_json, save_torch
from roli.config import TrainConfig
from roli.features.cache import check_root as check_cache_root
from roli.models import read_state_dict
from roli.training.run import run

COMMON = dict(
    model="roli.models.small:small_cnn",
    dataset="digits",
    eps=0.1,
    step_size=0.025,
    steps=5,
    val_steps=10,
    batch_size=64,
    seed=0,
)


def source_backbone(epochs: int = 15) -> Path:
    """The robust source backbone (digits 0-4), trained once and cached; returns its weights file."""
    cfg = TrainConfig(method="pretrain", classes="0-4", epochs=epochs, warmup=1, lr=0.05, **COMMON)
    key = hashlib.sha256(
        json.dumps({**cfg.to_dict(), "run_dir": None, "roli": roli.__version__}, sort_keys=True).encode()
    ).hexdigest()[:16]
    base = _env.cache_root() / "demo" / key
    weights = base / "backbone.pt"
    with _training_lock(base):
        if _readable(weights):
            print(f"robust source backbone (digits 0-4): cached at {weights}")
            return weights
        print("1/3 adversarially pretraining the source backbone on digits 0-4 (cached for later runs) ...")
        work = base / "run"
        shutil.rmtree(work, ignore_errors=True)  # an interrupted earlier attempt (the lock says none is running)
        run(dataclasses.replace(cfg, run_dir=str(work)), announce=False)
        state = torch.load(work / "pretrain" / "best.pt", map_location="cpu", weights_only=True)["state_dict"]
        save_torch({k: v for k, v in state.items() if k.startswith("backbone.")}, weights)  # the backbone only
        shutil.rmtree(work, ignore_errors=True)
    return weights


@contextlib.contextmanager
def _training_lock(base: Path):
    """One process trains the source backbone; a second one started meanwhile waits for it, then finds it cached."""
    base.mkdir(parents=True, exist_ok=True)
    try:
        fd = lock_file(
            base / ".lock",
            waiting=f"another process is training the robust source backbone in {base}: waiting for it ...",
        )
    except ValueError as e:
        raise BadValue(f"demo: {e}") from None
    try:
        yield
    finally:
        os.close(fd)


def _readable(weights: Path) -> bool:
    if not weights.is_file():
        return False
    try:
        read_state_dict(weights)
        return True
    except ValueError as e:  # roli's own cache file, damaged since: made again
        print(f"the cached source backbone is unreadable ({e}): training it again")
        return False


def demo_dir(run_dir: str | None = None) -> Path:
    """The demonstration's folder, made now, before anything trains: `run_dir` when it is new or an empty folder,
    else a new runs/roli-demo-<time>[-n] (two demonstrations started in the same second get two). BadValue when it
    cannot be made."""
    if run_dir is not None:
        path = Path(run_dir)
        try:
            taken = path.is_symlink() or path.exists() and (not path.is_dir() or any(path.iterdir()))
        except OSError as e:  # a name too long, a folder that cannot be read
            raise BadValue(f"demo: cannot create {path} ({e.strerror}); give another folder") from None
        if taken:
            raise BadValue(f"demo: {path} exists and is not an empty folder; give a new one")
        return _made(path, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        path = Path("runs") / (f"roli-demo-{stamp}" if n == 1 else f"roli-demo-{stamp}-{n}")
        if not path.exists() and not path.is_symlink():
            try:
                return _made(path, exist_ok=False)
            except BadValue:
                if not path.exists():  # anything but a folder made meanwhile by another demonstration
                    raise
    raise BadValue(f"demo: runs/roli-demo-{stamp}-1..999 all exist; move some away")


def _made(path: Path, exist_ok: bool) -> Path:
    base = nearest_existing(path.parent)
    if not base.is_dir():
        raise BadValue(f"demo: cannot create {path}: {base} is a file, not a folder; run it from another directory")
    try:
        path.mkdir(parents=True, exist_ok=exist_ok)
    except OSError as e:
        raise BadValue(f"demo: cannot create {path} ({e.strerror}); run it from a writable directory") from None
    return path


def run_demo(run_dir: str | None = None, epochs: int = 10, source_epochs: int = 15) -> dict:
    t0 = time.time()
    try:
        check_cache_root(_env.cache_root() / "demo")
    except ValueError as e:
        raise BadValue(f"demo: {e}") from None
    run_dir = demo_dir(run_dir)
    weights = source_backbone(source_epochs)
    target = dict(COMMON, classes="5-9", checkpoint=str(weights))
    print("2/3 clean linear probing on digits 5-9 (through the feature cache) ...")
    lp = run(
        TrainConfig(method="lp", epochs=30, warmup=0, lr=0.1, weight_decay=0.0, run_dir=str(run_dir / "lp"), **target)
    )
    print("3/3 ALP, then RoLI-FT (from the ALP head) and RanLI-FT (from a random head) on digits 5-9 ...")
    roli_runs = run(
        TrainConfig(
            method="roli",
            compare_ranli=True,
            epochs=epochs,
            warmup=1,
            alp_lr=0.05,
            lr=2e-4,
            ranli_lr=1e-3,
            weight_decay=0.01,
            run_dir=str(run_dir / "roli"),
            **target,
        )
    )
    rows = {
        "clean LP": lp["lp"],
        "ALP": roli_runs["alp"],
        "RanLI-FT (full)": roli_runs["RanLI-full"],
        "RoLI-FT (full)": roli_runs["RoLI-full"],
    }
    lines = ["", f"RoLI demonstration: robust small CNN pretrained on digits 0-4, transferred to digits 5-9 "
             f"(test set, Linf eps 0.1, PGD-10); {time.time() - t0:.0f} s", "",
             "| method | clean acc | PGD-10 acc |", "|---|---|---|"]  # fmt: skip
    for name, r in rows.items():
        lines.append(f"| {name} | {100 * r['test']['clean']:.2f}% | {100 * r['test']['pgd10']:.2f}% |")
    gain = rows["RoLI-FT (full)"]["test"]["pgd10"] - rows["RanLI-FT (full)"]["test"]["pgd10"]
    lines.append(
        f"\nRoLI vs RanLI: {100 * gain:+.2f} PGD points on this run"
        + (" (no gain in this regime)" if gain <= 0 else "")
    )
    table = "\n".join(lines)
    print(table)
    summary = {name: r["test"] for name, r in rows.items()}
    save_json({"table": table, "results": summary, "seconds": round(time.time() - t0, 1)}, run_dir / "demo.json")
    print(
        f"\nwritten: {run_dir} (demo.json; the runs {run_dir / 'lp'} and {run_dir / 'roli'}). Next: "
        f"roli evaluate --run {run_dir / 'roli'}; roli report {run_dir / 'lp'} {run_dir / 'roli'}"
    )
    return summary
