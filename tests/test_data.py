"""Datasets: every format on tiny generated data, splits, loaders, transforms, bad input; real CIFAR-10."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from roli.data import ArrayData, ProtocolTransform, load_dataset
from roli.data.transforms import resize_shorter

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "cifar10.npz"


def test_digits_split_and_uint8():
    s = load_dataset("digits")
    assert isinstance(s.train, ArrayData) and s.train.x.dtype == torch.uint8 and s.train.x.shape[1:] == (1, 8, 8)
    assert len(s.train) + len(s.val) == 1437 and len(s.test) == 360 and s.num_classes == 10
    assert abs(len(s.val) - round(1437 * 0.1)) <= 10  # 10% of each class, rounded per class
    counts, per_class = torch.bincount(s.val.y, minlength=10), torch.bincount(s.train.y, minlength=10) + torch.bincount(
        s.val.y, minlength=10)  # fmt: skip
    assert ((counts - per_class * 0.1).abs() <= 0.5).all() and "stratified by class, seed 0" in s.val_split
    seeded = load_dataset("digits", split_seed=1)
    assert not torch.equal(seeded.val.y, s.val.y) and len(seeded.val) == len(s.val)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NHW", "float"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 6, 5, 3), dtype=np.uint8)  # NHWC
    arr = {"NHWC": x, "NCHW": x.transpose(0, 3, 1, 2), "NHW": x[..., 0], "float": x / 255.0}[layout]
    y = rng.integers(0, 4, 20)
    np.savez(tmp_path / "d.npz", x_train=arr, y_train=y, x_test=arr[:5], y_test=y[:5])
    s = load_dataset(f"npz:{tmp_path / 'd.npz'}")
    want = torch.from_numpy(x.transpose(0, 3, 1, 2)[:, :1] if layout == "NHW" else x.transpose(0, 3, 1, 2))
    got = torch.cat([s.train.x, s.val.x])
    order = torch.cat([s.train.y, s.val.y])
    assert got.dtype == torch.uint8 and len(s.val) >= 1 and len(s.test) == 5
    rows = sorted(zip([r.numpy().tobytes() for r in got], order.tolist(), strict=True))  # the split reorders rows
    assert rows == sorted(zip([r.numpy().tobytes() for r in want], y.tolist(), strict=True))


def test_npz_bad_input(tmp_path):
    np.savez(tmp_path / "neg.npz", x=np.zeros((3, 4, 4), np.uint8), y=np.array([0, -1, 2]))
    with pytest.raises(ValueError, match=r"labels out of range at indices \[1\]"):
        load_dataset(f"npz:{tmp_path / 'neg.npz'}")
    np.savez(tmp_path / "size.npz", x=np.zeros((3, 4, 4), np.uint8), y=np.array([0, 1]))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        load_dataset(f"npz:{tmp_path / 'size.npz'}")
    np.savez(tmp_path / "keys.npz", images=np.zeros((3, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="expected arrays"):
        load_dataset(f"npz:{tmp_path / 'keys.npz'}")
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="needs a path"):
        load_dataset("cifar10")


def _write_cifar(root: Path, which: str, rng) -> tuple[np.ndarray, np.ndarray]:
    if which == "cifar10":
        base, names, key, k = (
            root / "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
            b"labels",
            10,
        )
    else:
        base, names, key, k = root / "cifar-100-python", ["train", "test"], b"fine_labels", 100
    base.mkdir(parents=True)
    xs, ys = [], []
    for name in names:
        x = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        y = rng.integers(0, k, 4).tolist()
        with open(base / name, "wb") as f:
            pickle.dump({b"data": x, key: y, b"filenames": [b"a"] * 4}, f)
        xs.append(x)
        ys.append(np.array(y))
    return np.concatenate(xs), np.concatenate(ys)


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_cifar_pickle_layout(tmp_path, which):
    x, y = _write_cifar(tmp_path, which, np.random.default_rng(1))
    s = load_dataset(f"{which}:{tmp_path}", val_percent=25)
    n_test = 4
    got_x = torch.cat([s.train.x, s.val.x, s.test.x])
    assert torch.equal(got_x, torch.from_numpy(x.reshape(-1, 3, 32, 32)))
    assert torch.equal(torch.cat([s.train.y, s.val.y, s.test.y]), torch.from_numpy(y))
    assert len(s.test) == n_test and s.num_classes == (10 if which == "cifar10" else 100)


def test_tfds_record_order_matches_tensorflow_datasets():
    """The first and last keys of TFDS's CIFAR order, as TFDS 4.9.10's own core/hashing.Hasher sorts the keys
    0..n-1 of each split (run once by hand on the whole splits: equal to roli's order on every key)."""
    from roli.data.arrays import tfds_order

    train, test = tfds_order("train", 50000), tfds_order("test", 10000)
    assert train[:8].tolist() == [16399, 1680, 47917, 17307, 27051, 48736, 26263, 1456]
    assert train[-3:].tolist() == [5073, 39601, 32842]
    assert test[:8].tolist() == [9933, 5669, 163, 6686, 4747, 131, 9167, 1579]
    assert test[-3:].tolist() == [3829, 8858, 4202]
    assert sorted(train.tolist()) == list(range(50000))


def test_cifar_in_tfds_order_takes_the_reference_split(tmp_path):
    from roli.data.arrays import tfds_order

    x, y = _write_cifar(tmp_path, "cifar10", np.random.default_rng(2))  # 20 train images, 4 test
    s = load_dataset(f"cifar10:{tmp_path}", val_percent=25, record_order="tfds")
    images = torch.from_numpy(x.reshape(-1, 3, 32, 32))
    order = tfds_order("train", 20)
    assert torch.equal(s.train.x, images[order[:15]]) and torch.equal(s.val.x, images[order[15:]])
    assert torch.equal(s.test.x, images[20:][tfds_order("test", 4)])
    assert torch.equal(s.val.y, torch.from_numpy(y)[order[15:]])
    assert "TensorFlow Datasets' record order" in s.val_split
    with pytest.raises(ValueError, match="applies to cifar10: and cifar100:"):
        load_dataset("digits", record_order="tfds")


def test_cifar_refuses_code_in_pickles(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    for name in ("train", "test"):
        with open(base / name, "wb") as f:
            pickle.dump({b"data": Evil()}, f)
    with pytest.raises(ValueError, match="refusing to load builtins.print"):
        load_dataset(f"cifar100:{tmp_path}")


def _png(path: Path, rng, size=(40, 30)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def test_image_folder(tmp_path):
    rng = np.random.default_rng(2)
    for split, n in (("train", 6), ("test", 2)):
        for c in ("cat", "dog", "emu"):
            for i in range(n):
                _png(tmp_path / split / c / f"{i}.png", rng)
    s = load_dataset(f"imagefolder:{tmp_path}", resize=36, crop_size=32, val_percent=20, split_seed=0)
    assert s.train.classes == ["cat", "dog", "emu"] and s.num_classes == 3
    assert len(s.train) + len(s.val) == 18 and len(s.test) == 6
    xb, yb = next(iter(s.test.loader(batch_size=4, workers=0)))
    assert xb.shape == (4, 3, 32, 32) and xb.dtype == torch.float32 and 0 <= float(xb.min()) and float(xb.max()) <= 1
    a = torch.cat([x for x, _ in s.test.loader(batch_size=6, workers=0)])
    b = torch.cat([x for x, _ in s.test.loader(batch_size=6, workers=2)])
    assert torch.equal(a, b)  # eval transform is deterministic, also across workers
    assert isinstance(s.train.transform, ProtocolTransform) and s.train.transform.train


def test_json_splits_and_bad_files(tmp_path):
    rng = np.random.default_rng(3)
    mapping = {}
    for i in range(8):
        rel = f"images/{i % 3}/{i}.jpg"
        _png(tmp_path / rel, rng)
        mapping[rel] = i % 3
    (tmp_path / "train.json").write_text(json.dumps(mapping))
    (tmp_path / "test.json").write_text(json.dumps(dict(list(mapping.items())[:3])))
    s = load_dataset(f"json:{tmp_path}", resize=32, crop_size=28, val_percent=25)
    assert len(s.train) == 6 and len(s.val) == 2 and len(s.test) == 3 and s.num_classes == 3
    x, y = next(iter(s.train.loader(batch_size=6, workers=0, shuffle=True)))
    assert x.shape == (6, 3, 28, 28)
    bad = dict(mapping) | {"images/missing_a.jpg": 0, "images/missing_b.jpg": 1}
    (tmp_path / "train.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="2 image files are missing, e.g. .*missing_a.jpg, .*missing_b.jpg"):
        load_dataset(f"json:{tmp_path}")
    (tmp_path / "train.json").write_text(json.dumps(dict(mapping) | {"images/0/0.jpg": -1}))
    with pytest.raises(ValueError, match="labels must be integers >= 0 or class names"):
        load_dataset(f"json:{tmp_path}")
    (tmp_path / "images/0/0.jpg").write_bytes(b"not an image")
    (tmp_path / "train.json").write_text(json.dumps(mapping))
    from roli.data.files import json_split

    data = json_split(tmp_path / "train.json", tmp_path)  # existence is fine: the bytes are not an image
    with pytest.raises(ValueError, match=r"unreadable images: unreadable image .*images/0/0\.jpg"):
        data.verify()
    with pytest.raises(ValueError, match=r"unreadable image .*images/0/0\.jpg"):
        data[0]
    with pytest.raises(ValueError, match="JSON split file not found"):
        load_dataset(f"json:{tmp_path / 'nowhere'}")


def test_array_loader_converts_and_shuffles_reproducibly():
    s = load_dataset("digits")
    loader = s.train.loader(batch_size=100, shuffle=True, seed=3)
    first = [y for _, y in loader]
    again = [y for _, y in s.train.loader(batch_size=100, shuffle=True, seed=3)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert sorted(torch.cat(first).tolist()) == sorted(s.train.y.tolist())
    loader.set_epoch(1)
    assert not torch.equal(next(iter(loader))[1], first[0])
    x, _ = next(iter(s.train.loader(batch_size=5)))
    assert x.dtype == torch.float32 and torch.equal(x, s.train.x[:5].float() / 255)


def test_transforms():
    img = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    r = resize_shorter(img, 256)
    assert r.shape == (3, 256, 341) and r.dtype == torch.uint8
    ev = ProtocolTransform(False)(img)
    assert ev.shape == (3, 224, 224) and torch.equal(ev, ProtocolTransform(False)(img))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(ProtocolTransform(True)(img, g1), ProtocolTransform(True)(img, g2))
    with pytest.raises(ValueError, match="crop size"):
        ProtocolTransform(True, resize=100, crop_size=224)


@pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason="../shared/data/cifar10/cifar10.npz not present")
def test_real_cifar10_npz():
    s = load_dataset(f"npz:{SHARED_CIFAR}")
    assert (len(s.train), len(s.val), len(s.test)) == (45000, 5000, 10000)
    assert s.train.x.shape[1:] == (3, 32, 32) and s.train.x.dtype == torch.uint8 and s.num_classes == 10
    assert torch.bincount(s.test.y).tolist() == [1000] * 10


REFERENCE_SPLITS = Path(__file__).resolve().parents[2] / "shared" / "data" / "reference_splits"


@pytest.mark.skipif(not REFERENCE_SPLITS.is_dir(), reason="../shared/data/reference_splits is absent")
@pytest.mark.parametrize(
    "name, classes, first, last",
    [("cub", 200, "001", "200"), ("stanforddogs", 120, "1", "120"), ("caltech256", 257, "0", "256")],
)
def test_reference_split_files_load_as_published(tmp_path, name, classes, first, last):
    """The reference's own split files (CUB's string labels "001".."200", Stanford Dogs' 1..120, Caltech256's
    0..256) load as they are: one class order from train (numeric), val/test mapped through it. The images
    are not shipped: a tiny PNG is generated at every path a split names (a subset of test, to stay fast)."""
    src = REFERENCE_SPLITS / name
    d = tmp_path / name
    d.mkdir()
    rng = np.random.default_rng(0)
    tiny = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    for split in ("train", "val", "test"):
        mapping = json.loads((src / f"{split}.json").read_text())
        if split == "test":  # every class, but two images per class
            counts: dict = {}
            keep = {}
            for rel, v in mapping.items():
                if counts.get(str(v), 0) < 2:
                    keep[rel], counts[str(v)] = v, counts.get(str(v), 0) + 1
            mapping = keep
        (d / f"{split}.json").write_text(json.dumps(mapping))
        for rel in mapping:
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            tiny.save(d / rel)
    s = load_dataset(f"json:{d}", resize=8, crop_size=6)
    assert s.num_classes == classes and s.train.num_classes == classes
    assert s.train.classes[0] == first and s.train.classes[-1] == last  # numeric order, labels as written
    raw = json.loads((src / "train.json").read_text())
    path, label = next(iter(raw.items()))
    assert s.train.items[0][1] == s.train.classes.index(str(label))
    for split in (s.val, s.test):
        assert split.classes == s.train.classes and int(split.y.max()) < classes
    # A test label that train lacks is an error naming it.
    test = json.loads((d / "test.json").read_text())
    rel = next(iter(test))
    test[rel] = "999" if isinstance(test[rel], str) else 999
    (d / "test.json").write_text(json.dumps(test))
    with pytest.raises(ValueError, match="label '999' .* is not among the train split's"):
        load_dataset(f"json:{d}", resize=8, crop_size=6)


def test_imagefolder_test_class_missing_from_train_is_an_error(tmp_path):
    rng = np.random.default_rng(1)
    for split, classes in (("train", ("a", "b")), ("test", ("a", "b", "c"))):
        for c in classes:
            _png(tmp_path / split / c / "0.png", rng)
            _png(tmp_path / split / c / "1.png", rng)
    with pytest.raises(ValueError, match="class folders that the train split does not have: c"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_gather_without_pinning_is_plain_indexing():
    """The CPU side of the pinned batch gather (the pinned path itself: tests/test_gpu.py)."""
    from roli.data.arrays import gather

    x = torch.randint(0, 255, (50, 3, 4, 4), dtype=torch.uint8)
    rows = torch.randperm(50)[:7]
    assert torch.equal(gather(x, rows, pinned=False), x[rows])
