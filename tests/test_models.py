"""Backbones, robust checkpoints and PEFT methods on small timm models (CPU, seconds)."""

from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch
from torch import nn

from roli._compat import import_timm
from roli.models import (
    apply_peft,
    count_trainable,
    create_classifier,
    load_checkpoint,
    load_pretrained,
    merge_lora,
    save_checkpoint,
)
from roli.models.peft import LoRAQKV, PromptedAttention

timm = import_timm()
VIT = dict(img_size=32, patch_size=4, depth=2)
SWIN = dict(img_size=32, window_size=2, embed_dim=24, depths=(1, 1), num_heads=(1, 2))


def small_resnet(num_classes=10):
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], channels=(8, 16, 32, 64), num_classes=num_classes)


def images(n=4, seed=0, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# -- classifier -------------------------------------------------------------------------------------


def test_timm_classifier_api():
    m = create_classifier("vit_tiny_patch16_224", 7, **VIT).eval()
    x = images()
    f = m.features(x)
    assert f.shape == (4, 192) and m.feat_dim == 192
    torch.testing.assert_close(m(x), m.head(f))
    assert m.mean is not None and m.pre.input_size is None  # img_size given: no resize inside
    native = create_classifier("resnet18", 3)
    assert native.pre.input_size == (224, 224)  # timm's native resolution: a 32x32 image is resized inside
    assert native.eval()(images()).shape == (4, 3)


def test_timm_pretrained_without_hub_is_a_clear_error(monkeypatch):
    calls = []

    def no_hub(name, pretrained=False, **kwargs):
        calls.append(pretrained)
        raise OSError("We couldn't connect to the hub to load this model")

    monkeypatch.setattr(timm, "create_model", no_hub)
    with pytest.raises(ValueError, match="resnet18: timm's weights are not in the local cache.*give --checkpoint FILE"):
        create_classifier("resnet18", 3, pretrained=True)
    assert calls == [True]


def test_user_module_and_factory():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    m = create_classifier(plain, 5, mean=None, std=None)
    assert m.feat_dim == 4 and m(images()).shape == (4, 5)
    f = create_classifier("roli.models.small:small_cnn", 10, in_chans=1, width=8)
    assert f.feat_dim == 16 and f.classifier_key == "fc"
    rgb = create_classifier("roli.models.small:small_cnn", 10, in_chans=3, width=8)  # in_chans reaches the factory
    assert rgb(images()).shape == (4, 10)
    with pytest.raises(ValueError, match="cannot import model factory"):
        create_classifier("roli.models.small:nope", 10)
    with pytest.raises(ValueError, match="not a timm model name"):
        create_classifier("resnet_does_not_exist", 10)
    with pytest.raises(ValueError, match="must return \\(B, D\\)"):
        create_classifier(nn.Conv2d(3, 4, 3), 5, mean=None, std=None)


# -- checkpoints ------------------------------------------------------------------------------------


def _save(state, path, nest):
    obj = state if nest is None else {nest: state, "epoch": 3}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(obj, path)


def _expect_same(target, src, x):
    target.eval()
    src.eval()
    with torch.no_grad():
        want_f = src.forward_head(src.forward_features(target.pre(x)), pre_logits=True)
        torch.testing.assert_close(target.features(x), want_f, rtol=0, atol=0)


# safetensors files hold a flat state dict: no nesting key for them.
NESTS = (None, "state_dict", "model", "model_state", "net")
FORMATS = [(s, n) for s in (".pt", ".pth", ".bin", ".safetensors") for n in NESTS if s != ".safetensors" or n is None]


@pytest.mark.parametrize("suffix, nest", FORMATS)
@pytest.mark.parametrize("prefix", ["", "module.", "model.", "module.model.", "backbone."])
def test_checkpoint_formats_round_trip(tmp_path, suffix, nest, prefix):
    torch.manual_seed(1)
    src = small_resnet(10)
    state = {prefix + k: v for k, v in src.state_dict().items()}
    path = tmp_path / f"ck{suffix}"
    _save(state, path, nest)
    target = create_classifier(small_resnet(0), 10)
    report = load_pretrained(target, path, keep_head=True)
    assert report.head_loaded and report.prefix == prefix
    _expect_same(target, src, images())
    torch.testing.assert_close(target.eval()(images()), src.eval()(target.pre(images())), rtol=0, atol=0)


def test_madrylab_format_drops_normalizer(tmp_path):
    src = small_resnet(10)
    sd = src.state_dict()
    state = {f"module.model.{k}": v for k, v in sd.items()}
    state |= {f"module.attacker.model.{k}": v.clone() for k, v in sd.items()}
    state |= {"module.normalizer.new_mean": torch.rand(3, 1, 1), "module.normalizer.new_std": torch.rand(3, 1, 1),
              "module.attacker.normalize.new_mean": torch.rand(3, 1, 1),
              "module.attacker.normalize.new_std": torch.rand(3, 1, 1)}  # fmt: skip
    torch.save({"model": state, "epoch": 90, "optimizer": {"lr": 0.1}}, tmp_path / "madry.pt")
    target = create_classifier(small_resnet(0), 10)
    report = load_pretrained(target, tmp_path / "madry.pt")
    assert report.prefix == "module.model." and len(report.ignored) == len(sd) + 4
    _expect_same(target, src, images())


def test_source_classifier_is_not_the_head_unless_asked(tmp_path):
    src = small_resnet(10)
    torch.save(src.state_dict(), tmp_path / "c10.pth")
    torch.manual_seed(3)
    target = create_classifier(small_resnet(0), 10)
    fresh = target.head.weight.clone()
    report = load_pretrained(target, tmp_path / "c10.pth")
    assert not report.head_loaded and "is not used: a fresh random head" in report.head
    assert torch.equal(target.head.weight, fresh)  # the same class count, and still the fresh head
    _expect_same(target, src, images())


def test_head_of_other_class_count_is_dropped_and_reported(tmp_path):
    src = small_resnet(1000)
    torch.save(src.state_dict(), tmp_path / "in1k.pth")
    target = create_classifier(small_resnet(0), 10)
    head_before = target.head.weight.clone()
    report = load_pretrained(target, tmp_path / "in1k.pth")
    assert report.head.startswith("dropped (checkpoint has 1000 classes")
    assert torch.equal(target.head.weight, head_before)
    _expect_same(target, src, images())


def test_timm_vit_names_and_head(tmp_path):
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, **VIT)
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "ares.pth")
    target = create_classifier("vit_tiny_patch16_224", 10, **VIT)
    assert load_pretrained(target, tmp_path / "ares.pth", keep_head=True).head_loaded
    _expect_same(target, src, images())


def test_strict_errors_and_non_strict(tmp_path):
    sd = small_resnet(10).state_dict()
    missing = {k: v for k, v in sd.items() if not k.startswith("layer4.0.conv1")}
    torch.save(missing, tmp_path / "missing.pt")
    with pytest.raises(
        ValueError, match=r"1 missing keys \(layer4.0.conv1.weight\).*strict=False \(CLI: --non-strict\)"
    ):
        load_pretrained(create_classifier(small_resnet(0), 10), tmp_path / "missing.pt")
    report = load_pretrained(create_classifier(small_resnet(0), 10), tmp_path / "missing.pt", strict=False)
    assert report.missing == ["layer4.0.conv1.weight"] and "NOT STRICT" in str(report)
    torch.save(sd | {"extra.weight": torch.rand(3)}, tmp_path / "extra.pt")
    with pytest.raises(ValueError, match=r"1 unexpected keys \(extra.weight\)"):
        load_pretrained(create_classifier(small_resnet(0), 10), tmp_path / "extra.pt")
    torch.save({"foo.weight": torch.rand(3)}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="no tensor matches the backbone"):
        load_pretrained(create_classifier(small_resnet(0), 10), tmp_path / "foreign.pt", strict=False)
    torch.save(timm.create_model("resnet18").state_dict(), tmp_path / "r18.pt")
    with pytest.raises(ValueError, match="other shapes"):
        load_pretrained(create_classifier(small_resnet(0), 10), tmp_path / "r18.pt", strict=False)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


class _Mkdir:
    """Unpickled, it makes a folder: the proof that a file ran code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_refuses_arbitrary_pickles_and_missing_files(tmp_path):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"state_dict": {"w": _Evil()}}, f)
    with pytest.raises(ValueError, match="weights-only"):
        load_pretrained(create_classifier(small_resnet(0), 10), tmp_path / "evil.pt")
    src = small_resnet(10).state_dict()
    marker = tmp_path / "code-ran"
    for i, payload in enumerate([{"state_dict": {**src, "x": _Mkdir(marker)}}, {**src, "x": _Mkdir(marker)}]):
        torch.save(payload, tmp_path / f"saved{i}.pt")  # torch's own format: a valid state dict beside the payload
        with pytest.raises(ValueError) as e:
            load_pretrained(create_classifier(small_resnet(0), 10), tmp_path / f"saved{i}.pt")
        assert str(e.value).startswith(f"cannot read {tmp_path / f'saved{i}.pt'} as a weights-only checkpoint (")
        assert str(e.value).endswith("re-save it as a plain state dict or .safetensors") and not marker.exists()
    with pytest.raises(ValueError, match="checkpoint not found"):
        load_pretrained(create_classifier(small_resnet(0), 10), tmp_path / "nope.pt")


def test_what_counts_as_a_state_dict_and_what_as_its_wrapper(tmp_path):
    src = small_resnet(10)
    state = src.state_dict()
    notes = {f"note{i}": "x" for i in range(len(state))}  # exactly half of the entries are not tensors
    payloads = [{"model": state, "steps": torch.tensor(5), "epoch": 5}, {**state, **notes},
                {"model": {"state_dict": {"net": state}, "epoch": 2}, "args": {}}]  # nested three deep  # fmt: skip
    for i, payload in enumerate(payloads):
        torch.save(payload, tmp_path / f"{i}.pt")
        target = create_classifier(small_resnet(0), 10)
        assert load_pretrained(target, tmp_path / f"{i}.pt", keep_head=True).head_loaded
        torch.testing.assert_close(target.eval()(images()), src.eval()(target.pre(images())), rtol=0, atol=0)
    torch.save({"state_dict": {}, "epoch": 3}, tmp_path / "empty.pt")
    with pytest.raises(ValueError) as e:
        load_pretrained(create_classifier(small_resnet(0), 10), tmp_path / "empty.pt")
    assert str(e.value) == (
        f"{tmp_path / 'empty.pt'} holds no state dict of tensors (looked under state_dict, model, model_state, net)"
    )


def test_own_checkpoints_full_and_trainable_only(tmp_path, monkeypatch):
    torch.manual_seed(0)
    m = create_classifier("vit_tiny_patch16_224", 5, **VIT)
    apply_peft(m, "lora", lora_rank=4)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    save_checkpoint(m, tmp_path / "full.pt", meta={"epoch": 3})
    save_checkpoint(m, tmp_path / "peft.pt", trainable_only=True)
    fresh = create_classifier("vit_tiny_patch16_224", 5, **VIT)
    apply_peft(fresh, "lora", lora_rank=4)
    assert load_checkpoint(fresh, tmp_path / "full.pt") == {"epoch": 3}
    torch.testing.assert_close(fresh.eval()(images()), m.eval()(images()))
    base = create_classifier("vit_tiny_patch16_224", 5, **VIT)
    apply_peft(base, "lora", lora_rank=4)
    frozen = {k: v for k, v in m.state_dict().items() if "lora_" not in k and not k.startswith("head.")}
    assert not base.load_state_dict(frozen, strict=False).unexpected_keys  # the pretrained backbone
    load_checkpoint(base, tmp_path / "peft.pt")  # only the trainable tensors: LoRA and head
    torch.testing.assert_close(base.eval()(images()), m.eval()(images()))
    assert (tmp_path / "peft.pt").stat().st_size < (tmp_path / "full.pt").stat().st_size / 4
    # A failed save leaves the previous checkpoint intact and no temporary file behind.
    good = (tmp_path / "full.pt").read_bytes()
    monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(m, tmp_path / "full.pt")
    assert (tmp_path / "full.pt").read_bytes() == good and not list(tmp_path.glob(".*tmp"))
    with pytest.raises(ValueError, match="does not fit this model"):
        load_checkpoint(create_classifier("vit_tiny_patch16_224", 7, **VIT), tmp_path / "full.pt")


def test_own_checkpoints_that_do_not_fit_are_named_key_by_key(tmp_path):
    from torch import nn

    class Two(nn.Module):
        def __init__(self, extra=False, width=3):
            super().__init__()
            self.a, self.b = nn.Linear(2, width), nn.Linear(width, 2)
            if extra:
                self.c = nn.Linear(2, 2)

    torch.manual_seed(0)
    save_checkpoint(Two(), tmp_path / "two.pt")
    save_checkpoint(Two(extra=True), tmp_path / "three.pt")
    cases = {
        "missing": (Two(extra=True), "two.pt", "2 missing (c.weight, c.bias), 0 unexpected (), 0 with other shapes ()"),
        "unexpected": (Two(), "three.pt", "0 missing (), 2 unexpected (c.weight, c.bias), 0 with other shapes ()"),
        "shapes": (Two(width=4), "two.pt", "0 missing (), 0 unexpected (), 3 with other shapes (a.weight: (3, 2) vs "
                   "(4, 2), a.bias: (3,) vs (4,))"),
    }  # fmt: skip
    for model, name, what in cases.values():
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(ValueError) as e:
            load_checkpoint(model, tmp_path / name)
        assert str(e.value) == f"{tmp_path / name} does not fit this model: {what}"
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing loaded
    with pytest.raises(ValueError) as e:
        load_checkpoint(Two(), tmp_path / "absent.pt")
    assert str(e.value) == f"checkpoint not found: {tmp_path / 'absent.pt'}"
    torch.save({"a.weight": torch.rand(3, 2)}, tmp_path / "plain.pt")
    with pytest.raises(ValueError) as e:
        load_checkpoint(Two(), tmp_path / "plain.pt")
    assert (
        str(e.value) == f"{tmp_path / 'plain.pt'} is not a roli checkpoint (for published weights use load_pretrained)"
    )


def test_the_load_report_reads_as_one_line():
    from roli.models import LoadReport

    report = LoadReport("w.pth", "module.", 12, "not in checkpoint", ["normalizer.mean", "normalizer.std"],
                        ["x"], [], ["EMA weights (state_dict_ema)"])  # fmt: skip
    assert str(report) == (
        "loaded 12 backbone tensors from w.pth; head: not in checkpoint; stripped prefix 'module.'; ignored 2 wrapper "
        "entries; EMA weights (state_dict_ema); NOT STRICT: 1 missing, 0 unexpected keys"
    )
    assert (
        str(LoadReport("w.pth", "", 3, "dropped (...)")) == "loaded 3 backbone tensors from w.pth; head: dropped (...)"
    )


# -- PEFT -----------------------------------------------------------------------------------------------


CASES = [
    ("vit_tiny_patch16_224", VIT, ("full", "linear", "lora", "adapter", "vpt-gated", "bias")),
    ("swin_tiny_patch4_window7_224", SWIN, ("full", "linear", "lora", "adapter", "vpt-gated", "bias")),
    ("resnet", None, ("full", "linear", "bias")),
]


def _model(name, kwargs, classes=10):
    torch.manual_seed(0)
    return (
        create_classifier(small_resnet(0), classes) if name == "resnet" else create_classifier(name, classes, **kwargs)
    )


@pytest.mark.parametrize("name, kwargs, methods", CASES, ids=[c[0] for c in CASES])
def test_peft_is_the_base_function_at_init(name, kwargs, methods):
    base = _model(name, kwargs).eval()
    x = images(6, seed=3)
    with torch.no_grad():
        ref = base(x)
    for method in methods:
        m = copy.deepcopy(base)
        apply_peft(m, method)
        with torch.no_grad():
            out = m.eval()(x)
        assert (out - ref).abs().max().item() <= 1e-6, method


def test_trainable_counts_vit():
    d, heads, blocks, classes, r = 192, 3, 2, 10, 16
    head = d * classes + classes
    expected = {
        "linear": head,
        "lora": head + blocks * 2 * (r * d + d * r),  # q and v: A (r, d) and B (d, r)
        "adapter": head + blocks * (d * (d // 8) + d // 8 + (d // 8) * d + d),
        "vpt-gated": head + blocks * (10 * d + heads),
        "vpt": head + blocks * 10 * d,  # one set of 10 prompts per block
    }
    for method, want in expected.items():
        m = _model("vit_tiny_patch16_224", VIT)
        info = apply_peft(m, method)
        assert info["trainable"] == want == count_trainable(m), method
    m = _model("vit_tiny_patch16_224", VIT)
    bias = sum(p.numel() for n, p in m.named_parameters() if n.endswith("bias") and not n.startswith("head."))
    assert apply_peft(m, "bias")["trainable"] == bias + head
    assert (
        apply_peft(_model("vit_tiny_patch16_224", VIT), "lora", lora_targets="qkv")["trainable"]
        == head + blocks * 3 * 2 * r * d
    )


def test_vpt_on_swin_learns_after_a_step_and_drops_prompts_in_training_only():
    """vpt-gated on Swin (every window's tokens attend to the block's prompts): the gate gets a gradient at once;
    after one step the prompts do too and the function has moved; prompt dropout acts in train mode only."""
    x, y = images(4, seed=5), torch.tensor([0, 1, 2, 3])
    m = _model("swin_tiny_patch4_window7_224", {**SWIN, "drop_path_rate": 0.0})  # prompt dropout the only draw
    info = apply_peft(m, "vpt-gated", vpt_tokens=4, vpt_dropout=0.1)
    blocks = [mod for mod in m.modules() if hasattr(mod, "prompts")]
    assert len(blocks) == sum(SWIN["depths"]) and info["trainable"] == count_trainable(m)
    with torch.no_grad():
        before = m.eval()(x)
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)
    nn.functional.cross_entropy(m.train()(x), y).backward()
    assert all(b.gate.grad.abs().sum() > 0 for b in blocks)
    opt.step()
    opt.zero_grad()
    nn.functional.cross_entropy(m.train()(x), y).backward()
    assert all(b.prompts.grad is not None and b.prompts.grad.abs().sum() > 0 for b in blocks)
    with torch.no_grad():
        assert not torch.allclose(m.eval()(x), before)
        # Prompt dropout draws in train mode only: two train-mode passes differ, two eval-mode passes do not,
        # and without prompt dropout the train-mode passes agree (no other randomness in this model).
        torch.manual_seed(0)
        assert not torch.equal(m.train()(x), m.train()(x))
        torch.testing.assert_close(m.eval()(x), m.eval()(x), rtol=0, atol=0)
        for b in blocks:
            b.prompt_dropout.p = 0.0
        torch.testing.assert_close(m.train()(x), m.train()(x), rtol=0, atol=0)


def test_peft_branches_receive_gradients_and_reference_bugs_absent():
    x, y = images(4, seed=5), torch.tensor([0, 1, 2, 3])
    for method, names in (("lora", ("lora_B",)), ("adapter", (".up.",)), ("vpt-gated", (".gate",)),
                          ("vpt", ("vpt_prompts",))):  # fmt: skip
        m = _model("vit_tiny_patch16_224", VIT)
        apply_peft(m, method)
        nn.functional.cross_entropy(m.train()(x), y).backward()
        grads = [p.grad for n, p in m.named_parameters() if any(s in n for s in names)]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), method
        assert all(p.grad is None for n, p in m.named_parameters() if not p.requires_grad)
    m = _model("vit_tiny_patch16_224", VIT)
    apply_peft(m, "lora")
    q = m.backbone.blocks[0].attn.qkv
    assert isinstance(q, LoRAQKV) and q.lora_A["q"].abs().sum() > 0 and q.lora_B["q"].abs().sum() == 0
    m = _model("vit_tiny_patch16_224", VIT)
    apply_peft(m, "adapter")
    ad = m.backbone.blocks[0].mlp
    assert ad.down.weight.abs().sum() > 0 and ad.up.weight.abs().sum() == 0


def test_linear_probe_keeps_backbone_in_eval_mode():
    m = _model("resnet", None)
    apply_peft(m, "linear")
    m.train()
    assert m.head.training and not any(mod.training for mod in m.backbone.modules())
    assert all(not p.requires_grad for p in m.backbone.parameters())


def test_lora_output_is_base_plus_alpha_over_rank_times_b_a_x():
    """Hu et al. (2021): h = W x + (alpha / r) B A x, on the q and v thirds of the qkv projection only."""
    torch.manual_seed(0)
    base = nn.Linear(8, 24).double()
    rank, alpha = 4, 16.0
    lora = LoRAQKV(base, rank, alpha, 0.0, "qv").double()
    with torch.no_grad():
        for t in "qv":
            lora.lora_B[t].normal_(0, 0.3)
    x = torch.randn(5, 7, 8, dtype=torch.float64)
    a, b = {t: lora.lora_A[t].detach() for t in "qv"}, {t: lora.lora_B[t].detach() for t in "qv"}
    w, bias = base.weight.detach(), base.bias.detach()
    want = x @ w.t() + bias
    scale = 16.0 / 4  # alpha / r, written out
    want[..., 0:8] += scale * (x @ a["q"].t() @ b["q"].t())
    want[..., 16:24] += scale * (x @ a["v"].t() @ b["v"].t())  # the k third (8:16) has no update
    with torch.no_grad():
        torch.testing.assert_close(lora(x), want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lora.merged()(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "method, backbone_training",
    [
        ("full", True),
        ("linear", False),
        ("lora", False),
        ("adapter", False),
        ("bias", False),
        ("vpt", False),
        ("vpt-gated", False),
    ],  # fmt: skip
)
def test_encoder_mode_after_train_follows_the_reference(method, backbone_training):
    """The reference keeps the encoder in eval mode for linear, LoRA, Adapter and Bias (froze_enc): no drop-path,
    no LoRA dropout; full finetuning trains it; VPT is eval with only the prompts' dropout active."""
    m = _model("vit_tiny_patch16_224", {**VIT, "drop_path_rate": 0.1})
    apply_peft(m, method, lora_dropout=0.1, vpt_dropout=0.1)
    m.train()
    assert m.training and m.head.training
    prompt_dropouts = {id(mod.prompt_dropout) for mod in m.modules() if hasattr(mod, "prompt_dropout")}
    others = [mod for mod in m.backbone.modules() if id(mod) not in prompt_dropouts]
    assert all(mod.training == backbone_training for mod in others), method
    assert len(prompt_dropouts) == {"vpt-gated": VIT["depth"], "vpt": 1}.get(method, 0)
    assert all(mod.prompt_dropout.training for mod in m.modules() if hasattr(mod, "prompt_dropout"))
    m.eval()
    assert not any(mod.training for mod in m.modules())


def test_head_inits():
    """reference: kaiming_normal_ fan_out (std sqrt(2 / classes)) and bias -log(99) = -4.59512 (src/models/mlp.py);
    torch: nn.Linear's bounds; zero: zeros."""
    from roli.models import init_head

    torch.manual_seed(0)
    head = nn.Linear(512, 1000)
    init_head(head, "reference")
    w = head.weight.detach()
    assert abs(float(w.std()) - (2 / 1000) ** 0.5) < 0.002 and abs(float(w.mean())) < 0.001
    assert torch.allclose(head.bias, torch.full((1000,), -4.59511985), atol=1e-6)
    init_head(head, "torch")
    bound = 1 / 512**0.5
    w = head.weight.detach()
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
    assert float(head.bias.detach().abs().max()) <= bound
    init_head(head, "zero")
    assert not head.weight.any() and not head.bias.any()
    with pytest.raises(ValueError, match="head init 'xavier' is not one of reference, torch, zero"):
        init_head(head, "xavier")


def test_lora_init_and_dropout():
    """A: nn.Linear's init (kaiming_uniform_, a = sqrt(5): bound 1 / sqrt(in)); B zero; LoRA dropout acts on the
    branch's input in train mode only; a projection that is not 3 x dim wide is refused."""
    torch.manual_seed(0)
    lora = LoRAQKV(nn.Linear(192, 576), rank=16, alpha=16.0, dropout=0.5, targets="qv")
    bound = 1 / 192**0.5
    for t in "qv":
        a = lora.lora_A[t].detach()
        assert float(a.abs().max()) <= bound and float(a.abs().max()) > 0.99 * bound
        assert not lora.lora_B[t].any()
        lora.lora_B[t].data.normal_()
    x = torch.randn(4, 192)
    with torch.no_grad():
        lora.eval()
        assert torch.equal(lora(x), lora(x))
        lora.train()
        assert not torch.equal(lora(x), lora(x))
    with pytest.raises(ValueError, match="a qkv projection must have 3 x dim outputs; got 100"):
        LoRAQKV(nn.Linear(8, 100), rank=2, alpha=2.0, dropout=0.0, targets="qv")


def test_merge_lora_for_export():
    m = _model("vit_tiny_patch16_224", VIT)
    apply_peft(m, "lora", lora_rank=4, lora_alpha=8)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    x = images(3, seed=9)
    with torch.no_grad():
        before = m.eval()(x)
        assert merge_lora(m) == 2
        after = m(x)
    assert not any(isinstance(mod, LoRAQKV) for mod in m.modules())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_peft_rejects_unsupported():
    with pytest.raises(ValueError, match="LoRA applies to ViT/Swin"):
        apply_peft(_model("resnet", None), "lora")
    with pytest.raises(ValueError, match="VPT applies to ViT and Swin"):
        apply_peft(_model("resnet", None), "vpt-gated")
    with pytest.raises(ValueError, match="is not a timm ViT or Swin: VPT"):
        apply_peft(_model("resnet", None), "vpt")
    with pytest.raises(ValueError, match="unknown PEFT method"):
        apply_peft(_model("resnet", None), "prefix")


# -- VPT as the paper ran it (roli.models.vpt) ------------------------------------------------------------------


def test_vpt_on_vit_inserts_prompts_after_cls_in_every_block():
    m = _model("vit_tiny_patch16_224", VIT).eval()
    x = images(2, seed=4)
    with torch.no_grad():
        before = m(x)
    apply_peft(m, "vpt", vpt_tokens=5)
    seen = []
    hooks = [b.register_forward_pre_hook(lambda mod, a: seen.append(a[0].detach().clone())) for b in m.backbone.blocks]
    with torch.no_grad():
        after = m(x)
    for h in hooks:
        h.remove()
    patches = (32 // 4) ** 2
    assert [t.shape[1] for t in seen] == [1 + 5 + patches] * VIT["depth"]  # CLS + prompts + patches, every block
    prompts = m.backbone.vpt_prompts.detach()  # (depth, 5, 192): each block gets its own set, right after CLS
    for i, t in enumerate(seen):
        assert torch.equal(t[:, 1:6], prompts[i].expand(2, -1, -1))
    bound = (6 / (3 * 4 * 4 + 192)) ** 0.5  # the reference's uniform init, patch 4
    assert float(prompts.abs().max()) <= bound and float(prompts.abs().max()) > 0.9 * bound
    assert (after - before).abs().max() > 1e-3  # the prompts change the function at init (RanLI-VPT)


def _swin_by_hand(m, x, prompts):
    """One Swin block with the window covering the whole 4x4 grid (no shift), written out in float64: prompts in
    front of the tokens, one softmax over both with the relative position bias zero for prompt rows/columns, the
    residual and the MLP on all tokens, the final LayerNorm and the mean over prompts and tokens."""
    bb = m.backbone
    blk = bb.layers[0].blocks[0]
    t = bb.patch_embed(x).flatten(1, 2)  # (B, 16, C)
    b, n, c = t.shape[0], prompts.shape[0], t.shape[2]
    t = torch.cat([prompts.expand(b, -1, -1), t], 1)
    h = blk.norm1(t)
    heads = blk.attn.num_heads
    q, k, v = (blk.attn.qkv(h).view(b, n + 16, 3, heads, c // heads).permute(2, 0, 3, 1, 4)).unbind(0)
    logits = q @ k.transpose(-1, -2) / (c // heads) ** 0.5
    table = blk.attn.relative_position_bias_table
    index = blk.attn.relative_position_index.view(-1)
    rel = torch.zeros(heads, n + 16, n + 16, dtype=x.dtype)
    rel[:, n:, n:] = table[index].view(16, 16, heads).permute(2, 0, 1)
    out = blk.attn.proj((torch.softmax(logits + rel, -1) @ v).transpose(1, 2).reshape(b, n + 16, c))
    t = t + out
    t = t + blk.mlp(blk.norm2(t))
    return bb.norm(t).mean(1)


def test_vpt_on_swin_matches_the_reference_computation_in_one_window():
    torch.manual_seed(0)
    m = create_classifier("swin_tiny_patch4_window7_224", 10, img_size=16, window_size=4, embed_dim=24, depths=(1,),
                          num_heads=(2,)).double().eval()  # fmt: skip
    apply_peft(m, "vpt", vpt_tokens=3)
    x = images(2, seed=5).double()[:, :, :16, :16]
    with torch.no_grad():
        got = m.features(x)
        want = _swin_by_hand(m, m.pre(x), m.backbone.vpt_prompts[0][0])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_vpt_on_swin_prompt_shapes_and_each_image_its_own_prompts():
    """Deep prompts: one set per block, embed_dim * 2^stage wide. With several windows, shifted windows and two
    stages, an image's features do not depend on the other images of its batch (each window attends with its
    own image's prompts; the reference pairs windows and prompts of different images where a stage has more
    than one window)."""
    m = _model("swin_tiny_patch4_window7_224", {**SWIN, "depths": (2, 2)}).eval()
    apply_peft(m, "vpt", vpt_tokens=4)
    assert [tuple(p.shape) for p in m.backbone.vpt_prompts] == [(2, 4, 24), (2, 4, 48)]
    x = images(3, seed=6)
    with torch.no_grad():
        together = m(x)
        alone = torch.cat([m(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)
    base = _model("swin_tiny_patch4_window7_224", {**SWIN, "depths": (2, 2)}).eval()
    with torch.no_grad():
        assert (together - base(x)).abs().max() > 1e-3
    # gradients reach every stage's prompts
    nn.functional.cross_entropy(m.train()(x), torch.tensor([0, 1, 2])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.vpt_prompts)


def test_apply_peft_arguments_and_report():
    m = _model("vit_tiny_patch16_224", VIT)
    total = sum(p.numel() for p in m.parameters())
    assert apply_peft(m, "full") == {"method": "full", "trainable": total, "total": total}
    assert all(p.requires_grad for p in m.parameters())
    # the smallest valid settings work; one below is refused with the rule
    assert apply_peft(_model("vit_tiny_patch16_224", VIT), "lora", lora_rank=1)["trainable"] > 0
    assert apply_peft(_model("vit_tiny_patch16_224", VIT), "adapter", adapter_reduction=1)["trainable"] > 0
    vpt = _model("vit_tiny_patch16_224", VIT)
    apply_peft(vpt, "vpt", vpt_tokens=1, vpt_dropout=0.25)
    assert vpt.backbone.vpt_prompts.shape[1] == 1 and vpt.backbone.prompt_dropout.p == 0.25
    gated = _model("vit_tiny_patch16_224", VIT)
    apply_peft(gated, "vpt-gated", vpt_tokens=1, vpt_dropout=0.99)
    assert {mod.prompt_dropout.p for mod in gated.modules() if isinstance(mod, PromptedAttention)} == {0.99}
    for method, kwargs, message in [
        ("lora", dict(lora_rank=0), "LoRA needs rank >= 1 and targets from q, k, v; got rank 0, 'qv'"),
        ("lora", dict(lora_targets="qx"), "LoRA needs rank >= 1 and targets from q, k, v; got rank 16, 'qx'"),
        ("lora", dict(lora_targets="qq"), "LoRA needs rank >= 1 and targets from q, k, v; got rank 16, 'qq'"),
        ("adapter", dict(adapter_reduction=0), "adapter_reduction must be >= 1; got 0"),
        ("vpt", dict(vpt_tokens=0), "vpt_tokens must be >= 1; got 0"),
        ("vpt-gated", dict(vpt_dropout=1.0), "vpt_dropout must be in [0, 1); got 1.0"),
    ]:
        with pytest.raises(ValueError) as e:
            apply_peft(_model("vit_tiny_patch16_224", VIT), method, **kwargs)
        assert str(e.value) == message
    with pytest.raises(ValueError, match="use one of full, linear, lora, adapter, vpt, vpt-gated, bias"):
        apply_peft(_model("resnet", None), "prefix")


def test_vpt_gated_output_is_the_attention_plus_the_gated_prompt_branch():
    """vpt-gated with a non-zero gate against the formula written out in float64: attn(x) + W_proj (g * softmax(q
    k_p^T / sqrt(d)) v_p) per head, k_p and v_p the prompts through the block's own k and v projections."""
    torch.manual_seed(0)
    m = _model("vit_tiny_patch16_224", VIT).double().eval()
    apply_peft(m, "vpt-gated", vpt_tokens=3)
    site = m.backbone.blocks[0].attn
    bound = 0.5 / 192**0.5  # roli's own prompt init: uniform in +-0.5 / sqrt(dim)
    p = site.prompts.detach()
    assert float(p.abs().max()) <= bound and float(p.abs().max()) > 0.9 * bound and float(p.min()) < 0
    with torch.no_grad():
        site.gate.copy_(torch.tensor([0.7, -1.3, 0.4], dtype=torch.float64))
        site.attn.qkv.bias.normal_()  # timm starts it at zero: the formula must hold with a bias too
    x = torch.randn(2, 5, 192, dtype=torch.float64)
    a, heads, hd = site.attn, 3, 64
    w, b = a.qkv.weight, a.qkv.bias
    q = (x @ w[:192].t() + b[:192]).view(2, 5, heads, hd).transpose(1, 2)  # (B, H, N, hd)
    kp = (site.prompts @ w[192:384].t() + b[192:384]).view(3, heads, hd).transpose(0, 1)  # (H, P, hd)
    vp = (site.prompts @ w[384:].t() + b[384:]).view(3, heads, hd).transpose(0, 1)
    o = torch.softmax(q @ kp.transpose(-1, -2) / hd**0.5, -1) @ vp  # (B, H, N, hd)
    o = o * site.gate.view(1, heads, 1, 1)
    with torch.no_grad():
        want = a(x) + o.transpose(1, 2).reshape(2, 5, 192) @ a.proj.weight.t()
        torch.testing.assert_close(site(x), want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("method", ["lora", "adapter", "vpt", "vpt-gated"])
def test_peft_branches_take_the_models_dtype(method):
    """Branches added to a float64 (or bf16) model are created in its dtype, as trainable parameters."""
    m = _model("vit_tiny_patch16_224", VIT).double()
    apply_peft(m, method)
    assert {p.dtype for p in m.parameters()} == {torch.float64}
    new = {n: p for n, p in m.named_parameters() if p.requires_grad and not n.startswith("head.")}
    # registered branch tensors, counted by hand for 2 blocks: LoRA (q, v) x (A, B); Adapter down/up weight and
    # bias; VPT one (depth, n, dim) prompt tensor; vpt-gated prompts and gate per block
    assert len(new) == {"lora": 8, "adapter": 8, "vpt": 1, "vpt-gated": 4}[method], sorted(new)
    assert set(new) <= set(m.state_dict())  # saved with the model
    out = m.train()(images(2, seed=1).double())
    assert out.dtype == torch.float64
    out.square().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float64 for p in new.values())
