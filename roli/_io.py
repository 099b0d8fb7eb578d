"""Atomic file writes: a temporary file in the target folder, then a rename. A run killed mid-write
leaves the previous file (if any) in place and no half-written file under the target name; its
temporary file (".<name>.<random>.tmp") is removed by remove_stale_temporaries when the run starts or
resumes. Written files are fsynced and get the ordinary mode of the user's umask (not mkstemp's 0600).

The manifest: a folder roli made (a run directory, holding RUN_MARKER; a grid's --out, holding GRID_MARKER)
records every file roli writes into it, as it writes it, in MANIFEST (JSON lines, appended and fsynced):
{"tmp": rel} before a temporary is filled, {"file": rel, "size": n, "sha256": h} before it is renamed into place,
{"grown": rel} for a file a tracker appends to, {"tree": rel} for a folder a tracker library fills. --overwrite
deletes exactly the recorded files whose content still matches (rundir.remove_outputs), and a start removes
exactly the recorded temporaries: never a file roli did not write, whatever its name."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

TMP_SUFFIX = ".tmp"
FULL_BELOW = 64 << 20  # a write that failed with less free space than this failed for want of space
RUN_MARKER = ".roli-run"  # in every run directory roli creates
GRID_MARKER = ".roli-grid"  # in every grid --out folder roli creates
MANIFEST = ".roli-manifest.jsonl"
_MARKERS = (RUN_MARKER, GRID_MARKER)
_DEPTH = 4  # run dir / stage / evaluations / file: the deepest file roli writes through atomic_write


def owner(path: str | Path) -> Path | None:
    """The folder roli made that `path` lies in (the nearest ancestor holding a marker), or None. A marker
    being written makes its own folder the owner."""
    path = Path(path)
    if path.name in _MARKERS:
        return path.parent
    folder = path.parent
    for _ in range(_DEPTH):
        if any(os.path.isfile(folder / m) and not os.path.islink(folder / m) for m in _MARKERS):
            return folder
        if folder == folder.parent:
            break
        folder = folder.parent
    return None


def record(folder: Path, entry: dict) -> None:
    """Append one entry to folder's manifest (fsynced: it is on disk before the file it names)."""
    fd = os.open(folder / MANIFEST, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666 & ~umask())
    try:
        os.write(fd, (json.dumps(entry) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def manifest(folder: str | Path) -> list[dict] | None:
    """The entries of folder's manifest (a line cut short by a kill is skipped), or None when it has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file() or path.is_symlink():
        return None
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict):
            out.append(entry)
    return out


def note_written(path: str | Path, kind: str = "grown") -> None:
    """Record a file roli appends to (kind "grown": train.log, a TensorBoard event file) or a folder a tracker
    library fills ("tree": wandb/) in the manifest of the folder it lies in, if roli made that folder."""
    folder = owner(path)  # a folder's owner is looked for from its parent up, as a file's
    if folder is not None:
        record(folder, {kind: _rel(path, folder)})


def _rel(path: str | Path, folder: Path) -> str:
    return Path(os.path.abspath(path)).relative_to(os.path.abspath(folder)).as_posix()


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call write(tmp_path) and move the result to `path` atomically (fsynced, mode 0666 & ~umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = owner(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        if folder is not None:
            record(folder, {"tmp": _rel(tmp, folder)})
        try:
            write(tmp)
            _fsync(tmp)
        except RuntimeError as e:  # torch.save on a full disk: PytorchStreamWriter's "file write failed"
            if "write" in str(e) and shutil.disk_usage(path.parent).free < FULL_BELOW:
                raise OSError(errno.ENOSPC, "No space left on device", str(path)) from None
            raise
        except OSError as e:  # the file that could not be written, named in the one-line message
            if e.errno == errno.ENOSPC and not e.filename:
                raise OSError(errno.ENOSPC, e.strerror or "No space left on device", str(path)) from None
            raise
        os.chmod(tmp, 0o666 & ~umask())
        if folder is not None:
            record(folder, {"file": _rel(path, folder), "size": os.path.getsize(tmp), "sha256": file_sha256(tmp)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: str | Path, ours=None) -> list[Path]:
    """Remove the temporary files atomic_write left in `folder` (and its sub-folders) when a process was
    killed mid-write: those its manifest names, or (a folder of an earlier roli, without a manifest)
    ".<name>.<random>.tmp" next to a file roli writes; `ours(relative path)` says which are roli's (a user's
    own ".x.y.tmp" is never touched). Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    entries = manifest(folder)
    if entries is not None:
        stale = [folder / e["tmp"] for e in entries if plain_file(folder, e.get("tmp"))]
        for p in stale:
            p.unlink(missing_ok=True)
        return stale
    stale = [
        p
        for p in folder.rglob(f".*{TMP_SUFFIX}")
        if p.is_file() and not p.is_symlink() and p.name.count(".") >= 3
        and (ours is None or ours(p.relative_to(folder).as_posix()))
    ]  # fmt: skip
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def plain_file(folder: Path, rel, kind: int = stat.S_IFREG) -> bool:
    """`rel` (a manifest path) names a regular file (kind S_IFDIR: a folder) inside `folder` reached without a
    symlink and without '..': an edited manifest cannot point roli at another file."""
    if not isinstance(rel, str) or not rel or rel.startswith("/"):
        return False
    parts = rel.split("/")
    if ".." in parts or "" in parts or "." in parts:
        return False
    path = Path(folder)
    for part in parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return False
        if stat.S_ISLNK(mode):
            return False
    return stat.S_IFMT(mode) == kind


def lock_file(path: str | Path, shared: bool = False, wait: bool = True, waiting: str = "") -> int | None:
    """An open descriptor of `path` (created 0644 if absent) holding an flock on it: shared or exclusive, waited for
    (saying `waiting` on stderr first, when given and the lock is held) or (wait=False) None when another process
    holds a conflicting one. Never through a symlink, never a folder (ValueError). The kernel drops the lock when
    the descriptor is closed or the process ends, however it ends."""
    import fcntl
    import sys

    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise ValueError(f"{path} cannot be a lock file ({e.strerror}): move it away") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValueError(f"{path} is not a plain file, so not a lock file: move it away")
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        if not wait:
            os.close(fd)
            return None
        if waiting:
            print(waiting, file=sys.stderr, flush=True)
        try:
            fcntl.flock(fd, mode)
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        os.close(fd)
        raise
    return fd


def nearest_existing(path: Path) -> Path:
    """`path`, or the nearest folder above it that exists (where a new path would be created)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type when the message is empty."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def save_torch(obj, path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_json(payload: dict, path: str | Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=2)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def load_tagged(path: str | Path, fmt, what: str) -> dict:
    """A dict written by save_torch whose "format" is `fmt`, read with weights_only=True.

    Raises ValueError naming `what` when the file is unreadable or of another kind."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt, empty or foreign file
        raise ValueError(f"{what} {path} is unreadable ({first_line(e)[:200]})") from None
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise ValueError(f"{path} is not a {what}")
    return obj


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """The sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_tensors(h, tensors) -> None:
    """Feed each tensor's shape, dtype and bytes into the hashlib object `h`."""
    for t in tensors:
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
