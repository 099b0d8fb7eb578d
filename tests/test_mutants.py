"""Behaviour that mutation testing (mutmut on roli/models/peft.py and roli/data/arrays.py, 2026-12-06) found
untested: the words the log uses for what a stage trains, the fingerprint's evenly spread sample, the datasets'
names, class names and class counts, npz files holding pickled objects, CIFAR's malformed-pickle messages. Every
expected value is written here (literals, numpy's own linspace), never taken from the code under test."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

import roli
from roli.data.arrays import ArrayData
from roli.models import apply_peft, create_classifier, what_trains
from roli.models.peft import _group

VIT = dict(img_size=32, patch_size=4, depth=2, embed_dim=24, num_heads=2)


@pytest.mark.parametrize(
    "name, label",
    [
        ("head.weight", "the head"),
        ("head.bias", "the head"),
        ("blocks.0.adapter.up.bias", "the Adapters' up biases"),
        ("blocks.0.adapter.up.weight", "the Adapters' up projections"),
        ("blocks.1.adapter.down.weight", "the Adapters' down projections"),
        ("blocks.1.adapter.down.bias", "the Adapters' down projections"),
        ("blocks.0.attn.qkv.lora_A", "LoRA matrices"),
        ("vpt_prompts.0", "prompts"),
        ("blocks.0.norm1.bias", "biases"),
        ("blocks.0.mlp.fc1.weight", "backbone weights"),
    ],
)
def test_the_words_for_what_a_stage_trains(name, label):
    assert _group(name) == label


def test_what_trains_says_which_parameters_move():
    torch.manual_seed(0)
    m = create_classifier("vit_tiny_patch16_224", 5, **VIT)
    apply_peft(m, "adapter", peft_init="reference", role="roli")  # the reference's zero Adapters: up biases move
    out = what_trains(m)
    params = dict(m.named_parameters())
    head = sum(p.numel() for n, p in params.items() if n.startswith("head."))
    up_bias = sum(p.numel() for n, p in params.items() if n.endswith(".up.bias"))
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    assert out["receiving_gradient"] == head + up_bias and out["trainable"] == trainable
    assert out["summary"].endswith(
        f"this stage trains {head + up_bias:,} parameters: the Adapters' up biases, the head"
    )
    assert (
        f"{trainable:,} trainable parameters; {trainable - head - up_bias:,} of them (Adapter down/up weights, "
        in (out["summary"])
    )
    torch.manual_seed(0)
    plain = create_classifier("vit_tiny_patch16_224", 5, **VIT)
    apply_peft(plain, "bias")
    n = sum(p.numel() for p in plain.parameters() if p.requires_grad)
    assert what_trains(plain)["summary"] == f"{n:,} trainable parameters, all of them can receive a gradient"


@pytest.mark.parametrize("n", [5, 64, 200, 1001])
def test_the_fingerprint_sample_is_64_evenly_spread_images(n):
    x = torch.randint(0, 256, (n, 1, 3, 2), dtype=torch.uint8)
    y = torch.arange(n) % 3
    parts = ArrayData(x, y, 3, "t").sample_parts()
    expected = np.linspace(0, n - 1, min(64, n)).astype(np.int64)  # first and last included, 64 at most
    assert set(parts) == {"labels", "pixels"}
    assert parts["pixels"][0] == [1, 3, 2] and torch.equal(parts["pixels"][1], x[torch.from_numpy(expected)])
    assert torch.equal(parts["labels"][0], y)


def test_digits_is_named_with_ten_classes_and_uint8_images():
    data = roli.load_dataset("digits")
    assert data.train.name == "digits" and data.num_classes == 10 and data.train.num_classes == 10
    assert data.train.classes == [str(i) for i in range(10)]
    assert data.train.x.dtype == torch.uint8 and tuple(data.train.x.shape[1:]) == (1, 8, 8)
    assert int(data.train.x.max()) == 255  # the 0..16 scale mapped onto 0..255


def test_npz_names_counts_and_refuses_pickled_objects(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "mine.npz"
    np.savez(path, x_train=rng.random((140, 4, 4)), y_train=np.arange(140) % 7, x_test=rng.random((6, 4, 4)),
             y_test=np.array([0, 1, 2, 0, 1, 2]))  # fmt: skip
    data = roli.load_dataset(f"npz:{path}")
    assert data.train.name == "mine" and data.num_classes == 7  # the largest label, plus one
    only = tmp_path / "plain.npz"
    np.savez(only, x=rng.random((200, 4, 4)), y=np.arange(200) % 4)  # one array pair: split by roli
    assert roli.load_dataset(f"npz:{only}").num_classes == 4
    evil = tmp_path / "evil.npz"
    np.savez(evil, x=np.array([object()] * 4, dtype=object), y=np.arange(4))
    with pytest.raises(ValueError, match="pickled|allow_pickle|object"):
        roli.load_dataset(f"npz:{evil}")


def test_cifar_pickles_that_are_not_batches_are_named(tmp_path):
    root = tmp_path / "cifar"
    root.mkdir()
    good = {b"data": np.zeros((10, 3072), np.uint8), b"labels": list(range(10))}
    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(good))
    (root / "test_batch").write_bytes(pickle.dumps({b"labels": [0]}))  # no images
    with pytest.raises(ValueError) as e:
        roli.load_dataset(f"cifar10:{root}")
    assert f"CIFAR pickle {root / 'test_batch'} lacks b'data' or b'labels': not a cifar10 batch" in str(e.value)
    (root / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((4, 3071), np.uint8), b"labels": [0] * 4}))
    with pytest.raises(ValueError) as e:
        roli.load_dataset(f"cifar10:{root}")
    assert f"CIFAR pickle {root / 'test_batch'}: 4 images of shape (3071,) and 4 labels; expected equal counts of " \
           "3072 bytes each" in str(e.value)  # fmt: skip


SWIN = dict(img_size=32, window_size=2, embed_dim=24, depths=(1, 1), num_heads=(1, 2))


def test_what_trains_names_zero_lora_pairs_and_a_head_only_stage():
    """The reference's RoLI-LoRA on Swin (A = B = 0): the summary as the log prints it, written out here."""
    torch.manual_seed(0)
    m = create_classifier("swin_tiny_patch4_window7_224", 5, **SWIN)
    apply_peft(m, "lora", peft_init="reference", role="roli")
    params = dict(m.named_parameters())
    lora = [n for n in params if ".lora_" in n]
    dead = sum(params[n].numel() for n in lora)
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    out = what_trains(m)
    assert out["inert_tensors"] == len(lora) > 0 and out["inert"] == dead
    assert out["summary"] == (
        f"{trainable:,} trainable parameters; {dead:,} of them (LoRA A and B (both zero), {len(lora)} tensors) are "
        "zero on both sides of their branch: they receive no gradient and stay zero; this stage trains the head only"
    )


def test_an_adapter_with_a_non_zero_down_bias_is_not_inert():
    """down.weight and up.weight zero but down.bias not: GELU(bias) reaches up.weight's gradient, so it trains."""
    from roli.models import inert_parameters

    torch.manual_seed(0)
    m = create_classifier("vit_tiny_patch16_224", 5, **VIT)
    apply_peft(m, "adapter", peft_init="reference", role="roli")
    assert len(inert_parameters(m)) == 3 * VIT["depth"]  # down weight, down bias, up weight per block
    adapter = next(mod for mod in m.modules() if hasattr(mod, "down") and hasattr(mod, "up"))
    with torch.no_grad():
        adapter.down.bias.fill_(0.5)
    assert len(inert_parameters(m)) == 3 * (VIT["depth"] - 1)


def test_full_and_linear_decide_what_is_trainable_and_the_family_is_named():
    from roli.models.peft import family

    torch.manual_seed(0)
    m = create_classifier("vit_tiny_patch16_224", 5, **VIT)
    apply_peft(m, "full")
    assert all(p.requires_grad for p in m.parameters())
    apply_peft(m, "linear")
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}
    assert family(m.backbone) == "vit"
    assert family(create_classifier("swin_tiny_patch4_window7_224", 5, **SWIN).backbone) == "swin"
    assert family(create_classifier("roli.models.small:small_cnn", 5, in_chans=3).backbone) is None


def test_an_adapter_adds_its_branch_to_the_mlp_output():
    """h + up(GELU(down(h))) with h = mlp(x), in float64 by hand, once the up projection is not zero."""
    from roli.models.peft import Adapter

    torch.manual_seed(0)
    mlp = torch.nn.Linear(12, 12).double()
    a = Adapter(mlp, 12, 4).double()
    assert a.down.out_features == 3 and not a.up.weight.any()
    with torch.no_grad():
        a.up.weight.normal_()
        a.up.bias.normal_()
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    h = x @ mlp.weight.T + mlp.bias
    z = h @ a.down.weight.T + a.down.bias
    gelu = 0.5 * z * (1 + torch.erf(z / 2**0.5))
    torch.testing.assert_close(a(x), h + gelu @ a.up.weight.T + a.up.bias, rtol=1e-12, atol=1e-12)
