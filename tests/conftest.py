"""Shared test helpers: which backends run here, an independent float64 reference, ulp distances."""

from __future__ import annotations

import os

# Triton's interpreter must be chosen before triton is imported (its standard library, e.g. tl.sum, is
# itself @triton.jit). CPU test processes therefore interpret; GPU runs set ROLI_TEST_GPU=1 to compile.
# Ahead-of-time compilation is checked in a subprocess without the interpreter (test_triton_kernels.py).
if os.environ.get("ROLI_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from roli import _ext  # noqa: E402
from roli.ops._dispatch import unavailable_reason  # noqa: E402


def triton_cpu_error() -> str | None:
    """Why the Triton kernels cannot run on CPU tensors here (interpreter off, triton missing or too old)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU tensors need TRITON_INTERPRET=1 (set unless ROLI_TEST_GPU=1)"
    return unavailable_reason("triton", torch.device("cpu"), torch.float32)


def cpu_backends() -> list[str]:
    """Backends that can run on CPU tensors in this process (triton through its interpreter)."""
    out = ["torch"]
    if _ext.load():
        out.append("cpp")
    if triton_cpu_error() is None:
        out.append("triton")
    return out


@pytest.fixture
def interpret(monkeypatch):
    """Run Triton kernels through the interpreter on CPU tensors for this test."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def backend_param(backend: str):
    marks = []
    if backend == "cpp" and not _ext.load():
        marks.append(pytest.mark.skip(reason=f"C++ extension unavailable: {_ext.EXT_ERROR}"))
    if backend == "triton" and triton_cpu_error() is not None:
        marks.append(pytest.mark.skip(reason=triton_cpu_error()))
    return pytest.param(backend, marks=marks, id=backend)


BACKENDS = [backend_param(b) for b in ("torch", "cpp", "triton")]


def per_sample(v, batch: int, ndim: int) -> torch.Tensor:
    t = v if isinstance(v, torch.Tensor) else torch.full((batch,), float(v), dtype=torch.float64)
    return t.double().view((-1,) + (1,) * (ndim - 1))


def ref_step(x, g, xn, eps, step, norm="linf", lo=0.0, hi=1.0) -> torch.Tensor:
    """Independent reference in float64 (returns float64)."""
    x, g, xn = x.double(), g.double(), xn.double()
    b, nd = x.shape[0], x.dim()
    e, s = per_sample(eps, b, nd), per_sample(step, b, nd)
    if norm == "linf":
        v = torch.minimum(torch.maximum(x + s * torch.sign(g), xn - e), xn + e)
    else:
        gn = g.reshape(b, -1).norm(dim=1).view(e.shape)
        v = x + torch.where(gn > 0, s / gn, torch.zeros_like(gn)) * g
        d = v - xn
        dn = d.reshape(b, -1).norm(dim=1).view(e.shape)
        v = xn + d * torch.where(dn > e, e / dn, torch.ones_like(dn))
    return v.clamp(lo, hi)


def ordered_bits(t: torch.Tensor) -> torch.Tensor:
    """Integers that are consecutive for consecutive representable values of a 16-bit float dtype."""
    i = t.contiguous().view(torch.int16).to(torch.int32)
    return torch.where(i < 0, -(i & 0x7FFF), i)


def assert_close_ulp(out: torch.Tensor, ref64: torch.Tensor, max_ulp: int = 1) -> None:
    """fp32: max abs diff <= 1e-6. bf16/fp16: within `max_ulp` of the reference rounded to the dtype."""
    if out.dtype == torch.float32:
        diff = (out.double() - ref64).abs().max().item() if out.numel() else 0.0
        assert diff <= 1e-6, f"max abs diff {diff:.3g} > 1e-6"
    elif out.dtype == torch.float64:
        torch.testing.assert_close(out, ref64, rtol=0, atol=1e-12)
    else:
        ulps = (ordered_bits(out) - ordered_bits(ref64.to(out.dtype))).abs()
        assert ulps.numel() == 0 or int(ulps.max()) <= max_ulp, f"{int(ulps.max())} ulp apart"


class ConstantModel(torch.nn.Module):
    """Logits that do not depend on the image: a zero input gradient, so an attack returns its random start."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.b = torch.nn.Parameter(torch.randn(classes))

    def forward(self, x):
        return self.b.expand(x.shape[0], -1) + 0 * x.flatten(1)[:, :1]


LAYOUTS = ("channels_last", "sliced", "mixed")
SLICE = (slice(None), slice(None), slice(None, None, 2), slice(1, -3))  # the "sliced" layout's view


def in_layout(layout: str, x_adv: torch.Tensor, grad: torch.Tensor, x_nat: torch.Tensor):
    """The three (B, C, H, W) operands of a step in a memory layout: all channels_last; strided views into bigger
    tensors ([:, :, ::2, 1:-3]); or mixed (x_adv channels_last, grad with transposed strides, x_nat contiguous)."""
    if layout == "channels_last":
        return tuple(t.contiguous(memory_format=torch.channels_last) for t in (x_adv, grad, x_nat))
    if layout == "sliced":
        out = tuple(t[SLICE] for t in (x_adv, grad, x_nat))
        assert not out[0].is_contiguous()
        return out
    return x_adv.contiguous(memory_format=torch.channels_last), grad.transpose(2, 3).contiguous().transpose(2, 3), x_nat


def assert_only_the_view_changed(parent: torch.Tensor, before: torch.Tensor) -> None:
    """A step on the "sliced" view wrote nothing outside it in its parent tensor."""
    outside = torch.ones_like(parent, dtype=torch.bool)
    outside[SLICE] = False
    assert torch.equal(parent[outside], before[outside])


DIGITS_EPS = 0.1  # digits are 8x8 in [0, 1]: 8/255 would be a very small budget there


def adversarially_train(model, x, y, epochs: int, eps: float = DIGITS_EPS, batch: int = 64) -> None:
    """Madry adversarial training with our PGD-5 (Adam, lr 3e-3): seconds on digits."""
    import torch.nn.functional as F

    from roli.attacks import PGD

    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for i in range(0, len(perm), batch):
            xb, yb = x[perm[i : i + batch]], y[perm[i : i + batch]]
            x_adv = PGD(model, eps=eps, step_size=eps / 4, steps=5, keep="last")(xb, yb)
            model.train()
            loss = F.cross_entropy(model(x_adv), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()


@pytest.fixture(scope="session")
def digits_model():
    """roli.models.small.small_cnn adversarially trained on scikit-learn digits with our PGD (~3 s),
    in eval mode, with the test split: (model, x_test, y_test)."""
    from roli.data.arrays import digits
    from roli.models import NormalizedModel
    from roli.models.small import small_cnn

    pytest.importorskip("sklearn")
    torch.manual_seed(0)
    train, test = digits()
    tr_x, tr_y = train.to_float()
    te_x, te_y = test.to_float()
    model = NormalizedModel(small_cnn(10, 1), None, None)
    adversarially_train(model, tr_x, tr_y, epochs=8)
    return model.eval(), te_x, te_y


@pytest.fixture(scope="session")
def checkpoint(digits_model, tmp_path_factory):
    """The adversarially trained digits CNN (classifier included) as a checkpoint file."""
    model, _, _ = digits_model
    path = tmp_path_factory.mktemp("ck") / "digits_cnn.pt"
    torch.save({"state_dict": model.model.state_dict()}, path)
    return path


# A tiny Swin in ARES-B's layout (the shipped configs' model made small): tests/test_configs.py and others.
TINY_SWIN = {"drop_path_rate": 0.5, "embed_dim": 8, "depths": [1, 1], "num_heads": [1, 2], "img_size": 32,
             "window_size": 4}  # fmt: skip


@pytest.fixture(scope="module")
def tiny_ares(tmp_path_factory) -> str:
    """A tiny Swin's weights in the ARES file layout (a timm state dict with its 1000-class head)."""
    from roli._compat import import_timm

    timm = import_timm()
    net = timm.create_model("swin_base_patch4_window7_224", num_classes=1000, **TINY_SWIN)
    path = tmp_path_factory.mktemp("weights") / "ARES_Swin_base_patch4_window7_224_AT.pth"
    torch.save(net.state_dict(), path)
    return str(path)
