"""roli.data.arrays without training: the in-memory container, its loader's order (shuffled, sharded like
DistributedSampler, drop_last), the layouts and errors of images and labels word for word, npz and CIFAR files,
and the digits split. Expected values are literals, numpy/hashlib computations or formulas written here."""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch

from roli.data.arrays import (
    ArrayData,
    Epochs,
    _labels,
    cifar,
    digits,
    npz,
    relabel_table,
    to_nchw_uint8,
)


def data(n: int = 10, k: int = 4, seed: int = 0) -> ArrayData:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 3, 2), generator=g, dtype=torch.uint8)
    return ArrayData(x, torch.arange(n) % k, k, "toy", [f"c{i}" for i in range(k)])


def test_the_container_keeps_what_it_was_given():
    d = data()
    assert len(d) == 10 and d.image_shape() == (1, 3, 2) and not d.streamed
    sub = d.subset(torch.tensor([7, 2]))
    assert (sub.num_classes, sub.name, sub.classes) == (4, "toy", ["c0", "c1", "c2", "c3"])
    assert torch.equal(sub.x, d.x[[7, 2]]) and sub.y.tolist() == [3, 2]
    x, y = d.to_float()
    assert x.dtype == torch.float32 and torch.equal(x * 255, d.x.double().float()) and torch.equal(y, d.y)
    assert float(x.max()) <= 1.0


def test_digests_are_hashlib_of_shape_dtype_and_bytes():
    d = data()

    def digest(*arrays):
        h = hashlib.sha256()
        for a in arrays:
            h.update(str(tuple(a.shape)).encode() + str(a.dtype).encode())
            h.update(a.numpy().tobytes())
        return h

    assert d.content_digest() == d.content_digest("stat") == digest(d.x).hexdigest()
    h = hashlib.sha256()
    d.hash_into(h)
    assert h.hexdigest() == digest(d.x, d.y).hexdigest()


@pytest.mark.parametrize("n, picked", [(3, [0, 1, 2]), (100, None)])
def test_the_fingerprints_sample_is_64_images_spread_evenly(n, picked):
    d = data(n)
    parts = d.sample_parts()
    assert parts["labels"][0] is d.y and parts["pixels"][0] == [1, 3, 2]
    idx = picked if picked is not None else [int(i * 99 / 63) for i in range(64)]  # linspace 0..99, 64, truncated
    assert parts["pixels"][1].shape[0] == len(idx) and torch.equal(parts["pixels"][1], d.x[idx])


def test_classes_are_relabelled_in_the_order_given():
    assert relabel_table(5, [3, 1]).tolist() == [-1, 1, -1, 0, -1]
    sub = data(12, k=4).select_classes([3, 1])
    assert sub.num_classes == 2 and sub.y.tolist() == [1, 0, 1, 0, 1, 0]  # labels 1,3,1,3,1,3 in the data's order
    assert sub.classes == ["c3", "c1"] and sub.source_classes == ["c0", "c1", "c2", "c3"]  # (it kept all four)
    assert sub.subset(torch.tensor([0])).classes == ["c3", "c1"]
    assert torch.equal(sub.x, data(12, k=4).x[[1, 3, 5, 7, 9, 11]])


def test_epochs_are_the_loaders_epochs_one_per_pass():
    class Loader:
        def __init__(self):
            self.epochs = []

        def set_epoch(self, e):
            self.epochs.append(e)

        def __len__(self):
            return 7

        def __iter__(self):
            yield from (1, 2)

    loader = Loader()
    ep = Epochs(loader)
    assert len(ep) == 7 and list(ep) == [1, 2] and list(ep) == [1, 2]
    ep.set_epoch(5)
    list(ep)
    assert loader.epochs == [0, 1, 5]
    batches = data(10).batches(4, shuffle=True, seed=2)
    first, second = ([y.tolist() for _, y in batches] for _ in range(2))
    assert sorted(sum(first, [])) == sorted(sum(second, [])) and first != second  # each pass the next epoch


def _order(n, seed, epoch):
    """The loader's shuffle, as documented: randperm seeded with seed * 100003 + epoch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


@pytest.mark.parametrize(
    "n, batch, world, drop_last, length",
    [(10, 4, 1, False, 3), (10, 4, 1, True, 2), (10, 3, 3, False, 2), (10, 3, 3, True, 1), (9, 3, 3, True, 1),
     (8, 8, 1, True, 1), (7, 8, 1, True, 0), (7, 8, 1, False, 1)],
)  # fmt: skip
def test_the_loaders_length(n, batch, world, drop_last, length):
    assert len(data(n).loader(batch, drop_last=drop_last, world=world)) == length


def test_the_loaders_order_shuffled_and_sharded_like_distributed_sampler():
    d = data(10)
    plain = d.loader(4)
    assert [y.tolist() for _, y in plain] == [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1]]
    loader = d.loader(4, shuffle=True, seed=3)
    loader.set_epoch(2)
    order = _order(10, 3, 2)
    assert [y.tolist() for _, y in loader] == [[i % 4 for i in order[s : s + 4]] for s in (0, 4, 8)]
    xs = torch.cat([x for x, _ in loader])
    assert torch.equal(xs * 255, d.x[order].float())
    # three ranks: the order padded to 12 with its first two, then every third from the rank
    shards = [torch.cat([x for x, _ in d.loader(4, rank=r, world=3)]) for r in range(3)]
    padded = list(range(10)) + [0, 1]
    for r, shard in enumerate(shards):
        assert torch.equal(shard * 255, d.x[padded[r::3]].float())
    chosen = d.loader(2, indices=torch.tensor([9, 4, 6]))
    assert [y.tolist() for _, y in chosen] == [[1, 0], [2]]
    with pytest.raises(ValueError, match=r"^batch_size must be >= 1; got 0$"):
        d.loader(0)


def test_labels_and_their_errors_word_for_word():
    assert _labels(np.array([2, 0, 1], np.int32), "s").dtype == torch.int64
    msg = "s: labels must be a 1-D integer array; got float64 with shape (3,)"
    with pytest.raises(ValueError, match=f"^{__import__('re').escape(msg)}$"):
        _labels(np.array([0.0, 1.0, 2.0]), "s")
    with pytest.raises(ValueError, match=r"^s: labels must be a 1-D integer array; got int64 with shape \(1, 2\)$"):
        _labels(np.array([[0, 1]]), "s")
    with pytest.raises(ValueError, match=r"^s: labels out of range at indices \[1, 3\] \(values \[-1, 5\]\)$"):
        _labels(np.array([0, -1, 2, 5]), "s", 5)
    assert _labels(np.array([0, 4]), "s", 5).tolist() == [0, 4]
    assert _labels(np.array([0, 9]), "s").tolist() == [0, 9]  # no bound given: only >= 0
    many = np.array([-1] * 7)
    with pytest.raises(ValueError, match=r"indices \[0, 1, 2, 3, 4\] \(values \[-1, -1, -1, -1, -1\]\)$"):
        _labels(many, "s")


def test_image_layouts_and_their_errors_word_for_word():
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (2, 4, 5, 3), dtype=np.uint8)
    assert torch.equal(to_nchw_uint8(nhwc, "s"), torch.from_numpy(nhwc.transpose(0, 3, 1, 2).copy()))
    nchw = nhwc.transpose(0, 3, 1, 2)
    assert torch.equal(to_nchw_uint8(nchw, "s"), torch.from_numpy(nchw.copy()))
    assert to_nchw_uint8(nchw, "s").is_contiguous()
    assert to_nchw_uint8(nhwc[..., 0], "s").shape == (2, 1, 4, 5)
    grey_last = rng.integers(0, 256, (2, 4, 5, 1), dtype=np.uint8)
    assert to_nchw_uint8(grey_last, "s").shape == (2, 1, 4, 5)
    three_by_three = rng.integers(0, 256, (2, 3, 3, 3), dtype=np.uint8)  # ambiguous: read as NCHW
    assert torch.equal(to_nchw_uint8(three_by_three, "s"), torch.from_numpy(three_by_three))
    floats = np.array([0.0, 0.5, 1.0, 0.2, 0.0019, 0.0021]).reshape(1, 1, 2, 3)
    assert to_nchw_uint8(floats, "s").flatten().tolist() == [0, 128, 255, 51, 0, 1]  # round(x * 255)
    cases = [
        (np.zeros((2, 3)), "s: images must have 3 or 4 dimensions (N,H,W / NHWC / NCHW); got shape (2, 3)"),
        (np.zeros((1, 2, 2, 2, 2)), "s: images must have 3 or 4 dimensions (N,H,W / NHWC / NCHW); got shape "
                                    "(1, 2, 2, 2, 2)"),
        (np.zeros((2, 5, 4, 6), np.uint8), "s: images must have 1 (grey) or 3 (RGB) channels; got shape (2, 5, 4, 6) "
                                           "read as 5 channels"),
        (np.zeros((2, 5, 4, 4), np.uint8), "s: images must have 1 (grey) or 3 (RGB) channels; got shape (2, 4, 5, 4) "
                                           "read as 4 channels (RGBA? drop the alpha channel)"),  # NHWC of 4
        (np.zeros((2, 4, 4, 4), np.uint8), "s: images must have 1 (grey) or 3 (RGB) channels; got shape (2, 4, 4, 4) "
                                           "read as 4 channels (RGBA? drop the alpha channel)"),
        (np.full((1, 1, 2, 2), 2.0), "s: images must be uint8, or floats in [0, 1]; got float64"),
        (np.full((1, 1, 2, 2), -0.5), "s: images must be uint8, or floats in [0, 1]; got float64"),
        (np.zeros((1, 1, 2, 2), np.int16), "s: images must be uint8, or floats in [0, 1]; got int16"),
    ]  # fmt: skip
    for x, msg in cases:
        with pytest.raises(ValueError) as e:
            to_nchw_uint8(x, "s")
        assert str(e.value) == msg
    bad = np.zeros((2, 1, 2, 2), np.float32)
    bad[1, 0, 1, 0] = np.nan
    with pytest.raises(ValueError) as e:
        to_nchw_uint8(bad, "s")
    assert str(e.value) == "s: images hold non-finite pixels (NaN/inf), e.g. at index [1, 0, 1, 0]"
    assert to_nchw_uint8(np.zeros((0, 1, 2, 2), np.float32), "s").shape == (0, 1, 2, 2)  # empty: no min/max


def test_digits_is_the_fixed_80_20_split_of_seed_0():
    from sklearn.datasets import load_digits

    train, test = digits()
    d = load_digits()
    order = np.random.default_rng(0).permutation(1797)
    assert (len(train), len(test), train.num_classes, train.name) == (1437, 360, 10, "digits")
    assert train.classes == [str(i) for i in range(10)]
    assert test.y.tolist() == d.target[order[1437:]].tolist()
    expected = np.rint(d.images[order[:1437]] / 16.0 * 255).astype(np.uint8)[:, None]
    assert torch.equal(train.x, torch.from_numpy(expected))


def test_npz_files_and_their_errors_word_for_word(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (6, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "only_test.npz", x_test=x, y_test=np.array([0, 1, 2, 0, 1, 6]))
    train, test = npz(tmp_path / "only_test.npz")
    assert train is None and test.num_classes == 7 and test.name == "only_test" and test.y.tolist()[-1] == 6
    np.savez(tmp_path / "both.npz", x_train=x, y_train=np.array([0, 1, 2, 0, 1, 2]), x_test=x[:2],
             y_test=np.array([[4], [0]]))  # fmt: skip
    train, test = npz(tmp_path / "both.npz")
    assert train.num_classes == test.num_classes == 5 and test.y.tolist() == [4, 0]  # the larger maximum, reshaped
    np.savez(tmp_path / "all.npz", x=x, y=np.arange(6))
    whole, none = npz(tmp_path / "all.npz")
    assert none is None and len(whole) == 6 and whole.num_classes == 6
    np.savez(tmp_path / "empty.npz", x=x[:0], y=np.zeros(0, np.int64))
    assert npz(tmp_path / "empty.npz")[0].num_classes == 0
    cases = {
        "missing.npz": None,
        "short.npz": (tmp_path / "both.npz").read_bytes()[:100],
        "text.npz": b"not a zip at all",
    }
    for name, content in cases.items():
        if content is not None:
            (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError) as e:
        npz(tmp_path / "missing.npz")
    assert str(e.value) == f"npz file not found: {tmp_path / 'missing.npz'}"
    with pytest.raises(ValueError) as e:
        npz(tmp_path / "short.npz")
    assert str(e.value).startswith(f"cannot read {tmp_path / 'short.npz'} as an npz file (BadZipFile: ")
    assert str(e.value).endswith("); write it with numpy.savez")
    with pytest.raises(ValueError) as e:  # numpy reads it as a pickle: never advised to load it unsafely
        npz(tmp_path / "text.npz")
    assert str(e.value) == (
        f"cannot read {tmp_path / 'text.npz'} as an npz file (it is not a zip of arrays); write it with numpy.savez"
    )
    np.save(tmp_path / "one.npy", x)
    with pytest.raises(ValueError) as e:  # numpy.save's single array: used to be a TypeError (traceback)
        npz(tmp_path / "one.npy")
    assert str(e.value) == (
        f"{tmp_path / 'one.npy'} holds one array of shape (6, 4, 4), not arrays x_train/y_train and/or x_test/y_test "
        "(or x/y); write them with numpy.savez"
    )
    np.savez(tmp_path / "keys.npz", x_train=x)
    with pytest.raises(ValueError) as e:
        npz(tmp_path / "keys.npz")
    assert str(e.value) == (
        f"{tmp_path / 'keys.npz'}: expected arrays x_train/y_train and/or x_test/y_test, or x/y; found ['x_train']"
    )
    np.savez(tmp_path / "neg.npz", x_train=x, y_train=np.array([0, 1, 2, 0, 1, 2]), x_test=x[:2], y_test=[-3, 0])
    with pytest.raises(ValueError) as e:
        npz(tmp_path / "neg.npz")
    assert str(e.value) == f"{tmp_path / 'neg.npz'}: labels out of range at indices [0] (values [-3])"
    np.savez(tmp_path / "sizes.npz", x=x, y=np.arange(5))
    with pytest.raises(ValueError) as e:
        npz(tmp_path / "sizes.npz")
    assert str(e.value) == "sizes: 6 images but 5 labels"


def test_cifar_files_read_from_either_folder_and_their_errors(tmp_path):
    rng = np.random.default_rng(2)
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    parts = {}
    for name, n in (("train", 3), ("test", 2)):
        parts[name] = (rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 100, n).tolist())
        with open(base / name, "wb") as f:
            pickle.dump({b"data": parts[name][0], b"fine_labels": parts[name][1], b"coarse_labels": [0] * n}, f)
    for root in (tmp_path, base):  # the torchvision root, or the folder of the files itself
        train, test = cifar(root, "cifar100")
        assert (train.num_classes, train.name, len(train), len(test)) == (100, "cifar100", 3, 2)
        assert torch.equal(test.x, torch.from_numpy(parts["test"][0].reshape(2, 3, 32, 32)))
        assert test.y.tolist() == parts["test"][1]
    (base / "test").write_bytes(b"\x80\x04truncated")
    with pytest.raises(ValueError) as e:
        cifar(tmp_path, "cifar100")
    assert str(e.value).startswith(f"cannot read CIFAR pickle {base / 'test'}: ")
    (base / "test").unlink()
    with pytest.raises(ValueError) as e:
        cifar(tmp_path, "cifar100")
    assert str(e.value) == f"CIFAR file not found: {base / 'test'}"
    with open(base / "test", "wb") as f:
        pickle.dump({b"data": parts["test"][0], b"fine_labels": [0, 100]}, f)
    with pytest.raises(ValueError) as e:
        cifar(tmp_path, "cifar100")
    assert str(e.value) == f"{base}: labels out of range at indices [1] (values [100])"


def test_cifar_pickles_written_by_python_2_are_read(tmp_path):
    """The published CIFAR batches were pickled by Python 2: their keys are py2 strings, which only
    encoding="bytes" reads as b"data" / b"labels". A stream with such keys (SHORT_BINSTRING), written here."""
    rng = np.random.default_rng(3)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (2, 3072), dtype=np.int64)  # int64 rows: stored as uint8
        labels = rng.integers(0, 10, 2).tolist()
        body = b"\x80\x02}(" + b"U\x04data" + pickle.dumps(data, protocol=3)[2:-1]
        body += b"U\x06labels" + pickle.dumps(labels, protocol=3)[2:-1] + b"u."
        (base / name).write_bytes(body)
    train, test = cifar(tmp_path, "cifar10")
    assert len(train) == 10 and len(test) == 2 and train.x.dtype == torch.uint8
    assert test.y.tolist() == labels and torch.equal(test.x, torch.from_numpy(data.astype(np.uint8)).view(2, 3, 32, 32))


def test_the_loaders_defaults_and_edges():
    d = data(10)
    assert [y.tolist() for _, y in d.loader(4, shuffle=True)][0] == [i % 4 for i in _order(10, 0, 0)[:4]]  # seed 0
    batches = d.batches(10, shuffle=True, seed=2)
    assert [y.tolist() for _, y in batches] == [[i % 4 for i in _order(10, 2, 0)]]
    assert [len(y) for _, y in d.loader(1)] == [1] * 10  # one image per batch is a batch
    halves = [torch.cat([y for _, y in d.loader(8, rank=r, world=2)]).tolist() for r in range(2)]
    assert halves == [[0, 2, 0, 2, 0], [1, 3, 1, 3, 1]]  # every other of 0..9 (labels i % 4)
    thirds = [len(torch.cat([y for _, y in d.loader(8, rank=r, world=3)])) for r in range(3)]
    assert thirds == [4, 4, 4]  # 10 padded to 12, not doubled
    ep = Epochs(d.loader(5))
    for expected in (0, 1, 2):
        list(ep)
        assert ep.loader.epoch == expected and ep.epoch == expected + 1
    assert data(6, k=3).select_classes([2, 0]).subset(torch.tensor([1])).source_classes == ["c0", "c1", "c2"]


def test_digits_without_scikit_learn_says_what_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ValueError) as e:
        digits()
    assert str(e.value) == "dataset 'digits' needs scikit-learn: pip install scikit-learn"


def test_npz_train_only_and_bad_images_named_by_path(tmp_path):
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "t.npz", x_train=rng.integers(0, 256, (4, 5, 5), dtype=np.uint8), y_train=[0, 1, 0, 1])
    train, test = npz(tmp_path / "t.npz")
    assert test is None and len(train) == 4 and train.num_classes == 2
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 2, 5, 5), np.uint8), y=[0, 1])
    with pytest.raises(ValueError) as e:
        npz(tmp_path / "c.npz")
    assert str(e.value).startswith(f"{tmp_path / 'c.npz'}: images must have 1 (grey) or 3 (RGB) channels; ")


def test_tfds_order_is_md5_of_split_and_key_as_a_128_bit_integer():
    from roli.data.arrays import tfds_order

    for split in ("train", "test"):
        digest = [int.from_bytes(hashlib.md5(f"{split}{i}".encode()).digest(), "big") for i in range(300)]
        assert tfds_order(split, 300).tolist() == sorted(range(300), key=lambda i: digest[i])


def test_cifar_counts_that_differ_are_named_and_cifar10_is_the_default(tmp_path):
    rng = np.random.default_rng(5)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(base / name, "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [1, 2]}, f)
    train, test = cifar(tmp_path)  # which: cifar10
    assert (train.name, train.num_classes, len(train)) == ("cifar10", 10, 10)
    assert [y.tolist() for _, y in train.batches(4)] == [[1, 2, 1, 2], [1, 2, 1, 2], [1, 2]]  # in order by default
    with open(base / "test_batch", "wb") as f:
        pickle.dump({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [1, 2, 3]}, f)
    with pytest.raises(ValueError) as e:
        cifar(tmp_path)
    assert str(e.value) == (
        f"CIFAR pickle {base / 'test_batch'}: 4 images of shape (3072,) and 3 labels; expected equal counts of 3072 "
        "bytes each"
    )
