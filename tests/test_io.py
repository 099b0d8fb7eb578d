"""roli._io's small guarantees, one by one (mutmut's survivors of 2026-12-06 on roli/_io.py): the manifest's mode
and tolerance of damaged bytes, the legacy clean-up of killed writes, the manifest path check, atomic writes into
new folders, JSON layout and error texts. Expected values are written here."""

from __future__ import annotations

import os

import pytest
import torch

from roli import _io


def test_the_manifest_gets_the_users_umask_and_skips_damaged_lines(tmp_path):
    old = os.umask(0o027)
    try:
        _io.record(tmp_path, {"file": "a.json"})
    finally:
        os.umask(old)
    assert (tmp_path / _io.MANIFEST).stat().st_mode & 0o777 == 0o640
    with open(tmp_path / _io.MANIFEST, "ab") as f:  # bytes that are not UTF-8, a cut line, a list
        f.write(b'\xff\xfe{"file": \n[1, 2]\n{"tmp": ".a.json.x1.tmp"}\n')
    assert _io.manifest(tmp_path) == [{"file": "a.json"}, {"tmp": ".a.json.x1.tmp"}]


def test_a_trackers_folder_is_recorded_in_the_run_that_holds_it(tmp_path):
    (tmp_path / _io.RUN_MARKER).write_text("{}")
    (tmp_path / "wandb").mkdir()
    _io.note_written(tmp_path / "wandb", kind="tree")
    _io.note_written(tmp_path / "train.log")
    assert _io.manifest(tmp_path) == [{"tree": "wandb"}, {"grown": "train.log"}]
    _io.note_written(tmp_path.parent / "elsewhere.log")  # outside any roli folder: recorded nowhere
    assert not (tmp_path.parent / _io.MANIFEST).exists()


def test_an_earlier_rolis_temporaries_are_removed_by_their_pattern_only(tmp_path):
    """A folder without a manifest (an earlier roli's run): ".<name>.<random>.tmp" files that `ours` accepts."""
    names = [".best.pt.k3j2.tmp", "sub/.results.json.q9.tmp", ".x.y.tmp", ".notes.tmp", "plain.tmp"]
    for name in names:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(name)
    (tmp_path / ".dir.a.tmp").mkdir()  # a folder, not a file
    (tmp_path / "target").write_text("keep")
    (tmp_path / ".link.a.tmp").symlink_to(tmp_path / "target")  # a link: neither it nor its target
    ours = {".best.pt.k3j2.tmp", "sub/.results.json.q9.tmp"}.__contains__
    removed = _io.remove_stale_temporaries(tmp_path, ours)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in removed) == [".best.pt.k3j2.tmp",
                                                                           "sub/.results.json.q9.tmp"]  # fmt: skip
    assert all((tmp_path / n).exists() for n in names[2:]) and (tmp_path / "target").read_text() == "keep"
    removed = _io.remove_stale_temporaries(tmp_path)  # no `ours`: every ".<name>.<random>.tmp" file
    assert [p.name for p in removed] == [".x.y.tmp"]
    assert (
        (tmp_path / ".notes.tmp").exists()
        and (tmp_path / ".dir.a.tmp").is_dir()
        and (tmp_path / ".link.a.tmp").is_symlink()
    )


@pytest.mark.parametrize("rel", [5, None, "", "/etc/passwd", "a//b", "a/./b", "a/../b", "lnk/f", "a", "missing"])
def test_a_manifest_path_must_name_a_plain_file_inside_the_folder(tmp_path, rel):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b").write_text("x")
    (tmp_path / "b").write_text("x")
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_text("x")
    (tmp_path / "lnk").symlink_to(tmp_path / "real")
    assert _io.plain_file(tmp_path, rel) is False
    assert _io.plain_file(tmp_path, "a/b") is True and _io.plain_file(tmp_path, "a", kind=0o040000) is True


def test_atomic_writes_make_missing_folders_and_json_is_indented(tmp_path):
    path = tmp_path / "new" / "deeper" / "r.json"
    _io.save_json({"a": 1, "b": [1, 2]}, path)
    assert path.read_text() == '{\n  "a": 1,\n  "b": [\n    1,\n    2\n  ]\n}'


def test_error_texts_name_what_failed(tmp_path):
    assert _io.first_line(ValueError()) == "ValueError"
    assert _io.first_line(OSError("disk gone\nmore")) == "disk gone"
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception) as theirs:  # what torch itself says of the file
        torch.load(bad, weights_only=True)
    with pytest.raises(ValueError) as e:
        _io.load_tagged(bad, "roli-state-1", "training state")
    assert str(e.value) == f"training state {bad} is unreadable ({str(theirs.value).strip().splitlines()[0][:200]})"
    for other in ({"format": "other"}, [1, 2], torch.zeros(2)):  # another format, or not a dict at all
        torch.save(other, bad)
        with pytest.raises(ValueError, match=f"^{bad} is not a training state$"):
            _io.load_tagged(bad, "roli-state-1", "training state")


def test_lock_file_shared_and_exclusive_and_never_through_a_link(tmp_path):
    path = tmp_path / "x.lock"
    a = _io.lock_file(path, shared=True)
    b = _io.lock_file(path, shared=True)  # shared locks share (two open files: flock conflicts in one process too)
    assert _io.lock_file(path, wait=False) is None  # an exclusive one waits for both
    os.close(a)
    assert _io.lock_file(path, wait=False) is None
    os.close(b)
    c = _io.lock_file(path, wait=False)
    assert c is not None and _io.lock_file(path, shared=True, wait=False) is None
    os.close(c)
    assert oct(path.stat().st_mode & 0o777) == oct(0o644 & ~_io.umask())
    target = tmp_path / "users.txt"
    target.write_text("mine")
    (tmp_path / "link.lock").symlink_to(target)
    with pytest.raises(ValueError, match=r"^.*link\.lock cannot be a lock file \(.*\): move it away$"):
        _io.lock_file(tmp_path / "link.lock")
    (tmp_path / "dir.lock").mkdir()
    with pytest.raises(ValueError, match=r"dir\.lock cannot be a lock file \(Is a directory\): move it away$"):
        _io.lock_file(tmp_path / "dir.lock")
    os.mkfifo(tmp_path / "fifo.lock")
    with pytest.raises(ValueError, match=r"fifo\.lock is not a plain file, so not a lock file: move it away$"):
        _io.lock_file(tmp_path / "fifo.lock", wait=False)
    assert target.read_text() == "mine"


def test_a_folder_with_a_manifest_loses_only_the_temporaries_listed_there(tmp_path):
    (tmp_path / "stage").mkdir()
    for name in (".a.json.x1.tmp", "stage/.best.pt.x2.tmp", ".mine.b.tmp", "stage/.notes.c.tmp"):
        (tmp_path / name).write_text("x")
    for entry in ({"tmp": ".a.json.x1.tmp"}, {"tmp": "stage/.best.pt.x2.tmp"}, {"tmp": "stage/.gone.x3.tmp"},
                  {"file": "a.json"}, {"tmp": "../outside.tmp"}):  # fmt: skip
        _io.record(tmp_path, entry)
    (tmp_path.parent / "outside.tmp").write_text("a user's")
    removed = _io.remove_stale_temporaries(tmp_path, ours=lambda rel: True)
    assert removed == [tmp_path / ".a.json.x1.tmp", tmp_path / "stage/.best.pt.x2.tmp"]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.tmp")) == [
        ".mine.b.tmp",
        "stage/.notes.c.tmp",
    ]
    assert (tmp_path.parent / "outside.tmp").read_text() == "a user's"


def test_hash_tensors_tells_shape_and_dtype_apart_from_equal_bytes():
    import hashlib

    def digest(*tensors):
        h = hashlib.sha256()
        _io.hash_tensors(h, tensors)
        return h.hexdigest()

    t = torch.randn(4, 6)
    want = hashlib.sha256(b"(4, 6)torch.float32" + t.numpy().tobytes()).hexdigest()
    assert digest(t) == want and digest(t.t().contiguous().t()) == want  # the values, whatever the layout
    assert len({digest(t), digest(t.reshape(6, 4)), digest(t.view(torch.int32)), digest(t.reshape(24))}) == 4


def test_load_tagged_never_runs_a_files_code(tmp_path):
    class Mkdir:
        def __reduce__(self):
            return (os.mkdir, (str(tmp_path / "code-ran"),))

    torch.save({"format": "roli-state-1", "x": Mkdir()}, tmp_path / "state.pt")
    with pytest.raises(ValueError) as e:
        _io.load_tagged(tmp_path / "state.pt", "roli-state-1", "training state")
    assert str(e.value).startswith(f"training state {tmp_path / 'state.pt'} is unreadable (")
    assert not (tmp_path / "code-ran").exists()


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_written_files_get_the_users_umask_not_mkstemps_0600(tmp_path, mask):
    old = os.umask(mask)
    try:
        _io.save_json({"a": 1}, tmp_path / "a.json")
        _io.save_torch({"t": torch.randn(2)}, tmp_path / "sub" / "t.pt")
    finally:
        os.umask(old)
    for p in (tmp_path / "a.json", tmp_path / "sub" / "t.pt"):
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, (p, oct(p.stat().st_mode))
