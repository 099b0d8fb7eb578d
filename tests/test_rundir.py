"""roli.rundir's functions one by one on small run directories written by roli's own writer (no training):
which names roli writes, what --overwrite deletes and keeps (a run with a manifest, an earlier roli's run, a
tracker's tree), what not_as_written reports, the restarted manifest, the fingerprint's words, a start's temporary
sibling. Written for mutmut's survivors of 2026-12-06 on roli/rundir.py; every expected value is written here."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from roli import rundir
from roli._cli import BadValue
from roli._io import MANIFEST, RUN_MARKER, manifest, note_written, save_json

CONFIG = {"lr": 0.01, "eps": 8}


def new_run(path: Path, files: dict[str, dict] | None = None) -> Path:
    """A run directory as roli creates it (marker, manifest, config.json), plus `files` written by roli."""

    def first(folder: Path) -> None:
        save_json(CONFIG, folder / "config.json")

    rundir.open_run_dir(path, False, False, "a test", first).release()
    for rel, payload in (files or {}).items():
        save_json(payload, path / rel)
    return path


def names(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "rel, ours",
    [
        ("config.json", True),
        ("alp/best.pt", True),
        ("autoattack/alp/batch3.pt", True),
        ("tensorboard/events.out.tfevents.17.host", True),
        ("wandb/run-1/files/config.yaml", True),
        (".config.json.k3j2.tmp", True),  # atomic_write's temporary of a top-level file
        ("alp/.best.pt.k3j2.tmp", True),
        ("autoattack/alp/.batch3.pt.k3j2.tmp", True),  # two folders deep: the name is after the last '/'
        ("notes.txt", False),
        ("alp/notes.txt", False),
        ("alp/sub/best.pt", False),  # a * never matches across a '/'
        ("tensorboard/sub/events.out.tfevents.1", False),
        (".notes.txt.k3j2.tmp", False),  # a temporary of a name roli never writes
        ("my.config.json", False),
    ],
)
def test_which_names_roli_writes(rel, ours):
    assert rundir.written_by_roli(rel) is ours


@pytest.mark.parametrize(
    "name, temporary",
    [(".a.b.tmp", True), (".best.pt.x.tmp", True), (".a.tmp", False), ("a.b.c.tmp", False), ("a.b.c.d", False),
     (".a.b.c", False)],
)  # fmt: skip
def test_what_counts_as_an_atomic_writes_temporary(name, temporary):
    assert rundir._temporary(name) is temporary


def test_foreign_links_lists_each_link_once_without_walking_into_it(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "outside"
    (run / "alp").mkdir(parents=True)
    outside.mkdir()
    (outside / "a.txt").write_text("x")
    (outside / "inner").symlink_to(outside / "a.txt")  # a link inside a linked folder: not the run's
    (run / "alp" / "best.pt").symlink_to(outside / "a.txt")
    (run / "linked").symlink_to(outside)
    assert rundir.foreign_links(run) == ["alp/best.pt", "linked"]


def test_check_overwrite_refuses_an_input_inside_the_run_in_one_sentence(tmp_path):
    run = new_run(tmp_path / "run")
    (run / "head.pt").write_bytes(b"a user's head")
    rundir.check_overwrite(run, {"--init": tmp_path / "head.pt"})  # outside: fine
    with pytest.raises(BadValue) as e:
        rundir.check_overwrite(run, {"--init": run / "head.pt"})
    assert str(e.value) == (
        f"--overwrite: --init {run / 'head.pt'} lies inside the run directory {run}, whose contents --overwrite "
        "replaces; move it out first (or choose another --run-dir)"
    )


def test_not_as_written_names_each_kind_of_change(tmp_path):
    run = new_run(tmp_path / "run", {"results.json": {"alp": {}}, "alp/done.json": {"epochs": 3}})
    assert rundir.not_as_written(run) == []
    text = (run / "config.json").read_text()
    (run / "config.json").write_text(text.replace("0.01", "0.02"))  # the same size, other bytes
    (run / "lp").mkdir()
    (run / "lp" / "best.pt").write_bytes(b"copied in")
    (run / "notes.txt").write_text("a user's own file: not roli's business")
    (run / ".results.json.k3j.tmp").write_text("a killed write")
    (run / "train.log").write_text("appended to\n")
    note_written(run / "train.log")
    (run / "alp" / "done.json").unlink()  # a stage file gone: not reported (only config and fingerprint)
    assert rundir.not_as_written(run) == [
        "config.json is not the file roli wrote there (edited or replaced)",
        "lp/best.pt was not written by this run (copied in?)",
    ]
    assert rundir.not_as_written(run, only=("results.json",)) == []
    assert rundir.not_as_written(run, unread=("config.json",)) == [
        "lp/best.pt was not written by this run (copied in?)"
    ]
    (run / "config.json").unlink()
    assert rundir.not_as_written(run, only=("config.json",)) == ["config.json is missing (deleted?)"]
    assert rundir.not_as_written(run, only=("results.json",)) == []


def test_not_as_written_skips_a_trackers_tree_and_never_walks_through_a_link(tmp_path):
    run = new_run(tmp_path / "run")
    (run / "wandb" / "run-1" / "files").mkdir(parents=True)
    note_written(run / "wandb", kind="tree")
    (run / "wandb" / "run-1" / "files" / "config.yaml").write_text("the tracker's own file")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "best.pt").write_bytes(b"not in the run")
    (run / "alp").symlink_to(elsewhere)
    assert rundir.not_as_written(run) == []


def test_a_missing_manifest_is_reported_only_for_a_run_that_had_one(tmp_path):
    run = new_run(tmp_path / "run")
    (run / MANIFEST).unlink()
    assert rundir.not_as_written(run) == [f"its manifest {MANIFEST} is missing"]
    (run / RUN_MARKER).write_text(json.dumps({"created_by": "roli train"}))  # an earlier roli's marker
    assert rundir.not_as_written(run) is None
    (run / RUN_MARKER).write_text("[1, 2]")  # unreadable as a marker
    assert rundir.not_as_written(run) is None


def test_check_as_written_says_how_many_more_and_honours_only_and_regenerated(tmp_path):
    run = new_run(tmp_path / "run", {"results.json": {}, "alp/metrics.csv": {}})
    for rel in ("config.json", "results.json", "alp/metrics.csv"):
        (run / rel).write_text("edited")
    with pytest.raises(BadValue) as e:
        rundir.check_as_written(run, "resume", "put it back")
    assert str(e.value) == (
        f"resume: in {run}, alp/metrics.csv is not the file roli wrote there (edited or replaced) (and 2 more); "
        "put it back"
    )
    with pytest.raises(BadValue) as e:
        rundir.check_as_written(run, "resume", "put it back", regenerated=True)  # metrics.csv is rewritten
    assert "config.json is not the file" in str(e.value) and "(and 1 more)" in str(e.value)
    with pytest.raises(BadValue) as e:
        rundir.check_as_written(run, "x", "y", only=("results.json",))
    assert str(e.value) == f"x: in {run}, results.json is not the file roli wrote there (edited or replaced); y"
    rundir.check_as_written(run, "x", "y", only=("alp/done.json",))  # nothing of these changed


def test_overwrite_removes_what_roli_wrote_keeps_the_rest_and_restarts_the_manifest(tmp_path):
    run = new_run(tmp_path / "run", {"results.json": {}, "alp/done.json": {}, "autoattack/alp/x/batch0.pt": {}})
    (run / "alp" / "evaluations").mkdir()
    save_json({"pgd": 0.5}, run / "alp" / "evaluations" / "e1.json")
    (run / "train.log").write_text("log\n")
    note_written(run / "train.log")
    (run / "results.json").write_text("{ edited }")
    (run / "alp" / "notes.txt").write_text("mine")
    removed = rundir.remove_outputs(run)
    assert removed == ["alp/notes.txt", "results.json (changed since roli wrote it)"]
    assert names(run) == [rundir.LOCK, MANIFEST, RUN_MARKER, "alp/notes.txt", "results.json"]
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["alp"]  # emptied folders removed, deepest first
    assert manifest(run) == [{"file": RUN_MARKER, "size": (run / RUN_MARKER).stat().st_size,
                              "sha256": sha(run / RUN_MARKER)}]  # fmt: skip
    assert rundir.not_as_written(run) == ["results.json was not written by this run (copied in?)"]  # the marker
    # is vouched for by the restarted manifest; the kept results.json by nothing


def test_the_restarted_manifest_has_the_usual_mode_and_is_empty_without_a_marker(tmp_path):
    run = new_run(tmp_path / "run")
    old = os.umask(0o022)
    try:
        rundir.remove_outputs(run)
        assert (run / MANIFEST).stat().st_mode & 0o777 == 0o644
        (run / RUN_MARKER).unlink()
        rundir._restart_manifest(run)
    finally:
        os.umask(old)
    assert (run / MANIFEST).read_bytes() == b"" and names(run) == [rundir.LOCK, MANIFEST]


def test_overwrite_empties_a_trackers_tree_without_following_its_links(tmp_path):
    run = new_run(tmp_path / "run")
    tree = run / "wandb" / "run-1"
    (tree / "files").mkdir(parents=True)
    note_written(run / "absent", kind="tree")  # a tree that was never made: the next one is still emptied
    note_written(run / "wandb", kind="tree")
    (tree / "files" / "config.yaml").write_text("the tracker's")
    (tree / "run.wandb").write_bytes(b"\x00events")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("a user's")
    (tree / "media").symlink_to(outside)  # a link to a folder: the link goes, never what it points to
    (tree / "latest").symlink_to(outside / "keep.txt")
    assert rundir.remove_outputs(run) == []
    assert not (run / "wandb").exists() and names(outside) == ["keep.txt"]
    (run / "wandb").symlink_to(outside)  # a tree replaced by a link: nothing through it
    with open(run / MANIFEST, "a") as f:
        f.write(json.dumps({"tree": "wandb"}) + "\n")
    assert rundir.remove_outputs(run) == ["wandb"]
    assert names(outside) == ["keep.txt"]


def test_overwrite_of_an_earlier_rolis_run_goes_by_name(tmp_path, caplog):
    run = tmp_path / "old"
    (run / "alp" / "empty").mkdir(parents=True)
    (run / RUN_MARKER).write_text(json.dumps({"created_by": "roli train"}))
    (run / "lp").mkdir()
    for rel in ("config.json", "alp/best.pt", "alp/.best.pt.k3.tmp", "lp/best.pt", "notes.txt", "alp/mine.txt",
                rundir.LOCK):  # fmt: skip
        (run / rel).write_text(rel)
    with caplog.at_level("INFO", logger="roli.train"):
        assert rundir.remove_outputs(run) == ["alp/mine.txt", "notes.txt"]
    assert messages(caplog) == [
        f"--overwrite: {run} has no {MANIFEST} (a run of an earlier roli): its files are known by name"
    ]
    assert names(run) == [rundir.LOCK, RUN_MARKER, "alp/mine.txt", "notes.txt"]  # the marker stays
    assert (run / rundir.LOCK).read_text() == rundir.LOCK and not (run / "alp" / "empty").exists()
    assert not (run / "lp").exists()  # emptied by the removal: its files go before it


def test_an_earlier_rolis_run_overwritten_can_be_resumed_and_overwritten_again(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    (run / RUN_MARKER).write_text(json.dumps({"created_by": "roli train"}))
    (run / "config.json").write_text("{}")
    rundir.open_run_dir(run, False, True, "x", lambda d: save_json(CONFIG, d / "config.json")).release()
    assert json.loads((run / RUN_MARKER).read_text())["format"] == "roli run 2"  # the marker is this roli's now
    assert rundir.run_identity(run) is not None and rundir.not_as_written(run) == []
    rundir.check_run_dir(run, resume=True, overwrite=False)  # a marker and a manifest: resumable
    rundir.check_run_dir(run, resume=False, overwrite=True)
    rundir.open_run_dir(run, False, True, "x", lambda d: save_json(CONFIG, d / "config.json")).release()
    assert names(run) == [rundir.LOCK, MANIFEST, RUN_MARKER, "config.json"]


FP = {
    "options": "a1",
    "num_classes": 10,
    "classes": "c1",
    "train": {"n": 100, "labels": "l1", "pixels": "p1", "content": "h1"},
    "val": {"n": 10, "labels": "l2", "files": "f1"},
    "test": {"n": 50, "labels": "l3"},
    "inputs": {"--checkpoint": "s1", "--init": "s2"},
}


@pytest.mark.parametrize(
    "edit, words",
    [
        ({"options": "a2"}, ["the settings in config.json"]),
        ({"num_classes": 5}, ["the number of classes"]),
        ({"classes": "c2"}, ["the class names (labels.json)"]),
        ({"train": {"n": 99, "labels": "l1", "pixels": "p9", "content": "h9"}}, ["the train split's size",
                                                                                 "the train split's images"]),
        ({"val": {"n": 10, "labels": "l9", "files": "f9"}}, ["the val split's labels", "the val split's files"]),
        ({"test": {"n": 50, "labels": "l3", "extra": 1}}, []),  # a part the saved run does not have
        ({"inputs": {"--checkpoint": "s9", "--init": "s2"}}, ["the file of --checkpoint (its sha256)"]),
        ({"inputs": {}}, []),  # evaluate reads no checkpoint: not compared
        ({"test": {}}, []),
        ({"other": 1}, []),
        ({"test": {"n": 50, "labels": "l3", "extra": 2}}, []),
        ({"val": {"n": 10, "labels": "l2", "files": "f1", "extra": 2}}, []),
    ],
)  # fmt: skip
def test_changed_names_what_differs_in_words(edit, words):
    assert rundir.changed(FP, FP | edit) == words


def test_changed_compares_only_what_both_fingerprints_hold():
    without = {k: v for k, v in FP.items() if k not in ("test", "inputs")}  # a run of an earlier roli, evaluate
    assert rundir.changed(FP, without) == [] and rundir.changed(without, FP) == []
    saved = FP | {"val": FP["val"] | {"extra": 1}, "future": {"a": 1}}
    assert rundir.changed(saved, FP | {"val": FP["val"] | {"extra": 2}, "future": {"a": 2}}) == [
        "the val split's extra", "future"]  # fmt: skip


def test_check_fingerprint_names_the_change_and_the_flag(tmp_path, caplog):
    run = new_run(tmp_path / "run")
    with caplog.at_level("INFO", logger="roli.train"):
        assert rundir.check_fingerprint(run, FP, "evaluate") == []
    assert messages(caplog) == [
        f"evaluate: {run} has no fingerprint.json (a run of an earlier roli): its data is not checked"
    ]
    rundir.write_fingerprint(run, FP)
    assert rundir.check_fingerprint(run, FP, "resume") == []
    now = FP | {"num_classes": 5, "options": "a2"}
    with pytest.raises(BadValue) as e:
        rundir.check_fingerprint(run, now, "evaluate", "--allow-changed")
    assert str(e.value) == (
        f"evaluate: the settings in config.json, the number of classes changed since the run started in {run}; "
        "start a new run for changed data or settings (--allow-changed to evaluate anyway, recorded in the results)"
    )
    with pytest.raises(BadValue) as e:
        rundir.check_fingerprint(run, now, "resume")
    assert str(e.value).endswith("start a new run for changed data or settings")
    assert rundir.check_fingerprint(run, now, "evaluate", "allowed") == [
        "the settings in config.json", "the number of classes"]  # fmt: skip


@pytest.mark.parametrize(
    "saved",
    [{"options": "a1", "train": {}, "val": {}}, {"train": {}, "val": {}, "test": {}}, {"options": "a1", "train": {},
     "val": {}, "test": []}, []],
)  # fmt: skip
def test_a_damaged_fingerprint_is_refused(tmp_path, saved):
    run = new_run(tmp_path / "run")
    (run / rundir.FINGERPRINT).write_text(json.dumps({"format": "x", **saved} if isinstance(saved, dict) else saved))
    with pytest.raises(BadValue) as e:
        rundir.check_fingerprint(run, FP, "resume")
    assert str(e.value) == f"resume: {run / rundir.FINGERPRINT} is damaged; the run cannot be checked"


def test_a_new_run_is_created_whole_with_the_users_mode(tmp_path):
    old = os.umask(0o027)
    try:
        lock = rundir.open_run_dir(tmp_path / "run", False, False, "training x", lambda d: None)
    finally:
        os.umask(old)
    run = tmp_path / "run"
    assert (run / rundir.LOCK).read_text() == f"pid {os.getpid()}: training x"
    lock.release()
    assert (run / rundir.LOCK).read_text() == ""
    assert run.stat().st_mode & 0o777 == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the staging sibling was renamed
    marker = json.loads((run / RUN_MARKER).read_text())
    assert marker["format"] == "roli run 2" and len(marker["run"]) == 32


def test_a_failed_start_leaves_nothing_and_a_full_disk_names_the_run(tmp_path, monkeypatch):
    def full(folder: Path) -> None:
        save_json(CONFIG, folder / "config.json")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "fingerprint.json"))

    with pytest.raises(OSError) as e:
        rundir.open_run_dir(tmp_path / "run", False, False, "x", full)
    assert e.value.filename == str(tmp_path / "run" / "fingerprint.json")
    assert list(tmp_path.iterdir()) == []
    asked = []
    usage = shutil._ntuple_diskusage(10 << 30, 9 << 30, 3 << 20)
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: asked.append(path) or usage)
    assert str(rundir.disk_full(e.value, tmp_path / "run")) == (
        f"disk full while writing into {tmp_path / 'run'} (3 MiB free): free space there and run the same command again"
    )
    assert asked == [tmp_path]  # the run's nearest existing folder: the run is not there yet
    new_run(tmp_path / "run")
    assert str(rundir.disk_full(e.value, tmp_path / "run")).endswith(f"continue with --resume {tmp_path / 'run'}")
    assert rundir.disk_full(OSError(errno.EACCES, "denied"), tmp_path / "run") is None


def test_a_staging_sibling_is_removed_only_when_it_holds_nothing_but_roli_files(tmp_path):
    staging = new_run(tmp_path / ".run.roli-new-abc")
    assert rundir._remove_staging(staging) is True and not staging.exists()
    staging = new_run(tmp_path / ".run.roli-new-def")
    (staging / "mine.txt").write_text("a user's")
    assert rundir._remove_staging(staging) is False and names(staging) == [
        rundir.LOCK,
        MANIFEST,
        RUN_MARKER,
        "mine.txt",
    ]
    target = new_run(tmp_path / "target")
    (tmp_path / ".run.roli-new-lnk").symlink_to(target)
    assert rundir._remove_staging(tmp_path / ".run.roli-new-lnk") is False
    assert names(target) == [rundir.LOCK, MANIFEST, RUN_MARKER, "config.json"]  # nothing through the link
    staging = new_run(tmp_path / ".run.roli-new-ghi")
    (staging / "mine").mkdir()  # an empty folder of a user's: not roli's to remove
    assert rundir._remove_staging(staging) is False and (staging / "mine").is_dir()
    assert rundir._remove_staging(tmp_path / "absent") is False


@pytest.mark.parametrize(
    "label, folder",
    [("pretrain", "pretrain"), ("lp", "lp"), ("alp", "alp"), ("RoLI-full", "roli-ft"), ("RanLI-lora", "ranli-ft"),
     ("full", "ft"), ("roli-full", "ft"), ("ALP", "ft")],
)  # fmt: skip
def test_each_stage_label_has_its_folder(label, folder):
    assert rundir.stage_dir(label) == folder


class Split:
    """A stand-in for a dataset: its sample parts, its content digest, its length."""

    def __init__(self, n: int, seed: int, streamed: bool = False):
        g = torch.Generator().manual_seed(seed)
        self.n, self.streamed = n, streamed
        self.labels = torch.randint(0, 10, (n,), generator=g)
        self.pixels = torch.rand(4, 3, 2, 2, generator=g)

    def __len__(self) -> int:
        return self.n

    def sample_parts(self) -> dict:
        return {"labels": (self.labels,), "pixels": (self.pixels, "a note")}

    def content_digest(self, mode: str) -> str:
        return f"all of it, {mode}"


def digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.numpy().tobytes() if isinstance(p, torch.Tensor) else json.dumps(p, sort_keys=True).encode())
    return h.hexdigest()[:16]


def test_the_fingerprint_holds_settings_data_classes_and_inputs(tmp_path):
    ckpt = tmp_path / "backbone.pt"
    ckpt.write_bytes(b"weights")
    splits = (Split(20, 0), Split(5, 1), Split(8, 2), 10)
    options = {"lr": 0.01, "peft": "lora", "device": "cpu", "workers": 4, "accumulate": 1, "n_ex": 100,
               "data_hash": "stat", "record_order": "file"}  # fmt: skip
    fp = rundir.fingerprint(options, splits, ["cat", "dog"], {"--checkpoint": ckpt, "--init": tmp_path / "gone.pt"})
    split = lambda d: {"n": d.n, "labels": digest(d.labels), "pixels": digest(d.pixels, "a note"),  # noqa: E731
                       "content": "all of it, stat"}  # fmt: skip
    assert fp == {
        "options": digest({"lr": 0.01, "peft": "lora", "n_ex": 100}),  # execution and added defaults left out
        "num_classes": 10,
        "classes": digest(["cat", "dog"]),
        "train": split(splits[0]),
        "val": split(splits[1]),
        "test": split(splits[2]),
        "inputs": {"--checkpoint": hashlib.sha256(b"weights").hexdigest()},  # a missing file is not hashed
    }
    assert rundir.fingerprint({"lr": 0.01}, splits)["train"]["content"] == "all of it, full"  # the default
    assert "inputs" not in rundir.fingerprint({"lr": 0.01}, splits)
    assert rundir.settings({"lr": 1, "attack_precision": "fp8", "compile": True}) == {
        "lr": 1,
        "attack_precision": "fp8",
    }
    assert rundir.without_added_defaults({"accumulate": 2, "n_ex": None, "lr": None}) == {"accumulate": 2, "lr": None}
    rundir.write_fingerprint(tmp_path, fp)
    assert json.loads((tmp_path / rundir.FINGERPRINT).read_text()) == {"format": "roli run fingerprint 2", **fp}


def test_hash_note_counts_the_image_files_only():
    arrays, files = Split(20, 0), Split(30, 1, streamed=True)
    assert rundir.hash_note((arrays, arrays, arrays, 10), "full", 1.0) is None
    assert rundir.hash_note((files, [1, 2, 3], files, files), "full", 2.25) == (
        "data fingerprint: 60 image files, every file's bytes, in 2.2 s")  # fmt: skip
    assert rundir.hash_note((files, files, arrays, 10), "stat", 0.04) == (
        "data fingerprint: 60 image files, sizes and mtimes only (--data-hash stat), in 0.0 s")  # fmt: skip


def test_a_checkpoint_from_another_run_is_refused(tmp_path):
    run = new_run(tmp_path / "run")
    here = rundir.run_identity(run)
    assert isinstance(here, str) and len(here) == 32
    rundir.check_written_here(here, run, run / "alp" / "best.pt", "resume")
    rundir.check_written_here(None, run, run / "alp" / "best.pt", "resume")  # written before identities
    with pytest.raises(BadValue) as e:
        rundir.check_written_here("0" * 32, run, run / "alp" / "best.pt", "resume")
    assert str(e.value) == (
        f"resume: {run / 'alp' / 'best.pt'} was written by another run (copied in?), not by the run in {run}; move it "
        "away"
    )
    (run / RUN_MARKER).write_text(json.dumps({"run": 5}))
    assert rundir.run_identity(run) is None
    rundir.check_written_here("0" * 32, run, run / "best.pt", "resume")  # no identity here: not compared
    rundir.check_written_here("0" * 32, tmp_path / "absent", run / "best.pt", "resume")


def refusal(call, *args, **kwargs) -> str:
    with pytest.raises(BadValue) as e:
        call(*args, **kwargs)
    return str(e.value)


def test_check_run_dir_refuses_each_wrong_run_directory_in_words(tmp_path):
    run = tmp_path / "run"
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    assert refusal(rundir.check_run_dir, tmp_path / "link", False, False) == (
        f"run directory {tmp_path / 'link'} is a symlink to {tmp_path / 'nowhere'}, which does not exist; create that "
        "folder or give another --run-dir"
    )
    (tmp_path / "afile").write_text("x")
    assert refusal(rundir.check_run_dir, tmp_path / "afile", False, False) == (
        f"run directory {tmp_path / 'afile'} is a file; choose another --run-dir")  # fmt: skip
    assert refusal(rundir.check_run_dir, tmp_path / "afile" / "run", False, False) == (
        f"run directory {tmp_path / 'afile' / 'run'}: {tmp_path / 'afile'} is a file, not a directory; choose another "
        "--run-dir"
    )
    rundir.check_run_dir(run, False, False)  # a new one: fine
    rundir.check_run_dir(tmp_path / "new" / "deeper", False, False)
    run.mkdir()
    (run / "mine.txt").write_text("a user's")
    assert refusal(rundir.check_run_dir, run, False, False) == (
        f"run directory {run} is not empty; pass --resume {run} to continue it or --overwrite to start over"
    )
    assert refusal(rundir.check_run_dir, run, False, True) == (
        f"--overwrite: {run} was not written by roli (it has no {RUN_MARKER} marker), and roli deletes only what it "
        "wrote; choose another --run-dir"
    )
    assert refusal(rundir.check_run_dir, run, True, False) == (
        f"resume: {run} was not written by roli (it has no {RUN_MARKER} marker); roli resumes only its own runs"
    )
    (run / "mine.txt").unlink()
    run.rmdir()
    new_run(run, {"alp/metrics.csv": {}, "results.json": {}})
    rundir.check_run_dir(run, True, False)
    rundir.check_run_dir(run, False, True, {"--checkpoint": tmp_path / "b.pt"})
    assert refusal(rundir.check_run_dir, run, False, True, {"--init": run / "alp" / "best.pt"}).startswith(
        f"--overwrite: --init {run / 'alp' / 'best.pt'} lies inside the run directory"
    )
    (run / "alp" / "metrics.csv").write_text("edited")  # rewritten by --resume, never read back
    rundir.check_run_dir(run, True, False)
    assert refusal(rundir.check_run_dir, run, False, True) == (
        f"--overwrite: in {run}, alp/metrics.csv is not the file roli wrote there (edited or replaced); --overwrite "
        "replaces only the files roli wrote: move it away first"
    )
    (run / "results.json").write_text("edited")
    assert refusal(rundir.check_run_dir, run, True, False) == (
        f"resume: in {run}, results.json is not the file roli wrote there (edited or replaced); put back the file roli "
        "wrote, or move it away and start over with --overwrite"
    )
    (run / "results.json").unlink()
    (run / "alp" / "metrics.csv").unlink()
    (run / "lp").symlink_to(tmp_path)
    for resume, overwrite in ((True, False), (False, True)):
        assert refusal(rundir.check_run_dir, run, resume, overwrite) == (
            f"run directory {run} holds a symlink roli did not make (lp): roli would write or delete through it; "
            "remove it, or choose another --run-dir"
        )


def test_check_run_dir_refuses_a_folder_it_cannot_write(tmp_path, monkeypatch):
    (tmp_path / "ro").mkdir()
    asked = []
    monkeypatch.setattr(
        rundir.os, "access", lambda path, mode: asked.append((path, mode)) or False
    )  # root writes anywhere
    assert refusal(rundir.check_run_dir, tmp_path / "ro" / "run", False, False) == (
        f"run directory {tmp_path / 'ro' / 'run'}: {tmp_path / 'ro'} is not writable; choose another --run-dir"
    )
    assert asked == [(tmp_path / "ro", os.W_OK | os.X_OK)]


def test_the_lock_says_who_holds_it_and_is_never_a_link_or_a_folder(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    old = os.umask(0o022)
    try:
        lock = rundir.RunLock(run, "roli train --method alp").acquire()
    finally:
        os.umask(old)
    assert (run / rundir.LOCK).stat().st_mode & 0o777 == 0o644
    assert (run / rundir.LOCK).read_text() == f"pid {os.getpid()}: roli train --method alp"
    assert refusal(rundir.RunLock(run, "evaluate").acquire) == (
        f"run directory {run} is in use (pid {os.getpid()}: roli train --method alp); wait for it to finish, or use "
        "another --run-dir"
    )
    assert "use another --out" in refusal(rundir.RunLock(run, "x", "grid folder").acquire)
    lock.release()
    lock.release()  # twice: nothing more
    with open(run / rundir.LOCK, "wb") as f:
        f.write(b"pid 1: \xff\xfe old")  # left by a process that is gone, not UTF-8
    with caplog.at_level("INFO", logger="roli.train"):
        with rundir.RunLock(run, "resume"):
            assert (run / rundir.LOCK).read_text() == f"pid {os.getpid()}: resume"
    assert messages(caplog) == [f"run directory {run}: took over the lock left by pid 1: \ufffd\ufffd old (no longer "
                                "running)"]  # fmt: skip
    import fcntl

    with open(run / rundir.LOCK, "wb") as f:  # held by a process that wrote nothing readable
        fcntl.flock(f, fcntl.LOCK_EX)
        assert f"{run} is in use (another process)" in refusal(rundir.RunLock(run, "x").acquire)
        f.write(b"\xff held")
        f.flush()
        assert f"{run} is in use (\ufffd held)" in refusal(rundir.RunLock(run, "x").acquire)
    (run / rundir.LOCK).unlink()
    (run / rundir.LOCK).symlink_to(tmp_path / "users-file")
    assert refusal(rundir.RunLock(run, "x").acquire) == (
        f"run directory {run}: its lock .roli-lock is a symlink, not roli's lock file; move it away"
    )
    assert not (tmp_path / "users-file").exists()
    (run / rundir.LOCK).unlink()
    (run / rundir.LOCK).mkdir()
    assert refusal(rundir.RunLock(run, "x", "grid folder").acquire) == (
        f"grid folder {run}: its lock .roli-lock is a directory, not roli's lock file; move it away"
    )


def test_a_start_is_staged_beside_the_run_and_a_full_disk_named_as_the_user_knows_it(tmp_path):
    seen = []
    lock = rundir.create_whole(tmp_path / "run", RUN_MARKER, {"a": 1}, "x", seen.append)
    lock.release()
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".run.roli-new-")
    assert lock.path == tmp_path / "run" / rundir.LOCK
    assert json.loads((tmp_path / "run" / RUN_MARKER).read_text()) == {"a": 1}

    def fill(folder: Path) -> None:  # another process takes the name meanwhile
        (tmp_path / "taken").mkdir()
        (tmp_path / "taken" / "x").write_text("theirs")

    assert refusal(rundir.create_whole, tmp_path / "taken", RUN_MARKER, {}, "x", fill) == (
        f"run directory {tmp_path / 'taken'} was filled by another process while this one started; choose another "
        "--run-dir"
    )
    grid = refusal(rundir.create_whole, tmp_path / "taken", RUN_MARKER, {}, "x", lambda d: None, "grid folder")
    assert grid.endswith("choose another --out")

    def broken(folder: Path) -> None:
        raise ValueError("not an OSError")

    with pytest.raises(ValueError, match="not an OSError"):
        rundir.create_whole(tmp_path / "run2", RUN_MARKER, {}, "x", broken)

    def full(folder: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "config.json"))

    with pytest.raises(OSError) as e:
        rundir.create_whole(tmp_path / "run3", RUN_MARKER, {}, "x", full)
    assert (e.value.errno, e.value.strerror, e.value.filename) == (
        errno.ENOSPC, "No space left on device", str(tmp_path / "run3" / "config.json"))  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "taken"]
    rundir.create_whole(tmp_path / "a" / "b" / "run", RUN_MARKER, {}, "x", lambda d: None).release()
    assert (tmp_path / "a" / "b" / "run" / RUN_MARKER).is_file()


def test_a_killed_starts_sibling_is_removed_by_the_next_start_and_nothing_else(tmp_path, caplog):
    killed = new_run(tmp_path / ".run.roli-new-k1")
    users = tmp_path / ".run.roli-new-mine"
    users.mkdir()
    (users / "a.txt").write_text("a user's folder with that name")
    busy = new_run(tmp_path / ".run.roli-new-b2")
    (tmp_path / ".run.roli-new-lnk").symlink_to(busy)
    with rundir.RunLock(busy, "starting"):
        with caplog.at_level("INFO", logger="roli.train"):
            new_run(tmp_path / "run")
    assert not killed.exists() and users.is_dir() and busy.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".run.roli-new-b2", ".run.roli-new-lnk",
                                                          ".run.roli-new-mine", "run"]  # fmt: skip
    assert messages(caplog) == [f"removed .run.roli-new-k1, left by a start of {tmp_path / 'run'} that was killed"]


def test_overwrite_warns_of_the_files_it_kept(tmp_path, caplog):
    run = new_run(tmp_path / "run")
    for i in range(6):
        (run / f"mine{i}.txt").write_text("a user's")
    with caplog.at_level("WARNING", logger="roli.train"):
        rundir.open_run_dir(run, False, True, "x", lambda d: None).release()
    assert messages(caplog) == [f"--overwrite: kept 6 file(s) roli did not write in {run}: mine0.txt, mine1.txt, "
                                "mine2.txt, mine3.txt, mine4.txt ..."]  # fmt: skip
    (run / "mine5.txt").unlink()
    caplog.clear()
    with caplog.at_level("WARNING", logger="roli.train"):
        rundir.open_run_dir(run, False, True, "x", lambda d: None).release()
        rundir.open_run_dir(run, True, True, "x", lambda d: None).release()  # --resume: nothing removed, no warning
    assert messages(caplog) == [f"--overwrite: kept 5 file(s) roli did not write in {run}: mine0.txt, mine1.txt, "
                                "mine2.txt, mine3.txt, mine4.txt"]  # fmt: skip


def test_a_start_removes_roli_temporaries_and_keeps_a_users(tmp_path):
    run = new_run(tmp_path / "run")
    with open(run / MANIFEST, "a") as f:
        f.write(json.dumps({"tmp": ".results.json.k1.tmp"}) + "\n")
    (run / ".results.json.k1.tmp").write_text("a killed write")
    (run / ".notes.txt.k2.tmp").write_text("a user's")
    rundir.open_run_dir(run, True, False, "x", lambda d: None).release()
    assert names(run) == [".notes.txt.k2.tmp", rundir.LOCK, MANIFEST, RUN_MARKER, "config.json"]


def test_digests_write_paths_as_text():
    assert rundir._digest({"ckpt": Path("/a/b.pt"), "lr": 0.1}) == digest({"ckpt": "/a/b.pt", "lr": 0.1})


def test_the_lock_refuses_a_fifo_and_names_an_error_it_cannot_open_with(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    os.mkfifo(run / rundir.LOCK)
    assert refusal(rundir.RunLock(run, "x").acquire) == (
        f"run directory {run}: its lock .roli-lock is not a plain file; move it away"
    )
    (run / rundir.LOCK).unlink()

    def denied(*args):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(rundir.os, "open", denied)
    assert refusal(rundir.RunLock(run, "x").acquire) == (
        f"run directory {run}: its lock .roli-lock is Permission denied, not roli's lock file; move it away"
    )


def test_a_non_empty_folder_without_flags_is_not_empty_before_it_is_linked(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "lp").symlink_to(tmp_path)
    assert refusal(rundir.check_run_dir, run, False, False).startswith(f"run directory {run} is not empty;")
    assert "holds a symlink roli did not make (lp)" in refusal(rundir.check_run_dir, run, True, False)


def test_a_new_run_in_an_empty_folder_or_through_a_link_to_one(tmp_path):
    held = []
    for run in (tmp_path / "empty", tmp_path / "link"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        if run.name == "link":
            (tmp_path / "real").mkdir()
            run.symlink_to(tmp_path / "real")
        lock = rundir.open_run_dir(
            run, False, False, "roli train x", lambda d: held.append((d / rundir.LOCK).read_text())
        )
        lock.release()
        marker = json.loads((run / RUN_MARKER).read_text())
        assert marker == {"format": "roli run 2", "run": marker["run"], "created_by": "roli train",
                          "note": "roli deletes (--overwrite) and resumes only directories holding this file, and "
                          "only the files it wrote there (listed in .roli-manifest.jsonl)"}  # fmt: skip
    assert run.is_symlink() and (tmp_path / "real" / RUN_MARKER).is_file()
    rundir.open_run_dir(
        tmp_path / "empty", True, False, "roli train y", lambda d: held.append((d / rundir.LOCK).read_text())
    ).release()
    assert held == [f"pid {os.getpid()}: roli train x"] * 2 + [f"pid {os.getpid()}: roli train y"]


def test_resuming_an_earlier_rolis_run_removes_only_rolis_temporaries(tmp_path):
    run = tmp_path / "old"
    (run / "alp").mkdir(parents=True)
    (run / RUN_MARKER).write_text(json.dumps({"created_by": "roli train"}))
    for rel in ("alp/.best.pt.k1.tmp", ".notes.txt.k2.tmp", "config.json"):
        (run / rel).write_text(rel)
    rundir.open_run_dir(run, True, False, "x", lambda d: None).release()
    assert names(run) == [".notes.txt.k2.tmp", rundir.LOCK, RUN_MARKER, "config.json"]
