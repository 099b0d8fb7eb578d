"""Atomic file writes: a temporary file in the target folder, then a rename. A run killed mid-write
leaves the previous file (if any) in place and no half-written file under the target name; its
temporary file (".<name>.<random>.tmp") is removed by remove_stale_temporaries when the run starts or
resumes. Written files are fsynced and get the ordinary mode of the user's umask (not mkstemp's 0600)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

TMP_SUFFIX = ".tmp"


def _umask() -> int:
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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    try:
        write(tmp)
        _fsync(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folder: str | Path, ours=None) -> list[Path]:
    """Remove the temporary files atomic_write left in `folder` (and its sub-folders) when a process was
    killed mid-write: ".<name>.<random>.tmp" next to a file roli writes; `ours(relative path)` says which are
    roli's (a user's own ".x.y.tmp" is never touched). Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [
        p
        for p in folder.rglob(f".*{TMP_SUFFIX}")
        if p.is_file() and not p.is_symlink() and p.name.count(".") >= 3
        and (ours is None or ours(p.relative_to(folder).as_posix()))
    ]  # fmt: skip
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


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
