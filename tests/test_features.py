"""Feature cache (keys, hits, atomicity, torchrun shards), clean linear probes and sweeps, and ALP."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import adversarially_train
from torch import nn

import roli
from roli.attacks import robust_accuracy
from roli.data.arrays import ArrayData, digits
from roli.features import FeatureCache, compute_features, train_linear_probe, train_linear_probes
from roli.models import NormalizedModel, create_classifier, load_checkpoint
from roli.models.small import small_cnn
from roli.training import adversarial_linear_probe

EPS = 0.1


@pytest.fixture(scope="module")
def transfer():
    """A small_cnn adversarially pretrained on digits 0-4 (source); digits 5-9 as the target task."""
    torch.manual_seed(0)
    train, test = digits()

    def part(d, lo):
        s = d.subset(torch.nonzero((d.y >= lo) & (d.y < lo + 5))[:, 0])
        s.y, s.num_classes = s.y - lo, 5
        return s

    src = part(train, 0)
    sx, sy = src.to_float()
    net = small_cnn(5, 1)
    adversarially_train(NormalizedModel(net, None, None), sx, sy, epochs=10, eps=EPS)
    tgt = part(train, 5)
    n_val = len(tgt) // 10
    return net.eval(), tgt.subset(torch.arange(n_val, len(tgt))), tgt.subset(torch.arange(n_val)), part(test, 5)


def classifier(net):
    return create_classifier(copy.deepcopy(net), 5)


# -- cache ------------------------------------------------------------------------------------------


def test_cache_hit_and_miss_on_every_key_component(transfer, tmp_path, monkeypatch):
    net, train, _, _ = transfer
    cache = FeatureCache(tmp_path)
    model = classifier(net)
    first = cache.get(model, train, "train")
    again = cache.get(model, train, "train")
    assert not first.hit and again.hit and torch.equal(first.x, again.x) and torch.equal(first.y, again.y)
    assert again.key == first.key == sorted(p.name for p in tmp_path.iterdir())[0]
    assert again.x.dtype == first.x.dtype == torch.float32 and again.y.dtype == torch.int64
    torch.testing.assert_close(first.x, compute_features(model, train)[0])
    keys = {first.key}

    def miss(m=model, data=train, split="train", dtype="fp32"):
        f = cache.get(m, data, split, dtype)
        assert not f.hit and f.key not in keys
        keys.add(f.key)

    changed = classifier(net)
    with torch.no_grad():
        changed.backbone.features[0].weight[0, 0, 0, 0] += 1e-3  # another checkpoint
    miss(m=changed)
    miss(m=create_classifier(copy.deepcopy(net), 5, mean=(0.5,), std=(0.25,)))  # preprocessing
    miss(m=create_classifier(copy.deepcopy(net), 5, mean=(0.5,), std=(0.3,)))  # its std alone
    miss(m=create_classifier(copy.deepcopy(net), 5, mean=(0.6,), std=(0.3,)))  # its mean alone
    miss(m=create_classifier(copy.deepcopy(net), 5, input_size=16))  # resize inside the model
    other = copy.deepcopy(train)
    other.x[0, 0, 0, 0] ^= 1  # one pixel: another dataset
    miss(data=other)
    miss(split="val")
    miss(dtype="bf16")
    monkeypatch.setattr(roli, "__version__", "9.9.9")
    miss()
    monkeypatch.undo()
    assert cache.get(model, train, "train").hit
    cache.invalidate(first.key)
    assert not cache.get(model, train, "train").hit


@pytest.mark.parametrize("damage", ["truncated", "replaced", "labels", "meta", "shape", "short labels", "another"])
def test_a_damaged_entry_is_computed_again_never_read(transfer, tmp_path, damage, caplog):
    """Files of an entry cut short (a full disk), replaced by other numbers of the same size (an edit, a copy),
    meta.json unreadable, or arrays of another shape than recorded: the features are computed again, with a
    warning naming the entry, and the new entry is whole."""
    import hashlib
    import json
    import logging

    import numpy as np

    net, train, _, _ = transfer
    model = classifier(net)
    cache = FeatureCache(tmp_path)
    first = cache.get(model, train, "train")
    expected = first.x.clone()
    entry = tmp_path / first.key
    meta = json.loads((entry / "meta.json").read_text())
    for name in ("features.npy", "labels.npy"):  # recorded as written, computed here
        assert meta["sha256"][name] == hashlib.sha256((entry / name).read_bytes()).hexdigest()
    features = entry / "features.npy"
    if damage == "truncated":
        features.write_bytes(features.read_bytes()[:-100])
    elif damage == "replaced":
        arr = np.load(features)
        np.save(features, arr + 1.0)  # same size and header: only the numbers differ
    elif damage == "labels":
        np.save(entry / "labels.npy", np.load(entry / "labels.npy")[::-1].copy())
    elif damage == "meta":
        (entry / "meta.json").write_text("{not json")
    elif damage == "shape":  # an entry of an earlier roli (no sha256) whose arrays are not the recorded size
        del meta["sha256"]
        meta["n"] += 1
        (entry / "meta.json").write_text(json.dumps(meta))
    elif damage == "another":  # the folder of another entry copied or renamed to this key (here: the val split's)
        (entry / "meta.json").write_text(json.dumps({**meta, "split": "val"}))
    else:  # an earlier roli's entry whose labels alone are cut short
        del meta["sha256"]
        (entry / "meta.json").write_text(json.dumps(meta))
        np.save(entry / "labels.npy", np.load(entry / "labels.npy")[:-1].copy())
    with caplog.at_level(logging.WARNING, logger="roli.features"):
        again = cache.get(model, train, "train")
    assert not again.hit and torch.equal(again.x, expected)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "roli.features"]
    assert line.startswith(f"feature cache entry {entry} is damaged (") and line.endswith(
        ": computing the features again"
    )
    if damage == "another":
        assert "is damaged (its meta.json describes another entry (copied or renamed?))" in line
    if damage in ("truncated", "replaced", "labels"):
        name = "labels.npy" if damage == "labels" else "features.npy"
        assert f"is damaged ({name} is not the file written there (its sha256 differs))" in line
    assert cache.get(model, train, "train").hit  # whole again
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.key]  # nothing left beside it


def test_an_entry_of_an_earlier_roli_without_digests_is_read(transfer, tmp_path):
    import json

    net, train, _, _ = transfer
    model = classifier(net)
    cache = FeatureCache(tmp_path)
    first = cache.get(model, train, "train")
    meta = json.loads((tmp_path / first.key / "meta.json").read_text())
    del meta["sha256"]
    (tmp_path / first.key / "meta.json").write_text(json.dumps(meta))
    again = cache.get(model, train, "train")
    assert again.hit and torch.equal(again.x, first.x)


def test_a_transform_without_a_train_flag_is_cached(transfer):
    from roli.features.cache import cache_key

    net, train, _, _ = transfer
    view = copy.copy(train)
    view.transform = "Resize(8) (a user's transform: no .train attribute)"
    key, desc = cache_key(classifier(net), view, "train", "fp32")
    assert desc["transform"] == repr(view.transform) and len(key) == 32
    other = copy.copy(train)
    other.transform = "Resize(16) (another deterministic view of the same images)"
    assert cache_key(classifier(net), other, "train", "fp32")[0] != key  # another view: other features
    assert cache_key(classifier(net), train, "train", "fp32")[1]["transform"] is None


def test_cache_refuses_random_augmentation(tmp_path):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / "img" / "train" / c).mkdir(parents=True)
        Image.new("RGB", (40, 40), (10, 20, 30)).save(tmp_path / "img" / "train" / c / "0.png")
        Image.new("RGB", (40, 40), (10, 20, 30)).save(tmp_path / "img" / "train" / c / "1.png")
    from roli.data import load_dataset

    s = load_dataset(f"imagefolder:{tmp_path / 'img'}", resize=36, crop_size=32, val_percent=50, split_seed=0)
    model = create_classifier(small_cnn(2, 3, width=4), 2)
    with pytest.raises(ValueError, match="random training augmentation"):
        FeatureCache(tmp_path / "c").get(model, s.train, "train")
    assert len(FeatureCache(tmp_path / "c").get(model, s.val, "val").y) == 2  # the eval view is fine


SLOW_WRITER = textwrap.dedent(
    """
    import sys, time, torch
    from torch import nn
    from roli.data.arrays import ArrayData
    from roli.features import FeatureCache
    from roli.models import create_classifier
    class Slow(nn.Module):
        def forward(self, x):
            time.sleep(0.05)
            return x.flatten(1)[:, :4]
    x = torch.randint(0, 255, (4000, 1, 4, 4), dtype=torch.uint8)
    data = ArrayData(x, torch.zeros(4000, dtype=torch.long), 2, "d")
    model = create_classifier(Slow(), 2, mean=None, std=None, feat_dim=4)
    FeatureCache(sys.argv[1]).get(model, data, "train", batch_size=16)
    """
)


def test_killed_writer_leaves_no_valid_entry(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(SLOW_WRITER)
    root = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, str(script), str(root)])
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not list(root.glob(".tmp-*")):
            time.sleep(0.1)
        assert list(root.glob(".tmp-*")), "the writer never started"
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    entries = [d for d in root.iterdir() if not d.name.startswith(".tmp-")]
    assert entries == [] and not list(root.glob("*/meta.json"))
    left = list(root.glob(".tmp-*"))
    assert len(left) == 1 and (left[0] / "features.npy").exists() is False  # killed while computing
    # the next miss (any key) removes the folder the killed writer left: its lock is nobody's now
    x = torch.randint(0, 255, (6, 1, 4, 4), dtype=torch.uint8)
    model = create_classifier(nn.Flatten(), 2, mean=None, std=None, feat_dim=16)
    FeatureCache(root).get(model, ArrayData(x, torch.tensor([0, 1] * 3), 2, "other"), "train")
    assert not left[0].exists() and not list(root.glob(".tmp-*"))
    assert len(list(root.glob("*/meta.json"))) == 1


KEY = "0123456789abcdef0123456789abcdef"


def _leftover(root, name, files=("features.npy", "meta.json"), age=0.0):
    d = root / name
    d.mkdir(parents=True)
    for f in files:
        (d / f).write_bytes(os.urandom(16))
    if age:
        os.utime(d, (time.time() - age, time.time() - age))
    return d


def test_sweep_removes_only_what_dead_writers_left(tmp_path):
    from roli._io import lock_file

    root = tmp_path / "cache"
    dead = _leftover(root, f".tmp-{KEY}-0badc0de", files=("features.npy", ".lock", "shard1.pt"))
    removing = _leftover(root, f".removing-{KEY}-00000001", files=("features.npy", "labels.npy", "meta.json"), age=61)
    old_roli = _leftover(root, f".tmp-{KEY}", files=("shard0.pt",), age=3600)  # an earlier roli's: no lock
    live = _leftover(root, f".tmp-{KEY}-11111111", files=("features.npy", ".lock"), age=3600)
    fresh = _leftover(root, f".removing-{KEY}-00000002", files=("meta.json",), age=5)  # being removed right now
    users = _leftover(root, f".tmp-{KEY}-22222222", files=("features.npy", ".lock", "notes.txt"), age=3600)
    other_name = _leftover(root, f".tmp-{KEY}-XYZ", files=("features.npy",), age=3600)
    kept_by_caller = _leftover(root, f".tmp-{KEY}-33333333", files=(".lock",), age=3600)
    target = _leftover(tmp_path, "elsewhere", files=("features.npy",), age=3600)
    (root / f".tmp-{KEY}-44444444").symlink_to(target)
    entry = _leftover(root, KEY, files=("features.npy", "labels.npy", "meta.json"), age=3600)
    fd = lock_file(live / ".lock", shared=True)  # a writer at work (its own open file: flock conflicts in-process)
    try:
        removed = FeatureCache(root).sweep(keep=kept_by_caller.name)
    finally:
        os.close(fd)
    assert sorted(removed) == sorted([dead, removing, old_roli])
    assert not dead.exists() and not removing.exists() and not old_roli.exists()
    for d in (live, fresh, users, other_name, kept_by_caller, entry, target):
        assert d.is_dir() and os.listdir(d), d
    assert (root / f".tmp-{KEY}-44444444").is_symlink() and (target / "features.npy").is_file()
    assert FeatureCache(root).sweep(keep=kept_by_caller.name) == [live]  # its writer gone now
    assert FeatureCache(tmp_path / "absent").sweep() == []


def test_an_error_while_computing_leaves_no_folder(tmp_path):
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("out of memory (a stand-in)")

    x = torch.randint(0, 255, (6, 1, 4, 4), dtype=torch.uint8)
    model = create_classifier(Broken(), 2, mean=None, std=None, feat_dim=16)
    with pytest.raises(RuntimeError, match="stand-in"):
        FeatureCache(tmp_path).get(model, ArrayData(x, torch.tensor([0, 1] * 3), 2, "d"), "train")
    assert os.listdir(tmp_path) == []


def test_a_writer_holds_its_folders_lock_and_the_entry_has_none(tmp_path, monkeypatch):
    from roli._io import lock_file
    from roli.features import cache as C

    seen = []
    real = C.compute_features

    def spy(model, data, *args):
        (tmp,) = tmp_path.glob(".tmp-*")
        seen.append(lock_file(tmp / ".lock", wait=False))  # None: the writer holds it
        return real(model, data, *args)

    monkeypatch.setattr(C, "compute_features", spy)
    x = torch.randint(0, 255, (6, 1, 4, 4), dtype=torch.uint8)
    model = create_classifier(nn.Flatten(), 2, mean=None, std=None, feat_dim=16)
    got = FeatureCache(tmp_path).get(model, ArrayData(x, torch.tensor([0, 1] * 3), 2, "d"), "train")
    assert seen == [None]
    assert sorted(os.listdir(tmp_path)) == [got.key]
    assert sorted(os.listdir(tmp_path / got.key)) == ["features.npy", "labels.npy", "meta.json"]
    assert torch.equal(got.x, x.reshape(6, 16).float() / 255)


def test_torchrun_shards_assemble_once(transfer, tmp_path):
    net, train, _, _ = transfer
    torch.save(net.state_dict(), tmp_path / "net.pt")
    script = tmp_path / "shard.py"
    script.write_text(textwrap.dedent(
        f"""
        import torch, torch.distributed as dist
        from roli.data.arrays import ArrayData, digits
        from roli.features import FeatureCache
        from roli.models import create_classifier
        from roli.models.small import small_cnn
        dist.init_process_group("gloo")
        net = small_cnn(5, 1)
        net.load_state_dict(torch.load({str(tmp_path / 'net.pt')!r}))
        train, _ = digits()
        f = FeatureCache({str(tmp_path / 'cache')!r}).get(create_classifier(net, 5), train, "all")
        print("rank", dist.get_rank(), "n", len(f.y))
        dist.destroy_process_group()
        """
    ))  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD", "LOCAL_RANK", "MASTER"))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("n 1437") == 2
    full, _ = digits()
    model = create_classifier(copy.deepcopy(net), 5)
    cached = FeatureCache(tmp_path / "cache").get(model, full, "all")
    assert cached.hit and len(list((tmp_path / "cache").iterdir())) == 1
    torch.testing.assert_close(cached.x, compute_features(model, full)[0], rtol=1e-5, atol=1e-5)


# -- clean linear probes ----------------------------------------------------------------------------


def test_lp_from_cache_matches_recomputing_every_epoch(transfer, tmp_path):
    net, train, val, _ = transfer
    model = classifier(net)
    cache = FeatureCache(tmp_path)
    tr, va = cache.get(model, train, "train"), cache.get(model, val, "val")
    cached = train_linear_probe((tr.x, tr.y), (va.x, va.y), 5, lr=0.1, epochs=8, batch_size=64, seed=3)
    calls = []

    def recompute(epoch):
        calls.append(epoch)
        return compute_features(model, train)

    fresh = train_linear_probe(recompute, (va.x, va.y), 5, lr=0.1, epochs=8, batch_size=64, seed=3)
    assert calls == list(range(8))
    assert abs(cached.val_acc - fresh.val_acc) <= 0.005


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_sweep_best_head_equals_training_it_alone(transfer, optimizer):
    net, train, val, _ = transfer
    model = classifier(net)
    tr, va = compute_features(model, train), compute_features(model, val)
    lrs = (
        [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
        if optimizer == "sgd"
        else [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
    )
    wds = [0.0, 1e-3, 1e-2, 0.0, 1e-3, 1e-2, 0.0, 1e-3]
    sweep = train_linear_probes(tr, va, 5, lrs, wds, epochs=6, warmup=2, batch_size=128, optimizer=optimizer)
    alone = train_linear_probe(tr, va, 5, lr=sweep.lr, weight_decay=sweep.weight_decay, epochs=6, warmup=2,
                               batch_size=128, optimizer=optimizer)  # fmt: skip
    assert alone.val_acc == sweep.val_acc and alone.epoch == sweep.epoch
    torch.testing.assert_close(alone.weight, sweep.weight, rtol=1e-4, atol=1e-5)
    per_head = torch.tensor(sweep.history[sweep.epoch]["val_acc"])
    assert float(per_head.max()) == sweep.val_acc and len(set(per_head.tolist())) > 1


def test_probe_bad_input():
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    with pytest.raises(ValueError, match="optimizer"):
        train_linear_probe((x, y), (x, y), 3, lr=0.1, optimizer="lbfgs")
    with pytest.raises(ValueError, match="2 learning rates but 1 weight decays"):
        train_linear_probes((x, y), (x, y), 3, [0.1, 0.2], [0.0])


# -- adversarial linear probing ---------------------------------------------------------------------------


def test_alp_beats_clean_lp_in_pgd_accuracy_and_keeps_the_backbone(transfer, tmp_path):
    net, train, val, test = transfer
    tex, tey = test.to_float()
    vx, vy = val.to_float()
    lp_model = classifier(net)
    lp = train_linear_probe(compute_features(lp_model, train), compute_features(lp_model, val), 5, lr=0.1,
                            epochs=30, batch_size=64)  # fmt: skip
    with torch.no_grad():
        lp_model.head.weight.copy_(lp.weight)
        lp_model.head.bias.copy_(lp.bias)
    lp_clean, lp_robust = robust_accuracy(lp_model, (tex, tey), EPS, EPS / 8, 10)
    model = classifier(net)
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    res = adversarial_linear_probe(model, train.loader(64, shuffle=True), (vx, vy), epochs=10, lr=0.1,
                                   weight_decay=1e-4, warmup=1, eps=EPS, step_size=EPS / 4, steps=5, log=None,
                                   checkpoint=tmp_path / "alp.pt")  # fmt: skip
    alp_clean, alp_robust = robust_accuracy(model, (tex, tey), EPS, EPS / 8, 10)
    print(
        f"target digits 5-9, PGD-10 eps {EPS}: clean LP {lp_clean:.3f}/{lp_robust:.3f}, "
        f"ALP {alp_clean:.3f}/{alp_robust:.3f}"
    )
    assert alp_robust > lp_robust
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BatchNorm statistics, bitwise
    assert all(not p.requires_grad for p in model.backbone.parameters())
    assert len(res.history) == 10 and res.val_robust == max(h["val_robust"] for h in res.history)
    fresh = classifier(net)
    from roli.models import apply_peft

    apply_peft(fresh, "linear")
    assert load_checkpoint(fresh, tmp_path / "alp.pt")["stage"] == "alp"
    assert torch.equal(fresh.head.weight, model.head.weight)


def test_alp_warm_start_from_lp_head(transfer):
    net, train, val, _ = transfer
    model = classifier(net)
    w, b = torch.randn(5, model.feat_dim), torch.randn(5)
    res = adversarial_linear_probe(model, train.loader(256), val.to_float(), epochs=1, lr=0.0, warmup=0, steps=1,
                                   init_head=(w, b), log=None)  # fmt: skip
    assert torch.equal(res.weight, w) and torch.equal(res.bias, b)  # lr 0: the warm start is what comes out


def test_alp_bf16_uses_channels_last_and_matches_fp32_roughly(transfer):
    net, train, val, _ = transfer
    small = train.subset(torch.arange(128))
    results = {}
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)  # the same head for both, whatever ran before
        model = classifier(net)
        res = adversarial_linear_probe(model, small.loader(64), val.to_float(), epochs=2, lr=0.1, warmup=0,
                                       eps=EPS, step_size=EPS / 4, steps=3, precision=precision, log=None)  # fmt: skip
        conv = model.backbone.features[3].weight  # (64, 32, 3, 3): the layouts differ
        assert conv.is_contiguous(memory_format=torch.channels_last) == (precision == "bf16")
        results[precision] = (res.val_robust, torch.cat([res.weight.flatten(), res.bias]).double())
    # What 72 validation images can resolve is a few images; the trained heads resolve much finer: bf16
    # (8 mantissa bits, ~0.4% per rounding) lands within 2% of the fp32 head (measured: 0.25%).
    (acc16, head16), (acc32, head32) = results["bf16"], results["fp32"]
    assert float((head16 - head32).norm() / head32.norm()) < 0.02
    assert abs(acc16 - acc32) <= 2 / len(val) + 1e-9


def test_the_default_root_and_a_writer_that_lost_the_race(tmp_path, monkeypatch):
    from roli.features import cache as C

    monkeypatch.setenv("ROLI_CACHE_DIR", str(tmp_path / "base"))
    assert FeatureCache().root == tmp_path / "base" / "features"
    real = C.compute_features
    x = torch.randint(0, 255, (6, 1, 4, 4), dtype=torch.uint8)
    data = ArrayData(x, torch.tensor([0, 1] * 3), 2, "d")
    model = create_classifier(nn.Flatten(), 2, mean=None, std=None, feat_dim=16)
    key, _ = C.cache_key(model, data, "train", "fp32")

    def another_process_commits_first(*args):
        (tmp_path / "c" / key).mkdir()
        (tmp_path / "c" / key / "meta.json").write_text("{}")  # its entry (whatever it holds is its own)
        return real(*args)

    monkeypatch.setattr(C, "compute_features", another_process_commits_first)
    got = FeatureCache(tmp_path / "c").get(model, data, "train")
    assert torch.equal(got.x, x.reshape(6, 16).float() / 255) and not got.hit
    assert os.listdir(tmp_path / "c") == [key] and os.listdir(tmp_path / "c" / key) == ["meta.json"]
