"""A run is bound to the content of what it read: every image of array data (not a sample), every image file's
bytes (not its size), and the sha256 of the backbone checkpoint. Changed under a run, each is refused on
--resume and evaluate --run in one line naming what changed, and nothing in the run is touched."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_run_safety import one_line, tree_hash

from roli.evaluate import main as evaluate
from roli.train import main as train

QUICK = ["--eps", "0.1", "--step-size", "0.05", "--steps", "1", "--val-steps", "1", "--epochs", "2", "--warmup", "0"]


def unfinished(run: Path) -> None:
    """As a run killed in its last stage leaves it: --resume would train again."""
    for done in run.glob("*/done.json"):
        done.unlink()


def test_one_array_image_outside_any_sample_changed_is_refused(tmp_path, capsys):
    rng = np.random.default_rng(0)
    y = np.arange(400) % 4
    x = (rng.random((400, 8, 8)) * 0.3 + y[:, None, None] * 0.2).astype(np.float32)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x[:200], y_train=y[:200], x_test=x[200:], y_test=y[200:])
    run = tmp_path / "run"
    assert (
        train(["--method", "alp", "--dataset", f"npz:{data}", *QUICK, "--random-backbone", "--run-dir", str(run)]) == 0
    )
    x_test = x[200:].copy()
    x_test[1] = rng.random((8, 8))  # image 1 of 200: not among the 64 evenly spread ones the old fingerprint took
    np.savez(data, x_train=x[:200], y_train=y[:200], x_test=x_test, y_test=y[200:])
    unfinished(run)
    before = tree_hash(run)
    capsys.readouterr()
    assert train(["--resume", str(run)]) == 2
    one_line(capsys, "resume: the test split's images changed since the run started")
    assert evaluate(["--run", str(run)]) == 2
    one_line(capsys, "the test split's images changed since the run started")
    assert tree_hash(run) == before


def _bmp_folder(root: Path) -> Path:
    """Two classes of 8x8 RGB BMPs (uncompressed: every file the same size), train and test."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, n in (("train", 24), ("test", 8)):
        for c in range(2):
            (root / split / f"class{c}").mkdir(parents=True)
            for i in range(n):
                pixels = (rng.random((8, 8, 3)) * 100 + 120 * c).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"{i}.bmp")
    return root


def test_same_size_image_files_swapped_are_refused_and_the_hash_is_timed(tmp_path, capsys):
    root = _bmp_folder(tmp_path / "images")
    run = tmp_path / "run"
    argv = ["--method", "alp", "--dataset", f"imagefolder:{root}", "--resize", "8", "--crop-size", "8", *QUICK,
            "--random-backbone", "--workers", "0"]  # fmt: skip
    assert train([*argv, "--run-dir", str(run)]) == 0
    assert "data fingerprint: 64 image files, every file's bytes, in " in capsys.readouterr().err
    a, b = root / "test" / "class0" / "3.bmp", root / "test" / "class1" / "5.bmp"
    assert a.stat().st_size == b.stat().st_size
    data_a, data_b = a.read_bytes(), b.read_bytes()
    a.write_bytes(data_b)  # the labels now lie: sizes, names and the file list are as they were
    b.write_bytes(data_a)
    unfinished(run)
    before = tree_hash(run)
    assert train(["--resume", str(run)]) == 2
    one_line(capsys, "resume: the test split's images changed since the run started")
    assert tree_hash(run) == before
    assert train([*argv, "--data-hash", "stat", "--run-dir", str(tmp_path / "r2")]) == 0  # the explicit opt-out
    assert "data fingerprint: 64 image files, sizes and mtimes only (--data-hash stat), in " in capsys.readouterr().err
    fp = json.loads((tmp_path / "r2" / "fingerprint.json").read_text())
    assert fp["test"]["content"] != json.loads((run / "fingerprint.json").read_text())["test"]["content"]


def test_a_replaced_backbone_file_is_refused(tmp_path, capsys, checkpoint):
    backbone = tmp_path / "backbone.pt"
    backbone.write_bytes(checkpoint.read_bytes())
    run = tmp_path / "run"
    argv = ["--method", "alp", "--dataset", "digits", "--classes", "0-3", *QUICK, "--checkpoint", str(backbone)]
    assert train([*argv, "--run-dir", str(run)]) == 0
    fp = json.loads((run / "fingerprint.json").read_text())
    assert fp["inputs"]["--checkpoint"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    key = next(k for k, v in state["state_dict"].items() if v.is_floating_point())
    state["state_dict"][key] = state["state_dict"][key] + 0.01  # another backbone, same path
    torch.save(state, backbone)
    unfinished(run)
    before = tree_hash(run)
    capsys.readouterr()
    assert train(["--resume", str(run)]) == 2
    one_line(capsys, "resume: the file of --checkpoint (its sha256) changed since the run started")
    assert tree_hash(run) == before
    backbone.write_bytes(checkpoint.read_bytes())  # the original back: resumes
    assert train(["--resume", str(run)]) == 0


@pytest.mark.parametrize("mode", ["full", "stat", "full-in-2-processes"])
def test_data_hash_modes_against_a_hand_computation(tmp_path, mode, monkeypatch):
    """FileData.content_digest against hashlib over the files as the docstring says, written out here; the pool
    of processes (large sets) gives the same digest and names a bad file as one process does."""
    import roli
    import roli.data.files as files

    if mode == "full-in-2-processes":
        monkeypatch.setattr(files, "PARALLEL_FROM", 2)
        mode = "full"

    root = _bmp_folder(tmp_path / "images")
    test = roli.load_dataset(f"imagefolder:{root}", resize=8, crop_size=8, train_augment=False).test
    h = hashlib.sha256()
    for path, label in sorted((p, int(p.parent.name[-1])) for p in (root / "test").rglob("*.bmp")):
        if mode == "full":
            h.update(f"{path}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
        else:
            st = path.stat()
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    assert test.content_digest(mode, workers=2) == h.hexdigest()
    if mode == "full":
        (root / "test" / "class1" / "2.bmp").write_text("no image")
        with pytest.raises(ValueError, match=r"unreadable image\(s\): .*class1/2\.bmp \("):
            test.content_digest(mode, workers=2)


@pytest.mark.parametrize("case", ["empty", "text", "corrupt", "truncated-jpeg", "bomb"])
def test_a_bad_image_file_is_found_before_anything_is_written(tmp_path, capsys, monkeypatch, case):
    root = _bmp_folder(tmp_path / "images")
    bad = root / "train" / "class1" / "7.bmp"
    if case == "empty":
        bad.write_bytes(b"")
    elif case == "text":
        bad.write_text("not an image, a note saved with the wrong name\n")
    elif case == "corrupt":
        data = bytearray(bad.read_bytes())
        data[2:6] = b"\xff\xff\xff\x7f"  # the BMP header's file size, then the pixel offset: nonsense
        data[10:14] = b"\xff\xff\xff\x7f"
        bad.write_bytes(bytes(data))
    elif case == "truncated-jpeg":  # a download cut short: its header (and verify()) are fine
        import io

        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray((np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8)).save(buf, "JPEG")
        bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 6 // 10])
    else:
        from PIL import Image

        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20)  # an 8x8 image counts as a bomb: more than twice that
    run = tmp_path / "run"
    argv = ["--method", "alp", "--dataset", f"imagefolder:{root}", "--resize", "8", "--crop-size", "8", *QUICK,
            "--random-backbone", "--workers", "0", "--run-dir", str(run)]  # fmt: skip
    assert train(argv) == 2
    line = one_line(capsys, "dataset: train: unreadable image(s): ")
    assert (str(bad) in line) if case != "bomb" else ("DecompressionBomb" in line)
    assert not run.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["images"]
