"""The run directory: what roli writes there (and so may delete), its lock, and the fingerprint that tells a
resumed or evaluated run from a changed one.

- roli writes only the names in OUTPUTS (and atomic_write's temporaries next to them). `--overwrite` deletes
  those and nothing else: a user's file in the directory stays, and a directory holding an input of the new
  run (checkpoint, head, data, config) is refused before anything is deleted.
- A process that trains in or evaluates a run holds an exclusive lock (fcntl.flock on RUN_DIR/.roli-lock, with
  its pid inside): a second trainer or `evaluate --run` is refused in one line. The kernel drops the lock when
  the process ends, however it ends; a lock file left by a process that is gone is taken over with a log line.
- fingerprint.json, written with config.json: a hash of the options that decide what the run computes, and of
  the data (split sizes, the labels, a sample of the pixels or the file list with sizes, the class names).
  `--resume` and `evaluate --run` recompute it and refuse, naming what changed.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import stat
from pathlib import Path

import torch

from roli._cli import BadValue
from roli._io import remove_stale_temporaries, save_json

log = logging.getLogger("roli.train")

MARKER = ".roli-run"  # written into every run directory roli creates: --overwrite and --resume need it
LOCK = ".roli-lock"
FINGERPRINT = "fingerprint.json"
STAGES = ("pretrain", "lp", "alp", "ft", "roli-ft", "ranli-ft")
# Relative paths (fnmatch patterns) of everything roli writes into a run directory.
OUTPUTS = (
    MARKER, LOCK, FINGERPRINT, "config.json", "labels.json", "results.json", "train.log", "tracking.json",
    *(f"{s}/{name}" for s in STAGES
      for name in ("best.pt", "last.pt", "metrics.jsonl", "metrics.csv", "curves.png", "done.json")),
    "tensorboard/events.out.tfevents.*",  # --log tensorboard; --log wandb: Weights & Biases' own tree
    *("wandb/" + "/".join(["*"] * depth) for depth in range(1, 7)),
    *(f"{s}/evaluations/*.json" for s in STAGES),
    *(f"autoattack/{s}/batch*.pt" for s in STAGES),
)  # fmt: skip


def written_by_roli(rel: str) -> bool:
    """A path (relative to the run directory, '/'-separated) that roli writes, or one of atomic_write's
    temporaries next to such a file (".<name>.<random>.tmp")."""
    parent, _, name = rel.rpartition("/")
    if name.startswith(".") and name.endswith(".tmp") and name.count(".") >= 3:
        target = name[1:].rsplit(".", 2)[0]
        rel = f"{parent}/{target}" if parent else target
    parts = rel.split("/")
    return any(
        len(pattern.split("/")) == len(parts)  # component by component: a * never matches across a '/'
        and all(fnmatch.fnmatchcase(part, p) for part, p in zip(parts, pattern.split("/"), strict=True))
        for pattern in OUTPUTS
    )


def foreign_links(run_dir: Path) -> list[str]:
    """Symlinks inside a run directory (roli makes none): writing or deleting through one would reach files
    outside the run. Relative paths; the tree is walked without following links."""
    found = []
    for root, dirs, files in os.walk(run_dir, followlinks=False):
        for name in dirs + files:
            if os.path.islink(os.path.join(root, name)):
                found.append(Path(root, name).relative_to(run_dir).as_posix())
    return sorted(found)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def check_overwrite(run_dir: Path, inputs: dict[str, Path]) -> None:
    """--overwrite deletes roli's outputs in run_dir: refused when an input of the new run lies inside it."""
    for flag, path in inputs.items():
        if _inside(path, run_dir):
            raise BadValue(
                f"--overwrite: {flag} {path} lies inside the run directory {run_dir}, whose contents "
                "--overwrite replaces; move it out first (or choose another --run-dir)"
            )


def remove_outputs(run_dir: Path) -> list[str]:
    """Delete what roli wrote in run_dir (OUTPUTS); returns the files it kept (not roli's)."""
    kept = []
    for path in sorted(run_dir.rglob("*"), reverse=True):  # files before their folders
        rel = path.relative_to(run_dir).as_posix()
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        elif written_by_roli(rel) and rel != LOCK:
            path.unlink()
        elif rel != LOCK:
            kept.append(rel)
    return sorted(kept)


class RunLock:
    """An exclusive lock on a run directory for this process (see the module docstring)."""

    def __init__(self, run_dir: Path, purpose: str):
        self.path, self.purpose, self.fd = Path(run_dir) / LOCK, purpose, None

    def acquire(self) -> RunLock:
        import fcntl

        try:  # never through a symlink (a link to a user's file would be emptied), never a directory
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            what = "a symlink" if self.path.is_symlink() else "a directory" if self.path.is_dir() else e.strerror
            raise BadValue(
                f"run directory {self.path.parent}: its lock {LOCK} is {what}, not roli's lock file; move it away"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise BadValue(f"run directory {self.path.parent}: its lock {LOCK} is not a plain file; move it away")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise BadValue(
                    f"run directory {self.path.parent} is in use ({holder}); wait for it to finish, or "
                    "use another --run-dir"
                ) from None
            raise
        before = os.read(fd, 200).decode(errors="replace").strip()
        if before:
            log.info("run directory %s: took over the lock left by %s (no longer running)", self.path.parent, before)
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, f"pid {os.getpid()}: {self.purpose}".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # a clean end leaves no holder behind
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# What --resume and evaluate --run compare: the options that decide what a run computes (config.json minus how
# it executes), and the data.
EXECUTION = {"device", "workers", "channels_last", "compile", "cuda_graph", "download", "autoattack", "run_dir", "log"}
# Options added after fingerprint format 1, with their defaults: in the digest only when set to something else,
# so a run written before they existed (its config.json reads back with the default) keeps its fingerprint.
ADDED_OPTIONS = {
    "peft_init": "standard",
    "lr_batch": None,
    "select_by": "pgd",
    "record_order": "file",
    "n_ex": None,
    "accumulate": 1,
}


def without_added_defaults(options: dict) -> dict:
    """`options` less those added after a digest's format was fixed that still hold their defaults (ADDED_OPTIONS):
    the run fingerprint's and the grid's ALP key's digests stay those of the runs written before they existed."""
    return {k: v for k, v in options.items() if not (k in ADDED_OPTIONS and v == ADDED_OPTIONS[k])}


def stage_dir(label: str) -> str:
    """The folder of a stage inside a run directory, from its label in results.json."""
    if label in ("pretrain", "lp", "alp"):
        return label
    return "roli-ft" if label.startswith("RoLI-") else "ranli-ft" if label.startswith("RanLI-") else "ft"


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def data_fingerprint(name: str, data) -> dict:
    """Sizes, a hash of the labels and of a sample of 64 images (arrays), or of the file list with sizes."""
    return {name: {"n": len(data), **{part: _digest(*v) for part, v in data.sample_parts().items()}}}


def fingerprint(options: dict, splits, classes=None) -> dict:
    """A run's fingerprint: its options (config.json's, execution settings aside), the class count and names,
    and each split's data_fingerprint."""
    train, val, test, num_classes = splits
    options = without_added_defaults({k: v for k, v in options.items() if k not in EXECUTION})
    out = {"options": _digest(options), "num_classes": num_classes, "classes": _digest(classes)}
    for name, d in (("train", train), ("val", val), ("test", test)):
        out |= data_fingerprint(name, d)
    return out


def changed(saved: dict, now: dict) -> list[str]:
    """What differs between two fingerprints, in words."""
    words = {
        "options": "the settings in config.json",
        "num_classes": "the number of classes",
        "classes": "the class names (labels.json)",
    }
    out = []
    for key in saved:
        if key in ("train", "val", "test"):
            for part, v in saved[key].items():
                if now.get(key, {}).get(part) != v:
                    what = {"n": "size", "labels": "labels", "pixels": "images", "files": "files"}[part]
                    out.append(f"the {key} split's {what}")
        elif now.get(key) != saved[key]:
            out.append(words.get(key, key))
    return out


def write_fingerprint(run_dir: Path, fp: dict) -> None:
    save_json({"format": "roli run fingerprint 1", **fp}, run_dir / FINGERPRINT)


def check_fingerprint(run_dir: Path, fp: dict, what: str, allow_flag: str | None = None) -> list[str]:
    """Compare with the run's fingerprint.json: raise naming what changed (or, with allow_flag given as
    allowed, return the list). A run written before fingerprints existed is not checked (a log line)."""
    path = run_dir / FINGERPRINT
    if not path.is_file():
        log.info("%s: %s has no %s (a run of an earlier roli): its data is not checked", what, run_dir, FINGERPRINT)
        return []
    try:
        saved = json.loads(path.read_text())
        saved.pop("format")
        parts = ("train", "val", "test")
        if not all(isinstance(saved.get(k), dict) for k in parts) or "options" not in saved:
            raise ValueError("missing or malformed parts")
    except (ValueError, KeyError, OSError, AttributeError, TypeError):
        raise BadValue(f"{what}: {path} is damaged; the run cannot be checked") from None
    diff = changed(saved, fp)
    if diff and allow_flag != "allowed":
        hint = f" ({allow_flag} to evaluate anyway, recorded in the results)" if allow_flag else ""
        raise BadValue(
            f"{what}: {', '.join(diff)} changed since the run started in {run_dir}; start a new run "
            f"for changed data or settings{hint}"
        )
    return diff


def nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool, inputs: dict[str, Path] | None = None) -> None:
    """Everything about the run directory that can be wrong, before anything is written."""
    if run_dir.exists() and not run_dir.is_dir():
        raise BadValue(f"run directory {run_dir} is a file; choose another --run-dir")
    base = nearest_existing(run_dir.resolve())
    if not base.is_dir():
        raise BadValue(f"run directory {run_dir}: {base} is a file, not a directory; choose another --run-dir")
    if not os.access(base, os.W_OK | os.X_OK):
        raise BadValue(f"run directory {run_dir}: {base} is not writable; choose another --run-dir")
    links = foreign_links(run_dir) if run_dir.is_dir() and (resume or overwrite) else []
    if links:
        raise BadValue(
            f"run directory {run_dir} holds a symlink roli did not make ({links[0]}): roli would write or delete "
            "through it; remove it, or choose another --run-dir"
        )
    if resume:
        if not (run_dir / MARKER).is_file():
            raise BadValue(
                f"resume: {run_dir} was not written by roli (it has no {MARKER} marker); roli resumes only its own runs"
            )
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise BadValue(
                f"run directory {run_dir} is not empty; pass --resume {run_dir} to continue it or "
                "--overwrite to start over"
            )
        if not (run_dir / MARKER).is_file():
            raise BadValue(
                f"--overwrite: {run_dir} was not written by roli (it has no {MARKER} marker), and roli "
                "deletes only what it wrote; choose another --run-dir"
            )
        check_overwrite(run_dir, inputs or {})


def prepare_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create the run directory (or clear roli's outputs from it with --overwrite) and mark it as roli's."""
    if overwrite and not resume and run_dir.exists() and (run_dir / MARKER).is_file():
        kept = remove_outputs(run_dir)
        if kept:
            log.warning(
                "--overwrite: kept %d file(s) roli did not write in %s: %s",
                len(kept),
                run_dir,
                ", ".join(kept[:5]) + (" ..." if len(kept) > 5 else ""),
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(run_dir, written_by_roli)  # left by a process killed while writing a checkpoint
    if not (run_dir / MARKER).exists():
        save_json(
            {
                "created_by": "roli train",
                "note": "roli deletes (--overwrite) and resumes only directories "
                "holding this file, and only the files it wrote there",
            },
            run_dir / MARKER,
        )


def disk_full(e: OSError, run_dir: Path) -> BadValue | None:
    """ENOSPC as one line naming the directory."""
    if e.errno != errno.ENOSPC:
        return None
    free = shutil.disk_usage(nearest_existing(run_dir.resolve())).free
    return BadValue(
        f"disk full while writing into {run_dir} ({free / 2**20:.0f} MiB free): free space there and "
        f"continue with --resume {run_dir}"
    )
