"""FP8 attack passes (--attack-precision fp8, PGD(precision="fp8"), roli.models.fp8) on the CPU.

The CPU computes the float8 numerics emulated (float8 values in a float32 GEMM); the GPU path differs only in the
GEMM call (torch._scaled_mm), whose operand layout and scale convention are checked here against the emulation
through torch's own (slow, reference) CPU _scaled_mm. Expected values: a float64 computation of the scaling
written here, torchao's emulated Float8Linear where torchao is installed, and invariants (which layers, how often
weights are cast, what the update sees)."""

from __future__ import annotations

import copy

import pytest
import torch
from test_fast_paths import COMPILE_MODELS
from test_run_safety import QUICK, one_line
from torch import nn

from roli.attacks import PGD
from roli.models import fp8 as F8
from roli.models.fp8 import FP8Linear, FP8Linears
from roli.training.loop import ft_step, make_optimizer, param_groups


def quantize64(t: torch.Tensor, fmax: float, dtype: torch.dtype) -> torch.Tensor:
    """t as the float8 recipe sends it, in float64: scale fmax / max|t|, round to the float8 grid, scale back."""
    t = t.double()
    scale = fmax / t.abs().max()
    return (t * scale).clamp(-fmax, fmax).to(dtype).double() / scale


def frozen_linear(n_in: int, n_out: int, bias: bool = True) -> nn.Linear:
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():  # weights of different magnitudes per row: the per-tensor scale must be the max
        lin.weight.mul_(torch.linspace(0.1, 3.0, n_out)[:, None])
    return lin.requires_grad_(False)


@pytest.mark.parametrize("bias", [True, False])
def test_fp8_linear_equals_a_float64_computation_of_the_recipe(bias):
    torch.manual_seed(0)
    lin = frozen_linear(64, 96, bias)
    x = (torch.randn(3, 7, 64) * 5).requires_grad_()
    dy = torch.randn(3, 7, 96).bfloat16()
    fp8 = FP8Linear(lin)
    fp8.refresh()
    y = fp8(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    xq, wq = quantize64(x.detach(), 448.0, torch.float8_e4m3fn), quantize64(lin.weight, 448.0, torch.float8_e4m3fn)
    y64 = xq @ wq.T + (lin.bias.bfloat16().double() if bias else 0)
    dx64 = quantize64(dy.float(), 57344.0, torch.float8_e5m2) @ wq
    assert y.dtype == torch.bfloat16 and dx.dtype == x.dtype and dx.shape == x.shape
    torch.testing.assert_close(y.double(), y64, rtol=8e-3, atol=1e-2)  # bf16 output rounding
    torch.testing.assert_close(dx.double(), dx64, rtol=8e-3, atol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as inside an attack: the GEMM stays float32 all the same
        y_ac = fp8(x)
        (dx_ac,) = torch.autograd.grad(y_ac, x, dy)
    assert torch.equal(y_ac, y) and torch.equal(dx_ac, dx)
    # and it is float8, not bf16: the unquantised product is measurably farther away than the rounding
    exact = x.detach().double() @ lin.weight.double().T + (lin.bias.double() if bias else 0)
    assert (exact - y64).norm() / exact.norm() > 5 * ((y.double() - y64).norm() / y64.norm())


def test_fp8_linear_agrees_with_torchao_emulated_float8():
    ao = pytest.importorskip("torchao.float8")
    torch.manual_seed(1)
    lin = frozen_linear(64, 96)
    theirs = nn.Sequential(copy.deepcopy(lin).requires_grad_(True))
    ao.convert_to_float8_training(theirs, config=ao.Float8LinearConfig(emulate=True))
    assert type(theirs[0]).__name__ == "Float8Linear"
    x = torch.randn(5, 11, 64).bfloat16().float().requires_grad_()  # bf16-exact: both see the same values
    dy = torch.randn(5, 11, 96).bfloat16()
    y_ao = theirs(x)
    (dx_ao,) = torch.autograd.grad(y_ao, x, dy.float())
    ours = nn.Sequential(lin)
    with FP8Linears(ours).applied():
        y = ours(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    for a, b in ((y, y_ao), (dx, dx_ao)):
        assert (a.float() - b.float()).norm() / b.norm() < 4e-3  # measured 0.17% (our bf16 output)


def test_the_cuda_gemm_call_agrees_with_the_emulation():
    """torch._scaled_mm (the GPU's call, here torch's CPU reference kernel) with the operands and inverse scales
    as FP8Linear passes them, against the float32 emulation: forward (e4m3 x e4m3, bias) and backward (e5m2 x
    e4m3 through the transposed weight copy)."""
    torch.manual_seed(2)
    lin = frozen_linear(32, 48)
    fp8 = FP8Linear(lin)
    fp8.refresh()
    x8, x_inv = F8.to_float8(torch.randn(20, 32), F8.E4M3)
    g8, g_inv = F8.to_float8(torch.randn(20, 48) * 1e-3, F8.E5M2)
    pairs = [((x8, fp8.w8.t(), x_inv, fp8.w_inv, fp8.bias16), {"bias": fp8.bias16}),
             ((g8, fp8.w8t.t(), g_inv, fp8.w_inv, None), {})]  # fmt: skip
    for (a, b, sa, sb, bias), kw in pairs:
        emulated = F8.scaled_mm(a, b, sa, sb, bias)
        kernel = torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, **kw)
        torch.testing.assert_close(kernel.float(), emulated.float(), rtol=1e-2, atol=1e-2 * emulated.abs().max())


def test_which_linears_run_in_fp8_and_the_model_is_restored():
    torch.manual_seed(0)
    model = COMPILE_MODELS["vit"]()  # tiny ViT: qkv, proj, fc1, fc2 (48 wide) and a 4-class head
    shared = nn.Linear(48, 48)
    model.extra = nn.ModuleList([shared, shared])  # called from two places: never swapped
    hooked = model.backbone.blocks[0].mlp.fc2
    hooked.register_forward_hook(lambda *a: None)  # a user's hook: kept on the nn.Linear it belongs to
    linears = FP8Linears(model)
    names = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear))
    with linears.applied():
        swapped = sorted(n.removesuffix(".linear") for n, m in model.named_modules() if isinstance(m, FP8Linear))
    assert swapped == [n for n in names if n.endswith(("qkv", "proj", "fc1"))], swapped
    assert len(linears) == 3 and "3 of 7 linear layers in FP8" in linears.describe()
    assert not any(isinstance(m, FP8Linear) for m in model.modules()) and model.backbone.blocks[0].mlp.fc2 is hooked
    with pytest.raises(KeyError), linears.applied():  # an error inside: restored all the same
        raise KeyError("x")
    assert not any(isinstance(m, FP8Linear) for m in model.modules())


def test_weights_are_cast_once_per_attack_and_follow_the_update(monkeypatch):
    torch.manual_seed(0)
    model = COMPILE_MODELS["vit"]()
    casts = []
    real = F8.to_float8
    monkeypatch.setattr(F8, "to_float8", lambda t, dtype: casts.append((tuple(t.shape), dtype)) or real(t, dtype))
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,))
    attack = PGD(model, eps=8 / 255, step_size=2 / 255, steps=3, keep="last", precision="fp8", seed=0)
    attack(x, y)
    weights = [s for s in casts if s[0] in {tuple(m.weight.shape) for m in model.modules() if isinstance(m, nn.Linear)}]
    e4m3 = [s for s in casts if s[1] == F8.E4M3]
    # per eligible linear (qkv, proj, fc1, fc2): its weight once, the input at each of the 3 forwards; e5m2: the 3
    # backwards
    assert len(weights) == 4 and len(e4m3) == 4 * (1 + 3) and len(casts) - len(e4m3) == 4 * 3, casts
    qkv = model.backbone.blocks[0].attn.qkv
    fp8 = attack._fp8[1].slots[0][2]
    assert fp8.linear is qkv
    with torch.no_grad():
        qkv.weight.mul_(-2.0)  # an optimizer step, in place: the next attack casts the new weight
    attack(x, y)
    torch.testing.assert_close(fp8.w8.float() * fp8.w_inv, qkv.weight, rtol=0.07, atol=1e-6)


def test_fp8_attack_follows_the_bf16_attacks_direction_and_leaves_the_update_alone(monkeypatch):
    torch.manual_seed(0)
    model = COMPILE_MODELS["vit"]()
    x, y = torch.rand(16, 3, 16, 16), torch.randint(0, 4, (16,))
    deltas = {}
    for precision in ("bf16", "fp8"):
        attack = PGD(model, eps=8 / 255, step_size=8 / 255, steps=1, random_start=False, keep="last",
                     precision=precision)  # fmt: skip
        deltas[precision] = (attack(x, y) - x).sign()
    agree = (deltas["fp8"] == deltas["bf16"]).double().mean()
    assert agree > 0.9, float(agree)  # one FGSM step: the input gradient's signs (measured 0.97 on a tiny ViT)
    # the update: the model's own nn.Linears (bf16 autocast), weight gradients, after an fp8 attack
    seen = []
    real = nn.Linear.forward
    monkeypatch.setattr(nn.Linear, "forward", lambda self, t: seen.append(type(self)) or real(self, t))
    attack = PGD(model, eps=8 / 255, step_size=2 / 255, steps=2, keep="last", precision="fp8", deferred=True)
    opt = make_optimizer(param_groups(model, 0.0), "adamw", 1e-3, 0.9)
    before = copy.deepcopy(model.state_dict())
    ft_step(model, attack, opt, x, y, "bf16")
    # the attack's 2 forwards call only the 4-class head as an nn.Linear (the other 4 run in fp8); the update's
    # forward calls all 5 (a bf16 attack: 2 * 5 + 5)
    assert len(seen) == 2 + 5 and all(t is nn.Linear for t in seen), seen
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fp8_refuses_gpus_without_fp8_and_weight_gradients(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: asked.append(d) or "NVIDIA A100-SXM4-80GB")
    for cap, ok in (((8, 0), False), ((8, 6), False), ((8, 9), True), ((9, 0), True), ((10, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, c=cap: asked.append(d) or c)
        got, why = F8.fp8_supported("cuda:1")
        assert got is ok and (why == "" if ok else f"A100-SXM4-80GB (compute capability {cap[0]}.{cap[1]})" in why)
    assert set(asked) == {torch.device("cuda:1")}  # the GPU asked about, not the current one
    assert F8.fp8_supported("cpu") == (True, "")
    ok, why = F8.fp8_supported("meta")
    assert not ok and "not on meta" in why
    monkeypatch.delattr(torch, "_scaled_mm")
    ok, why = F8.fp8_supported("cpu")
    assert not ok and "has no float8 GEMM" in why
    lin = FP8Linear(nn.Linear(16, 16))  # not frozen: an FP8Linear computes no weight gradient, so it refuses
    lin.refresh()
    assert sorted(lin.state_dict()) == ["linear.bias", "linear.weight"]  # its float8 copies are never saved
    with pytest.raises(RuntimeError, match="input gradients only"):
        lin(torch.randn(2, 16))


def test_the_cli_takes_fp8_for_training_attacks_only(tmp_path, capsys, monkeypatch):
    from roli.config import TrainConfig
    from roli.train import main

    cfg = TrainConfig(method="pretrain", dataset="digits", precision="bf16", attack_precision="fp8")
    spec = cfg.attack_spec
    assert spec.training("pgd", nn.Linear(2, 2)).config.precision == "fp8"
    assert spec.evaluation().precision == "bf16" and spec.single_step("fgsm-rs", nn.Linear(2, 2)).precision == "fp8"
    assert TrainConfig(method="pretrain", dataset="digits").attack_spec.training_precision == "fp32"
    monkeypatch.setattr(F8, "fp8_supported", lambda device: (False, "the GPU says no"))
    run = tmp_path / "run"
    assert main(["--method", "pretrain", "--dataset", "digits", *QUICK, "--attack-precision", "fp8",
                 "--run-dir", str(run)]) == 2  # fmt: skip
    one_line(capsys, "attack-precision fp8: the GPU says no; use --attack-precision bf16")
    assert not run.exists()


def test_an_fp8_attack_reads_no_tensor_value_on_the_host(monkeypatch):
    """The scales are device tensors: no amax is read into Python (each read would make a GPU step wait)."""
    torch.manual_seed(0)
    model = COMPILE_MODELS["vit"]()
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,))
    attack = PGD(model, eps=8 / 255, step_size=2 / 255, steps=2, keep="last", precision="fp8", deferred=True)
    attack(x, y)  # first call: builds the FP8Linears
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "cpu", "numpy"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _n=name, _r=real, **k: reads.append(_n) or _r(self, *a, **k)
        )
    attack(x, y)
    monkeypatch.undo()
    assert reads == []
