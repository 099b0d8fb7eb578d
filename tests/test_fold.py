"""BatchNorm folding for attacks (roli.models.fold): the same function and input gradient as the model,
shared parameters kept in sync, the model restored, and every pair that must not fold left alone."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from roli._compat import import_timm
from roli.attacks import PGD
from roli.models import BatchNormFolding, FoldedConvBN, create_classifier

timm = import_timm()


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """BatchNorm statistics and affine parameters far from their init (which folding would hide)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            if m.track_running_stats:
                m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
            if m.affine:
                m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)
    return model.eval()


def small_resnet() -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    net = ResNet(BasicBlock, [1, 1, 1, 1], channels=(8, 16, 32, 64), num_classes=0)
    model = create_classifier(net, 10, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), input_size=None)
    return _randomise_bn(model)


def _folded(folding):
    return [p.folded for p in folding.pairs]


def _value_and_grad(model, x, y):
    x = x.clone().requires_grad_(True)
    out = model(x)
    (grad,) = torch.autograd.grad(nn.functional.cross_entropy(out, y, reduction="sum"), x)
    return out.detach(), grad


def _frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def test_same_function_and_input_gradient_as_float64_reference():
    model = _frozen(small_resnet())
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(2))
    ref_out, ref_grad = _value_and_grad(copy.deepcopy(model).double(), x.double(), y)
    folding = BatchNormFolding(model)
    assert len(folding) == 13  # the stem, two per block (4 blocks), 4 shortcuts (the stem is 64 wide)
    before = [(n, id(m)) for n, m in model.named_modules()]
    with folding.applied():
        assert sum(isinstance(m, FoldedConvBN) for m in model.modules()) == len(folding)
        out, grad = _value_and_grad(model, x, y)
    assert [(n, id(m)) for n, m in model.named_modules()] == before  # the model is put back as it was
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-6)


def test_folded_weights_follow_the_live_parameters():
    model = small_resnet()
    folding = BatchNormFolding(model)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with folding.applied():
        first = model(x)
    model.train()  # train-mode forwards alone change the running statistics (no version-counter bump)
    with torch.no_grad():
        model(x * 3)
    model.eval()
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
        with folding.applied():
            got = model(x)
    assert not torch.allclose(want.float(), first, atol=1e-3)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    model.train()  # a training step changes the weights and the running statistics in place
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    nn.functional.cross_entropy(model(x), torch.arange(4)).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
    with folding.applied(), torch.no_grad():
        got = model(x)
    assert not torch.allclose(want.float(), first, atol=1e-3)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)  # fp32 against float64


def test_bf16_storage_is_what_autocast_would_cast():
    model = small_resnet()
    folding = BatchNormFolding(model)
    with folding.applied(torch.bfloat16):
        for f in _folded(folding):
            assert f.weight.dtype == torch.bfloat16 and f.bias.dtype == torch.bfloat16
            assert f.weight.stride() == f.conv.weight.stride()
        with pytest.raises(RuntimeError, match="already"), folding.applied():
            pass
    with folding.applied():
        assert all(f.weight.dtype == torch.float32 for f in _folded(folding))


def test_channels_last_weights_stay_channels_last():
    model = small_resnet().to(memory_format=torch.channels_last)
    folding = BatchNormFolding(model)
    x = torch.rand(3, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = model(x)
        with folding.applied():
            got = model(x)
    assert all(f.weight.is_contiguous(memory_format=torch.channels_last) for f in _folded(folding))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _Pairs(nn.Module):
    """Pairs that fold and pairs that must not, side by side."""

    def __init__(self):
        super().__init__()
        self.ok = nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d(4))  # folds (with conv bias)
        self.shared_conv = nn.Conv1d(4, 4, 1)
        self.bn_shared = nn.BatchNorm1d(4)
        self.residual_conv = nn.Conv1d(4, 4, 1)
        self.bn_residual = nn.BatchNorm1d(4)
        self.batch_stats_conv = nn.Conv1d(4, 4, 1)
        self.bn_batch_stats = nn.BatchNorm1d(4, track_running_stats=False)
        self.hooked_conv = nn.Conv1d(4, 4, 1)
        self.bn_hooked = nn.BatchNorm1d(4)

    def forward(self, x):
        x = self.ok(x)
        x = self.bn_shared(self.shared_conv(x)) + self.shared_conv(x)  # the conv is called twice
        r = self.residual_conv(x)
        x = self.bn_residual(r) + r  # the conv's output feeds more than the BatchNorm
        x = self.bn_batch_stats(self.batch_stats_conv(x))
        return self.bn_hooked(self.hooked_conv(x)).flatten(1)


def test_only_safe_pairs_fold():
    model = _randomise_bn(_Pairs())
    calls = []
    model.bn_hooked.register_forward_hook(lambda m, i, o: calls.append(1))
    folding = BatchNormFolding(model)
    assert [(p.conv_at[1], p.bn_at[1]) for p in folding.pairs] == [("0", "1")]
    x = torch.randn(5, 3, 7, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(x)
        with folding.applied():
            got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(calls) == 2  # the hooked BatchNorm ran both times


class _Untraceable(nn.Module):
    """Data-dependent control flow at the top (fx cannot trace it); foldable pairs below."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.calls = 0

    def forward(self, x):
        self.calls += 1  # Python state: the model's own forward still runs with the pairs folded
        out = self.body(x)
        return out.mean((2, 3)) if bool(out.sum() > 0) else -out.mean((2, 3))


def test_untraceable_module_is_searched_child_by_child_and_keeps_its_python_code():
    model = _randomise_bn(_Untraceable())
    folding = BatchNormFolding(model)  # the failed trace ran forward's Python code once, symbolically
    assert len(folding) == 1
    model.calls = 0
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        want = model(x)
        with folding.applied():
            got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert model.calls == 2


def test_training_mode_refused_and_restored_after_an_error():
    model = small_resnet()
    folding = BatchNormFolding(model)
    model.train()
    with pytest.raises(RuntimeError, match="eval mode"), folding.applied():
        pass
    model.eval()
    before = [(n, id(m)) for n, m in model.named_modules()]
    with pytest.raises(KeyError), folding.applied():
        raise KeyError("boom")
    assert [(n, id(m)) for n, m in model.named_modules()] == before


def test_a_replaced_module_is_found_again():
    model = small_resnet()
    folding = BatchNormFolding(model)
    model.backbone.conv1 = copy.deepcopy(model.backbone.conv1)  # e.g. a loaded or re-created stem
    with folding.applied():
        assert isinstance(model.backbone.conv1, FoldedConvBN) and model.backbone.conv1.conv is not None
    assert isinstance(model.backbone.conv1, nn.Conv2d)


def test_pgd_with_and_without_folding(digits_model):
    """Same attack up to float rounding: the adversarial images agree almost everywhere, and robust
    accuracy agrees (fp32 and bf16) on an adversarially trained model with BatchNorm."""
    model, x, y = digits_model
    x, y = x[:200], y[:200]
    assert len(BatchNormFolding(model)) == 3
    kw = dict(eps=0.1, step_size=0.025, steps=10, random_start=False)
    a = PGD(model, fold_bn=True, **kw)(x, y)
    b = PGD(model, fold_bn=False, **kw)(x, y)
    assert float((a - b).abs().gt(1e-5).float().mean()) < 1e-3
    for precision in ("fp32", "bf16"):
        accs = []
        for fold in (True, False):
            x_adv = PGD(model, fold_bn=fold, precision=precision, **kw)(x, y)
            with torch.no_grad():
                accs.append(float((model(x_adv).argmax(1) == y).float().mean()))
        assert abs(accs[0] - accs[1]) <= 0.01, (precision, accs)
    assert not any(isinstance(m, FoldedConvBN) for m in model.modules())


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_batched_refresh_equals_the_formula_for_every_kind_of_pair(dtype):
    """refresh_folded folds all pairs at once: conv with and without bias, BatchNorm with and without affine
    parameters, 1-D and 2-D convs, a float64 conv; each against w g / sqrt(v + e) and (b - m) g / sqrt(v + e)
    + beta written out in float64 (stored in the pair's dtype: rounded once)."""
    from roli.models.fold import refresh_folded

    torch.manual_seed(3)
    pairs = [(nn.Conv2d(3, 5, 3, bias=True), nn.BatchNorm2d(5, eps=1e-3)),
             (nn.Conv2d(5, 4, 1, bias=False), nn.BatchNorm2d(4, affine=False)),
             (nn.Conv1d(2, 6, 3, bias=True), nn.BatchNorm1d(6, affine=False, eps=0.1)),
             (nn.Conv2d(2, 3, 3, bias=False).double(), nn.BatchNorm2d(3).double())]  # fmt: skip
    for _, bn in pairs:
        _randomise_bn(bn, seed=bn.num_features)
    folded = [FoldedConvBN(c, b) for c, b in pairs]
    refresh_folded(folded, dtype)
    for f, (conv, bn) in zip(folded, pairs, strict=True):
        scale = bn.weight.double() if bn.affine else torch.ones(bn.num_features, dtype=torch.float64)
        scale = scale / torch.sqrt(bn.running_var.double() + bn.eps)
        bias = -bn.running_mean.double() * scale
        bias = bias + (bn.bias.double() if bn.affine else 0) + (conv.bias.double() * scale if conv.bias is not None
                                                                  else 0)  # fmt: skip
        w = conv.weight.double() * scale.view(-1, *([1] * (conv.weight.dim() - 1)))
        want_dtype = dtype or conv.weight.dtype
        assert f.weight.dtype == want_dtype and f.bias.dtype == want_dtype
        tol = {torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-12}[want_dtype]
        torch.testing.assert_close(f.weight.double(), w, rtol=tol, atol=tol)
        torch.testing.assert_close(f.bias.double(), bias, rtol=tol, atol=tol)
