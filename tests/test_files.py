"""roli.data.files one function at a time on tiny image files written here: what counts as an image, the content
digests (computed here with hashlib), class selection and order, split-file and folder errors word for word, the
loader's epochs. Written for mutmut's survivors of 2026-12-06 on roli/data/files.py."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from roli.data import files
from roli.data.files import FileData, image_folder, json_split, label_order


def png(path: Path, seed: int, size=(6, 5)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
    return path


def image_bytes(fmt: str, size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def test_what_counts_as_an_image(monkeypatch):
    assert files._not_an_image(b"") == "empty file"
    assert files._not_an_image(image_bytes("PNG")) is None and files._not_an_image(image_bytes("JPEG")) is None
    assert files._not_an_image(b"hello") == "UnidentifiedImageError: cannot identify image file"  # no object address
    jpeg = image_bytes("JPEG", (64, 64))
    assert files._not_an_image(jpeg[: len(jpeg) // 2]) is not None  # cut short: its data is read, at 1/8 scale
    png_ = bytearray(image_bytes("PNG"))
    png_[-20] ^= 0xFF  # a flipped bit in a chunk: its CRC fails
    assert files._not_an_image(bytes(png_)) is not None
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 256 pixels: more than 2x the limit is an error already
    assert files._not_an_image(image_bytes("PNG", (16, 16))).startswith("DecompressionBombError")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # between 1x and 2x: PIL only warns; roli refuses
    assert files._not_an_image(image_bytes("PNG", (16, 16))).startswith("DecompressionBombWarning")


def test_files_are_checked_in_order_serially_or_in_a_pool(tmp_path, monkeypatch):
    paths = [png(tmp_path / f"{i}.png", i) for i in range(5)]
    (tmp_path / "bad.png").write_bytes(b"text")
    paths = [str(p) for p in [*paths[:2], tmp_path / "bad.png", *paths[2:]]]
    expected = [(hashlib.sha256(Path(p).read_bytes()).hexdigest(), None if "bad" not in p else "x") for p in paths]
    serial = list(files._checked(paths, workers=1))
    monkeypatch.setattr(files, "PARALLEL_FROM", 2)
    pooled = list(files._checked(paths, workers=2))
    assert serial == pooled
    assert [(d, w if w is None else "x") for d, w in serial] == expected


def data_of(tmp_path: Path, n: int = 4, classes: int = 2) -> FileData:
    items = [(png(tmp_path / f"c{i % classes}" / f"{i}.png", i), i % classes) for i in range(n)]
    return FileData(items, classes, "tiny", [f"c{c}" for c in range(classes)])


def test_content_digests_cover_paths_bytes_sizes_mtimes_and_labels(tmp_path):
    data = data_of(tmp_path)
    full, stat = hashlib.sha256(), hashlib.sha256()
    for path, label in data.items:
        full.update(f"{path}\0{hashlib.sha256(path.read_bytes()).hexdigest()}\n".encode())
        st = os.stat(path)
        stat.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{label}\n".encode())
    assert data.content_digest() == full.hexdigest() and data.content_digest("full", workers=1) == full.hexdigest()
    assert data.content_digest("stat") == stat.hexdigest()
    h = hashlib.sha256()
    data.hash_into(h)
    assert h.hexdigest() == stat.hexdigest()
    for i in range(7):
        (tmp_path / f"bad{i}.png").write_bytes(b"")
    bad = FileData([(tmp_path / f"bad{i}.png", 0) for i in range(7)], 2, "tiny")
    with pytest.raises(ValueError) as e:
        bad.content_digest()
    assert str(e.value) == "tiny: unreadable image(s): " + "; ".join(f"{tmp_path / f'bad{i}.png'} (empty file)"
                                                                      for i in range(5))  # fmt: skip


def test_sample_parts_shape_and_float_images(tmp_path):
    data = data_of(tmp_path)
    parts = data.sample_parts()
    assert parts == {"labels": ([0, 1, 0, 1],), "files": ([str(p) for p, _ in data.items],
                                                         [p.stat().st_size for p, _ in data.items])}  # fmt: skip
    data.items[0][0].unlink()
    assert data.sample_parts()["files"][1][0] == -1  # gone since: its size is -1
    data = data_of(tmp_path / "again")
    x, y = data.to_float()
    raw = torch.stack(
        [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p, _ in data.items]
    )
    assert torch.equal(x, raw.float() / 255) and x.dtype == torch.float32 and torch.equal(y, torch.tensor([0, 1, 0, 1]))
    assert data.image_shape() is None
    crop = type("Crop", (), {"crop_size": 4, "__call__": lambda self, img: img[:, :4, :4]})()
    cropped = data.with_transform(crop)
    assert cropped.image_shape() == (3, 4, 4) and cropped[1][0].shape == (3, 4, 4) and cropped[1][1] == 1
    sub = cropped.subset(torch.tensor([3, 1]))
    assert (
        [p.name for p, _ in sub.items] == ["3.png", "1.png"] and sub.transform is crop and sub.classes == ["c0", "c1"]
    )


def test_a_class_subset_is_relabelled_in_the_order_given(tmp_path):
    data = data_of(tmp_path, n=8, classes=4)
    picked = data.select_classes([3, 1])
    assert [(p.name, y) for p, y in picked.items] == [("1.png", 1), ("3.png", 0), ("5.png", 1), ("7.png", 0)]
    assert picked.num_classes == 2 and picked.classes == ["c3", "c1"] and picked.name == "tiny"
    unnamed = FileData(data.items, 4, "x")
    assert unnamed.select_classes([2]).classes is None and [y for _, y in unnamed.select_classes([2]).items] == [0, 0]


def test_file_data_refuses_missing_files_and_labels_out_of_range(tmp_path):
    good = png(tmp_path / "a.png", 0)
    missing = [tmp_path / f"gone{i}.png" for i in range(4)]
    with pytest.raises(ValueError) as e:
        FileData([(good, 0)] + [(m, 0) for m in missing], 2, "split")
    assert str(e.value) == f"split: 4 image files are missing, e.g. {missing[0]}, {missing[1]}, {missing[2]}"
    for label in (2, -1):
        with pytest.raises(ValueError) as e:
            FileData([(good, 0), (good, label)], 2, "split")
        assert str(e.value) == f"split: labels out of range [0, 2): [('{good}', {label})]"
    FileData([(good, 1)], 2, "split")


def test_verify_names_the_first_unreadable_images(tmp_path):
    bad = []
    for i in range(4):
        (tmp_path / f"b{i}.png").write_bytes(b"no")
        bad.append((tmp_path / f"b{i}.png", 0))
    data = FileData([(png(tmp_path / "ok.png", 0), 0), *bad], 1, "split")
    with pytest.raises(ValueError) as e:
        data.verify(limit=2)
    text = str(e.value)
    assert text.startswith(f"split: unreadable images: unreadable image {tmp_path / 'b0.png'}: cannot identify")
    assert text.count("unreadable image ") == 2 and "b2.png" not in text
    FileData([(tmp_path / "ok.png", 0)], 1, "split").verify()


def test_loader_epochs_are_a_function_of_seed_and_epoch(tmp_path):
    data = data_of(tmp_path, n=12, classes=3)

    def order(loader, epoch):
        loader.set_epoch(epoch)
        return torch.cat([y for _, y in loader]).tolist(), [x.shape for x, _ in loader]

    a, b = data.loader(5, shuffle=True, seed=1, workers=0), data.loader(5, shuffle=True, seed=1, workers=0)
    assert len(a) == 3 and order(a, 2) == order(b, 2)
    assert order(a, 2)[0] != order(a, 3)[0]  # another epoch, another order (12! orders: equal by chance ~never)
    assert order(data.loader(5, shuffle=True, seed=2, workers=0), 2)[0] != order(a, 2)[0]
    plain = data.loader(5, workers=0)
    assert order(plain, 0)[0] == [0, 1, 2] * 4 and order(plain, 0)[1][-1] == (2, 3, 6, 5)
    assert len(data.loader(5, workers=0, drop_last=True)) == 2
    halves = [data.loader(4, shuffle=True, seed=1, workers=0, rank=r, world=2) for r in (0, 1)]
    for h in halves:
        h.set_epoch(1)
    seen = [torch.cat([y for _, y in h]) for h in halves]
    assert len(seen[0]) == len(seen[1]) == 6  # each rank its share of the epoch
    assert halves[0].dl.sampler.epoch == 1 and halves[0].dl.sampler.rank == 0 and halves[1].dl.sampler.rank == 1
    first = [y for _, y in data.batches(12, shuffle=True, seed=1)]
    second = [y for _, y in data.batches(12, shuffle=True, seed=1)]
    assert torch.equal(first[0], second[0])


def test_image_folder_errors_and_suffixes(tmp_path):
    with pytest.raises(ValueError) as e:
        image_folder(tmp_path / "none")
    assert str(e.value) == f"image folder not found: {tmp_path / 'none'}"
    root = tmp_path / "train"
    root.mkdir()
    with pytest.raises(ValueError) as e:
        image_folder(root)
    assert str(e.value) == f"{root}: no class sub-folders"
    (root / "cat").mkdir()
    (root / "cat" / "notes.txt").write_text("x")
    with pytest.raises(ValueError) as e:
        image_folder(root)
    assert str(e.value) == f"{root}: no images (looked for {', '.join(sorted(files.IMAGE_SUFFIXES))})"
    png(root / "cat" / "a.PNG", 0)
    png(root / "cat" / "sub" / "b.png", 1)
    png(root / "dog" / "c.jpg", 2)
    data = image_folder(root)
    assert [(p.relative_to(root).as_posix(), y) for p, y in data.items] == [("cat/a.PNG", 0), ("cat/sub/b.png", 0),
                                                                          ("dog/c.jpg", 1)]  # fmt: skip
    assert data.classes == ["cat", "dog"] and data.name == "train" and data.num_classes == 2
    test = image_folder(root, classes=["cat", "dog", "emu"])  # the train split's classes: an empty class is fine
    assert test.num_classes == 3 and [y for _, y in test.items] == [0, 0, 1]
    with pytest.raises(ValueError) as e:
        image_folder(root, classes=["dog"])
    assert str(e.value) == f"{root}: class folders that the train split does not have: cat"


def test_label_order_is_numeric_where_every_label_is_a_number():
    assert label_order(["10", "9", "001", "1"]) == ["001", "1", "9", "10"]  # "001" and "1": both 1, by text
    assert label_order(["b", "a", "10", "9"]) == ["10", "9", "a", "b"]
    assert [files._label_key(v) for v in (0, 3, -1, True, "001", " ", "", 1.5, None)] == [
        "0", "3", None, None, "001", None, None, None, None]  # fmt: skip


def test_split_file_errors_word_for_word(tmp_path):
    root = tmp_path / "images"
    png(root / "a.png", 0)
    png(root / "b.png", 1)
    split = tmp_path / "train.json"
    cases = [
        (None, f"JSON split file not found: {split}"),
        (b"{", f"{split} is not valid JSON: Expecting property name enclosed in double quotes: line 1 column 2 "
               "(char 1)"),
        (b"\xff\xfe", f"{split} is not a text (JSON) file"),
        (b"{}", f"{split} must hold a non-empty object {{relative_path: label}}"),
        (b"[1]", f"{split} must hold a non-empty object {{relative_path: label}}"),
        (json.dumps({"/etc/x.png": 0, "../b.png": 1, "a.png": 0}).encode(),
         f"{split}: paths must stay inside the image root (relative, no '..'); got e.g. ['/etc/x.png', '../b.png']"),
        (json.dumps({"a.png": 0, "b.png": 1.5}).encode(),
         f"{split}: labels must be integers >= 0 or class names; got e.g. [('b.png', 1.5)]"),
    ]  # fmt: skip
    for content, why in cases:
        if content is not None:
            split.write_bytes(content)
        with pytest.raises(ValueError) as e:
            json_split(split, root)
        assert str(e.value) == why
    split.write_text(json.dumps({"a.png": 0}))
    with pytest.raises(ValueError) as e:
        json_split(split, tmp_path / "nowhere")
    assert str(e.value) == f"image root not found: {tmp_path / 'nowhere'}"
    split.write_text(json.dumps({"a.png": "dog", "b.png": "cat"}))
    train = json_split(split, root)
    assert train.classes == ["cat", "dog"] and [y for _, y in train.items] == [1, 0] and train.name == "train"
    test = tmp_path / "test.json"
    test.write_text(json.dumps({"a.png": "emu", "b.png": "owl"}))
    with pytest.raises(ValueError) as e:
        json_split(test, root, classes=train.classes)
    assert str(e.value) == f"{test}: label 'emu' (e.g. a.png) is not among the train split's 2 classes; 2 such labels"
    test.write_text(json.dumps({"a.png": "emu", "b.png": "cat"}))
    with pytest.raises(ValueError) as e:
        json_split(test, root, classes=train.classes)
    assert str(e.value) == f"{test}: label 'emu' (e.g. a.png) is not among the train split's 2 classes"
    test.write_text(json.dumps({"b.png": "dog"}))
    assert json_split(test, root, classes=train.classes).num_classes == 2


def test_an_unreadable_image_is_named_when_decoded(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not an image")
    with pytest.raises(ValueError) as e:
        files._decode(tmp_path / "x.png")
    assert str(e.value).startswith(f"unreadable image {tmp_path / 'x.png'}: cannot identify image file")
    x = files._decode(png(tmp_path / "y.png", 3, size=(5, 7)))
    assert x.shape == (3, 5, 7) and x.dtype == torch.uint8 and x.is_contiguous()


class FakeContext:
    """multiprocessing's fork context as _checked uses it: a Pool that maps in this process and records itself."""

    def __init__(self, calls):
        self.calls = calls

    def Pool(self, workers):  # noqa: N802 - multiprocessing's name
        calls = self.calls

        class Pool:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def map(self, fn, items, chunksize):
                calls.append((workers, chunksize))
                return [fn(i) for i in items]

        return Pool()


def test_a_pool_checks_large_sets_on_every_cpu(tmp_path, monkeypatch):
    import multiprocessing

    paths = [str(png(tmp_path / f"{i}.png", i)) for i in range(3)]
    calls, contexts = [], []
    monkeypatch.setattr(multiprocessing, "get_context", lambda kind: contexts.append(kind) or FakeContext(calls))
    monkeypatch.setattr(files, "PARALLEL_FROM", 3)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    expected = [(hashlib.sha256(Path(p).read_bytes()).hexdigest(), None) for p in paths]
    assert list(files._checked(paths)) == expected and calls == [(4, 64)] and contexts == ["fork"]
    assert list(files._checked(paths, workers=3)) == expected and calls[-1] == (3, 64)
    assert list(files._checked(paths, workers=2)) == expected and calls[-1] == (2, 64)
    calls.clear()
    files._checked(paths, workers=1)  # one worker, or fewer files than PARALLEL_FROM: in this process
    files._checked(paths[:2], workers=4)
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    files._checked(paths)
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["spawn"])  # no fork on this platform
    files._checked(paths)
    assert calls == []
    monkeypatch.setattr(multiprocessing, "get_all_start_methods", lambda: ["fork", "spawn"])
    data = FileData([(Path(p), 0) for p in paths], 1, "x")
    data.content_digest("full", workers=3)
    assert calls == [(3, 64)]


def test_a_jpeg_is_checked_at_an_eighth_of_its_size(monkeypatch):
    from PIL import JpegImagePlugin

    drafts = []
    draft = JpegImagePlugin.JpegImageFile.draft
    spy = lambda self, mode, size: drafts.append((mode, size)) or draft(self, mode, size)  # noqa: E731
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    files._not_an_image(image_bytes("JPEG", (40, 64)))  # 40 rows, 64 columns
    files._not_an_image(image_bytes("JPEG", (7, 7)))
    files._not_an_image(image_bytes("PNG", (40, 64)))
    assert drafts == [("RGB", (8, 5)), ("RGB", (1, 1))]


def test_the_reason_is_the_errors_first_line_cut_at_120(monkeypatch):
    for error, reason in ((ValueError("x" * 200 + "\nsecond"), "ValueError: " + "x" * 120), (OSError(), "OSError")):

        def broken(*args, error=error, **kw):
            raise error

        monkeypatch.setattr(Image, "open", broken)
        assert files._not_an_image(b"bytes") == reason


def test_lists_in_messages_stop_at_their_limits(tmp_path):
    good = png(tmp_path / "a.png", 0)
    with pytest.raises(ValueError) as e:
        FileData([(good, 5), (good, 6), (good, 7), (good, 8)], 2, "s")
    assert str(e.value).endswith(f"[('{good}', 5), ('{good}', 6), ('{good}', 7)]")
    split = tmp_path / "s.json"
    split.write_text(json.dumps({f"/x{i}.png": 0 for i in range(5)}))
    with pytest.raises(ValueError) as e:
        json_split(split, tmp_path)
    assert str(e.value).endswith("got e.g. ['/x0.png', '/x1.png', '/x2.png']")
    split.write_text(json.dumps({f"x{i}.png": -1 for i in range(5)}))
    with pytest.raises(ValueError) as e:
        json_split(split, tmp_path)
    assert str(e.value).endswith("got e.g. [('x0.png', -1), ('x1.png', -1), ('x2.png', -1)]")
    root = tmp_path / "train"
    for c in "abcdefg":
        png(root / c / "1.png", 0)
    with pytest.raises(ValueError) as e:
        image_folder(root, classes=["a"])
    assert str(e.value).endswith("the train split does not have: b, c, d, e, f")
    for i in range(2):
        (tmp_path / f"b{i}.png").write_bytes(b"")
    with pytest.raises(ValueError) as e:
        FileData([(tmp_path / f"b{i}.png", 0) for i in range(2)], 1, "s").verify()
    assert str(e.value).count("; unreadable image ") == 1


def test_derived_data_keep_name_transform_and_the_loaders_defaults(tmp_path):
    from torch.utils.data.distributed import DistributedSampler

    flip = type("Flip", (), {"__call__": lambda self, img: img.flip(-1)})()
    data = data_of(tmp_path, n=12, classes=3).with_transform(flip)
    assert data.name == "tiny" and data.subset(torch.tensor([0])).name == "tiny"
    assert data.select_classes([2, 0]).transform is flip
    loader = data.loader(5)
    assert loader.dl.num_workers == 2 and loader.dl.persistent_workers is True and loader.dl.pin_memory is False
    assert not isinstance(loader.dl.sampler, DistributedSampler)
    assert data.loader(5, workers=1).dl.persistent_workers is True
    assert data.loader(5, workers=0).dl.persistent_workers is False

    def labels(loader, epoch=0):
        loader.set_epoch(epoch)
        return torch.cat([y for _, y in loader]).tolist()

    assert labels(data.loader(5, shuffle=True, workers=0)) == labels(data.loader(5, shuffle=True, seed=0, workers=0))
    ranks = [data.loader(6, world=2, rank=r, workers=0, seed=4) for r in (0, 1)]
    assert [labels(r) for r in ranks] == [[0, 2, 1, 0, 2, 1], [1, 0, 2, 1, 0, 2]]  # in order, every other example
    assert ranks[0].dl.sampler.seed == 4 and ranks[0].dl.sampler.shuffle is False
    assert data.loader(6, world=2, rank=1, shuffle=True, workers=0).dl.sampler.shuffle is True
    ordered = [y for _, y in data.batches(12)]
    assert ordered[0].tolist() == [0, 1, 2] * 4
    one, two = ([y for _, y in data.batches(12, shuffle=True, seed=s)][0].tolist() for s in (1, 2))
    assert one != two and sorted(one) == sorted(two)


def test_defaults_a_user_relies_on(tmp_path):
    gray = tmp_path / "g.png"
    Image.fromarray(np.arange(20, dtype=np.uint8).reshape(4, 5), mode="L").save(gray)
    x = files._decode(gray)  # a grayscale file: three equal channels
    assert x.shape == (3, 4, 5) and torch.equal(x[0], x[2]) and x[1, 3, 4] == 19
    bad = []
    for i in range(7):
        (tmp_path / f"b{i}.png").write_bytes(b"")
        bad.append((tmp_path / f"b{i}.png", 0))
    with pytest.raises(ValueError) as e:
        FileData(bad, 1, "s").verify()
    assert str(e.value).count("unreadable image ") == 5
    data = data_of(tmp_path / "d", n=12, classes=3)
    default, zero = ([y for _, y in b][0].tolist() for b in (data.batches(12, shuffle=True),
                                                              data.batches(12, shuffle=True, seed=0)))  # fmt: skip
    assert default == zero and data.batches(12).loader.dl.num_workers == 0
