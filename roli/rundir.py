"""The run directory: what roli writes there (and so may delete), its lock, and the fingerprint that tells a
resumed or evaluated run from a changed one.

- roli records every file it writes in the run's manifest (roli._io: path, size, sha256, as it writes it), and
  writes only names in OUTPUTS. `--overwrite` deletes the manifest's files whose content still matches what
  roli wrote and nothing else: a user's file, a file edited since, a symlink stay; a directory holding an input
  of the new run (checkpoint, head, data, config) is refused before anything is deleted. A run of an earlier
  roli (no manifest) is cleared by OUTPUTS' names, as then.
- A new run directory is created whole: its marker, manifest, config.json and fingerprint.json are written in
  a temporary sibling (".<name>.roli-new-<random>") that is then renamed into place, so a kill while starting
  leaves nothing under the run's name (the sibling is removed by the next start).
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
import glob
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
import uuid
from pathlib import Path

import torch

from roli._cli import BadValue
from roli._io import (
    MANIFEST,
    RUN_MARKER,
    file_sha256,
    manifest,
    nearest_existing,
    plain_file,
    remove_stale_temporaries,
    save_json,
    umask,
)

log = logging.getLogger("roli.train")

MARKER = RUN_MARKER  # written into every run directory roli creates: --overwrite and --resume need it
LOCK = ".roli-lock"
FINGERPRINT = "fingerprint.json"
STAGES = ("pretrain", "lp", "alp", "ft", "roli-ft", "ranli-ft")
# Relative paths (fnmatch patterns) of everything roli writes into a run directory.
OUTPUTS = (
    MARKER, LOCK, MANIFEST, FINGERPRINT, "config.json", "labels.json", "results.json", "train.log", "tracking.json",
    *(f"{s}/{name}" for s in STAGES
      for name in ("best.pt", "last.pt", "metrics.jsonl", "metrics.csv", "curves.png", "done.json")),
    "tensorboard/events.out.tfevents.*",  # --log tensorboard; --log wandb: Weights & Biases' own tree
    *("wandb/" + "/".join(["*"] * depth) for depth in range(1, 7)),
    *(f"{s}/evaluations/*.json" for s in STAGES),
    *(f"autoattack/{s}/batch*.pt" for s in STAGES),
)  # fmt: skip


def _temporary(name: str) -> bool:
    return name.startswith(".") and name.endswith(".tmp") and name.count(".") >= 3


def written_by_roli(rel: str) -> bool:
    """A path (relative to the run directory, '/'-separated) that roli writes, or one of atomic_write's
    temporaries next to such a file (".<name>.<random>.tmp")."""
    parent, _, name = rel.rpartition("/")
    if _temporary(name):
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
    """Delete what roli wrote in run_dir: the manifest's files whose content still matches (by OUTPUTS'
    names for a run of an earlier roli, without a manifest). Returns the files it kept, with why."""
    entries = manifest(run_dir)
    if entries is None:
        log.info("--overwrite: %s has no %s (a run of an earlier roli): its files are known by name", run_dir, MANIFEST)
        return _remove_by_name(run_dir)  # the marker stays: open_run_dir makes it this roli's
    written = _written(entries)
    grown = {e["grown"] for e in entries if isinstance(e.get("grown"), str)}
    removed, changed_since = [], []
    for rel in sorted(written) + sorted(grown - set(written)):
        if rel == MARKER or not plain_file(run_dir, rel):
            continue
        path = run_dir / rel
        if rel in written and not _as_written(path, written[rel]):
            changed_since.append(rel)
            continue
        path.unlink()
        removed.append(rel)
    for tree in sorted({e["tree"] for e in entries if isinstance(e.get("tree"), str)}):
        if not plain_file(run_dir, tree, stat.S_IFDIR):
            continue
        for root, dirs, files in os.walk(run_dir / tree, followlinks=False):
            for name in files + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
                os.unlink(os.path.join(root, name))  # a link itself, never what it points to
                removed.append(Path(root, name).relative_to(run_dir).as_posix())
    folders = {parent for rel in removed for parent in Path(rel).parents if parent != Path(".")}
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):  # deepest first
        path = run_dir / folder
        if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
            path.rmdir()
    _restart_manifest(run_dir)
    kept = [
        p.relative_to(run_dir).as_posix() for p in sorted(run_dir.rglob("*"))
        if (p.is_file() or p.is_symlink()) and p.name not in (MARKER, LOCK, MANIFEST)
    ]  # fmt: skip
    return [f"{k} (changed since roli wrote it)" if k in changed_since else k for k in kept]


MARKER_FORMAT = "roli run 2"  # a run with a manifest; a marker without "format" is of an earlier roli


def _written(entries: list[dict]) -> dict[str, set]:
    """{path: {(size, sha256), ...}}: every content roli recorded for each file it wrote."""
    written: dict[str, set] = {}
    for e in entries:
        if isinstance(e.get("file"), str):
            written.setdefault(e["file"], set()).add((e.get("size"), e.get("sha256")))
    return written


def _as_written(path: Path, recorded: set) -> bool:
    """The file's content is one roli recorded (sizes compared first: no hash of a file of another size)."""
    size = os.lstat(path).st_size
    return any(size == n for n, _ in recorded) and (size, file_sha256(path)) in recorded


def not_as_written(
    run_dir: Path, only: tuple[str, ...] | None = None, unread: tuple[str, ...] = ()
) -> list[str] | None:
    """roli's files in run_dir that are not what roli wrote there, in words: edited or replaced (content not in
    the manifest), copied in (a name roli writes, never written here), or config.json/fingerprint.json gone.
    `only`: just these paths; `unread`: file names not checked. None for a run of an earlier roli (no manifest,
    an old marker)."""
    entries = manifest(run_dir)
    if entries is None:
        try:
            fmt = json.loads((run_dir / MARKER).read_text()).get("format")
        except (OSError, ValueError, AttributeError):
            fmt = None
        return [f"its manifest {MANIFEST} is missing"] if fmt == MARKER_FORMAT else None
    written = _written(entries)
    skip = {LOCK, MANIFEST} | {e.get("grown") for e in entries}  # atomic_write's temporaries: by _temporary
    trees = tuple(e["tree"] + "/" for e in entries if isinstance(e.get("tree"), str))
    out = []
    for root, _, files in os.walk(run_dir, followlinks=False):
        for name in files:
            rel = Path(root, name).relative_to(run_dir).as_posix()
            if rel in skip or rel.startswith(trees) or (only is not None and rel not in only) or name in unread:
                continue
            if _temporary(name):
                continue  # never read: a start removes roli's
            if rel in written:
                if not _as_written(run_dir / rel, written[rel]):
                    out.append(f"{rel} is not the file roli wrote there (edited or replaced)")
            elif written_by_roli(rel):
                out.append(f"{rel} was not written by this run (copied in?)")
    for rel in ("config.json", FINGERPRINT):
        if rel in written and not (run_dir / rel).exists() and (only is None or rel in only):
            out.append(f"{rel} is missing (deleted?)")
    return sorted(out)


def run_identity(run_dir: Path) -> str | None:
    """The identity in a run's marker (a random id made when the run was created), or None (an earlier roli's run,
    or no run)."""
    try:
        ident = json.loads((run_dir / MARKER).read_text()).get("run")
    except (OSError, ValueError, AttributeError):
        return None
    return ident if isinstance(ident, str) else None


def check_written_here(written_under, run_dir: Path, path: Path, what: str) -> None:
    """Refuse a best.pt / last.pt whose recorded run identity is another run's (a file copied in)."""
    here = run_identity(run_dir)
    if isinstance(written_under, str) and here is not None and written_under != here:
        raise BadValue(
            f"{what}: {path} was written by another run (copied in?), not by the run in {run_dir}; move it away"
        )


def check_links(run_dir: Path) -> None:
    links = foreign_links(run_dir)
    if links:
        raise BadValue(
            f"run directory {run_dir} holds a symlink roli did not make ({links[0]}): roli would write or delete "
            "through it; remove it, or choose another --run-dir"
        )


REGENERATED = ("tracking.json", "curves.png", "metrics.csv")  # never read back for a figure: --resume rewrites them


def check_as_written(
    run_dir: Path, what: str, advice: str, only: tuple[str, ...] | None = None, regenerated: bool = False
) -> None:
    """Refuse (one line) a run holding a symlink, or whose files roli would read or replace are not those it
    wrote (not_as_written); `regenerated`: files roli never reads back (REGENERATED) are not checked."""
    check_links(run_dir)
    found = not_as_written(run_dir, only, REGENERATED if regenerated else ())
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise BadValue(f"{what}: in {run_dir}, {found[0]}{more}; {advice}")


def _restart_manifest(run_dir: Path) -> None:
    """After --overwrite cleared the run: a manifest naming only the marker (written whole, then renamed)."""
    marker = run_dir / MARKER
    entry = (
        {"file": MARKER, "size": marker.stat().st_size, "sha256": file_sha256(marker)}
        if plain_file(run_dir, MARKER)
        else {}
    )
    tmp = run_dir / (MANIFEST + ".new")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode() if entry else b"")
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, run_dir / MANIFEST)


def _remove_by_name(run_dir: Path) -> list[str]:
    kept = []
    for path in sorted(run_dir.rglob("*"), reverse=True):  # files before their folders
        rel = path.relative_to(run_dir).as_posix()
        if path.is_dir() and not path.is_symlink():
            if not any(path.iterdir()):
                path.rmdir()
        elif written_by_roli(rel) and rel not in (LOCK, MARKER):
            path.unlink()
        elif rel not in (LOCK, MARKER):
            kept.append(rel)
    return sorted(kept)


class RunLock:
    """An exclusive lock on a run directory for this process (see the module docstring)."""

    def __init__(self, run_dir: Path, purpose: str, what: str = "run directory"):
        self.path, self.purpose, self.fd, self.what = Path(run_dir) / LOCK, purpose, None, what

    def acquire(self) -> RunLock:
        import fcntl

        try:  # never through a symlink (a link to a user's file would be emptied), never a directory
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            what = "a symlink" if self.path.is_symlink() else "a directory" if self.path.is_dir() else e.strerror
            raise BadValue(
                f"{self.what} {self.path.parent}: its lock {LOCK} is {what}, not roli's lock file; move it away"
            ) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise BadValue(f"{self.what} {self.path.parent}: its lock {LOCK} is not a plain file; move it away")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                other = "--run-dir" if self.what == "run directory" else "--out"
                raise BadValue(
                    f"{self.what} {self.path.parent} is in use ({holder}); wait for it to finish, or use another "
                    f"{other}"
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
EXECUTION = {"device", "workers", "channels_last", "compile", "cuda_graph", "download", "autoattack", "run_dir", "log",
             "data_hash"}  # fmt: skip
# Options added after fingerprint format 1, with their defaults: in the digest only when set to something else,
# so a run written before they existed (its config.json reads back with the default) keeps its fingerprint.
ADDED_OPTIONS = {
    "peft_init": "standard",
    "lr_batch": None,
    "select_by": "pgd",
    "record_order": "file",
    "n_ex": None,
    "accumulate": 1,
    "attack_precision": None,
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


def data_fingerprint(name: str, data, content: str | None = None) -> dict:
    """Sizes, a hash of the labels and of a sample of 64 images (arrays), or of the file list with sizes; with
    `content` ("full" or "stat", roli's --data-hash), the hash of all of it (data.content_digest)."""
    parts = {part: _digest(*v) for part, v in data.sample_parts().items()}
    if content is not None:
        parts["content"] = data.content_digest(content)
    return {name: {"n": len(data), **parts}}


def settings(options: dict) -> dict:
    """The options that decide what a run computes: config.json's, how it executes aside (EXECUTION), options
    added later at their defaults dropped (ADDED_OPTIONS)."""
    return without_added_defaults({k: v for k, v in options.items() if k not in EXECUTION})


def fingerprint(options: dict, splits, classes=None, inputs: dict[str, Path] | None = None) -> dict:
    """A run's fingerprint: its options (config.json's, execution settings aside), the class count and names,
    each split's data_fingerprint with the hash of all its content (options' data_hash), and the sha256 of each
    input file in `inputs` ({flag: path}: the backbone checkpoint, the --init head, the config file)."""
    train, val, test, num_classes = splits
    mode = options.get("data_hash") or "full"
    out = {"options": _digest(settings(options)), "num_classes": num_classes, "classes": _digest(classes)}
    if getattr(train, "source_classes", None) is not None:  # what a roli before 2026-12-06 recorded as the names
        out["classes_before_subset"] = _digest(train.source_classes)
    for name, d in (("train", train), ("val", val), ("test", test)):
        out |= data_fingerprint(name, d, mode)
    hashed = {flag: file_sha256(p) for flag, p in (inputs or {}).items() if Path(p).is_file()}
    if hashed:
        out["inputs"] = hashed
    return out


def hash_note(splits, mode: str, seconds: float) -> str | None:
    """What hashing image files for the fingerprint took, for the log (None for array data)."""
    files = sum(len(d) for d in splits[:3] if getattr(d, "streamed", False))
    if not files:
        return None
    how = "every file's bytes" if mode == "full" else "sizes and mtimes only (--data-hash stat)"
    return f"data fingerprint: {files} image files, {how}, in {seconds:.1f} s"


def changed(saved: dict, now: dict) -> list[str]:
    """What differs between two fingerprints, in words."""
    words = {
        "options": "the settings in config.json",
        "num_classes": "the number of classes",
        "classes": "the class names (labels.json)",
    }
    out = []
    for key in saved:  # what both hold: a run of an earlier roli has fewer parts; evaluate reads no checkpoint
        if key in ("train", "val", "test"):
            for part, v in saved[key].items():
                if part in now.get(key, {}) and now[key][part] != v:
                    what = {"n": "size", "pixels": "images", "content": "images"}.get(part, part)
                    out.append(f"the {key} split's {what}")
        elif key == "inputs" and isinstance(saved[key], dict):
            for flag, sha in saved[key].items():
                if flag in now.get("inputs", {}) and now["inputs"][flag] != sha:
                    out.append(f"the file of {flag} (its sha256)")
        elif key == "classes_before_subset" or key == "classes" and saved[key] == now.get("classes_before_subset"):
            continue  # an earlier roli recorded a class subset of array data with the whole dataset's names
        elif key in now and now[key] != saved[key]:
            out.append(words.get(key, key))
    return list(dict.fromkeys(out))  # a sample and the whole content changed: said once


def write_fingerprint(run_dir: Path, fp: dict) -> None:
    save_json({"format": "roli run fingerprint 2", **fp}, run_dir / FINGERPRINT)


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
            raise ValueError  # said below
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


def check_not_dangling(path: Path, what: str, flag: str) -> None:
    """A symlink given as a folder must lead somewhere: roli creates nothing at a dangling link's target."""
    if path.is_symlink() and not path.exists():
        raise BadValue(
            f"{what} {path} is a symlink to {os.readlink(path)}, which does not exist; create that folder or give "
            f"another {flag}"
        )


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool, inputs: dict[str, Path] | None = None) -> None:
    """Everything about the run directory that can be wrong, before anything is written."""
    check_not_dangling(run_dir, "run directory", "--run-dir")
    if run_dir.exists() and not run_dir.is_dir():
        raise BadValue(f"run directory {run_dir} is a file; choose another --run-dir")
    base = nearest_existing(run_dir.resolve())
    if not base.is_dir():
        raise BadValue(f"run directory {run_dir}: {base} is a file, not a directory; choose another --run-dir")
    if not os.access(base, os.W_OK | os.X_OK):
        raise BadValue(f"run directory {run_dir}: {base} is not writable; choose another --run-dir")
    if run_dir.is_dir() and (resume or overwrite):
        check_links(run_dir)
    if resume:
        if not (run_dir / MARKER).is_file():
            raise BadValue(
                f"resume: {run_dir} was not written by roli (it has no {MARKER} marker); roli resumes only its own runs"
            )
        check_as_written(
            run_dir,
            "resume",
            "put back the file roli wrote, or move it away and start over with --overwrite",
            regenerated=True,
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
        check_as_written(run_dir, "--overwrite", "--overwrite replaces only the files roli wrote: move it away first")


STAGING = ".roli-new-"  # a new run directory is written as ".<name>.roli-new-<random>" beside it, then renamed


def open_run_dir(run_dir: Path, resume: bool, overwrite: bool, purpose: str, first) -> RunLock:
    """Take the run directory for this process and write its first files: returns the held lock.

    A new directory is created whole: marker, manifest and what first(folder) writes (config.json,
    fingerprint.json) go into a locked temporary sibling that is renamed into place, so a kill leaves either
    nothing under the run's name or a run that --resume (or --overwrite) accepts. --overwrite clears roli's
    files (remove_outputs) under the lock; --resume keeps them; both then call first(run_dir)."""
    if run_dir.is_dir() and (run_dir / MARKER).is_file():
        lock = RunLock(run_dir, purpose).acquire()  # before --overwrite deletes anything: no one else uses it
        try:
            if overwrite and not resume:
                earlier = manifest(run_dir) is None
                kept = remove_outputs(run_dir)
                if earlier:  # one of this roli's runs from here on: a marker with an identity, a manifest
                    save_json(new_marker(), run_dir / MARKER)
                if kept:
                    log.warning(
                        "--overwrite: kept %d file(s) roli did not write in %s: %s",
                        len(kept),
                        run_dir,
                        ", ".join(kept[:5]) + (" ..." if len(kept) > 5 else ""),
                    )
            remove_stale_temporaries(run_dir, written_by_roli)  # left by a process killed while writing
            first(run_dir)
        except BaseException:
            lock.release()
            raise
        return lock
    return create_whole(run_dir, MARKER, new_marker(), purpose, first)


def new_marker() -> dict:
    """A run directory's marker, with a new identity."""
    return {
        "format": MARKER_FORMAT,
        "run": uuid.uuid4().hex,  # this run's identity: every best.pt and last.pt it writes carries it
        "created_by": "roli train",
        "note": "roli deletes (--overwrite) and resumes only directories holding this file, and only the files "
        f"it wrote there (listed in {MANIFEST})",
    }


def create_whole(folder: Path, marker: str, payload: dict, purpose: str, first, what: str = "run directory") -> RunLock:
    """Create `folder` whole: its marker (holding `payload`) and what first(tmp) writes go into a locked temporary
    sibling, renamed into place at the end; a start killed before leaves nothing under the folder's name (its
    sibling is removed by the next start). Returns the held lock. A symlink to an empty folder: created there."""
    folder = folder.resolve() if folder.is_symlink() else folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(folder)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}{STAGING}"))
    os.chmod(staging, 0o777 & ~umask())
    lock = RunLock(staging, purpose, what).acquire()  # the lock stays on the file through the rename
    try:
        save_json(payload, staging / marker)
        first(staging)
        try:
            os.rename(staging, folder)  # onto nothing, or onto an empty directory
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            flag = "--run-dir" if what == "run directory" else "--out"
            raise BadValue(
                f"{what} {folder} was filled by another process while this one started; choose another {flag}"
            ) from None
        lock.path = folder / LOCK
    except BaseException as e:
        lock.release()
        _remove_staging(staging)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC and e.filename:  # named as the user knows it
            raise OSError(errno.ENOSPC, e.strerror, str(folder / Path(e.filename).name)) from None
        raise
    return lock


def _remove_staging(staging: Path) -> bool:
    """Remove a start's temporary sibling: only roli's files in it (by its manifest); True when it is gone."""
    if staging.is_symlink() or not staging.is_dir():
        return False
    remove_stale_temporaries(staging)
    if remove_outputs(staging):
        return False
    for name in (MARKER, MANIFEST, LOCK):
        if plain_file(staging, name):
            (staging / name).unlink()
    try:
        staging.rmdir()
    except OSError:
        return False
    return True


def _remove_stale_staging(run_dir: Path) -> None:
    """Temporary siblings of run_dir left by a start that was killed (none is in use: each is locked)."""
    for staging in run_dir.parent.glob(f".{glob.escape(run_dir.name)}{STAGING}*"):
        if staging.is_symlink() or not plain_file(staging, MANIFEST):
            continue  # roli's start writes its manifest first
        try:
            lock = RunLock(staging, "removing a killed start").acquire()
        except BadValue:
            continue  # another process is starting this run right now
        lock.release()
        if _remove_staging(staging):
            log.info("removed %s, left by a start of %s that was killed", staging.name, run_dir)


def disk_full(e: OSError, run_dir: Path) -> BadValue | None:
    """ENOSPC as one line naming the directory."""
    if e.errno != errno.ENOSPC:
        return None
    free = shutil.disk_usage(nearest_existing(run_dir.resolve())).free
    then = f"continue with --resume {run_dir}" if (run_dir / MARKER).is_file() else "run the same command again"
    return BadValue(
        f"disk full while writing into {run_dir} ({free / 2**20:.0f} MiB free): free space there and {then}"
    )
