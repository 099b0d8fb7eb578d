"""GPU checks: the triton and cuda backends on CUDA tensors, and CUDA-graph capture of the Linf step.

Skipped without a CUDA device. Run on a GPU machine as: ROLI_TEST_GPU=1 python -m pytest tests/test_gpu.py
(ROLI_TEST_GPU=1 keeps Triton compiling instead of interpreting; see conftest.py).
"""

from __future__ import annotations

import pytest
import torch
from conftest import LAYOUTS, assert_close_ulp, assert_only_the_view_changed, in_layout, ref_step

from roli.ops import keep_best_, pgd_step_, unavailable_reason

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
GPU_BACKENDS = ["torch", "triton", "cuda"]


def _skip_unavailable(backend):
    reason = unavailable_reason(backend, torch.device("cuda"), torch.float32)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (7, 3, 33, 17), (64, 3, 32, 32), (4, 3, 224, 224)], ids=str)
def test_matches_reference_on_gpu(backend, norm, dtype, shape):
    _skip_unavailable(backend)
    gen = torch.Generator(device="cuda").manual_seed(0)
    x_nat = torch.rand(shape, generator=gen, device="cuda")
    x_adv = (x_nat + (torch.rand(shape, generator=gen, device="cuda") - 0.5) * 0.05).clamp(0, 1).to(dtype)
    grad = torch.randn(shape, generator=gen, device="cuda").to(dtype)
    x_nat = x_nat.to(dtype)
    eps = torch.rand(shape[0], generator=gen, device="cuda") * (0.1 if norm == "linf" else 2.0)
    step = 2 / 255 if norm == "linf" else 0.3
    out = x_adv.clone()
    pgd_step_(out, grad, x_nat, eps, step, norm=norm, impl=backend)
    assert_close_ulp(out.cpu(), ref_step(x_adv.cpu(), grad.cpu(), x_nat.cpu(), eps.cpu(), step, norm))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_keep_best_on_gpu(backend):
    _skip_unavailable(backend)
    best_x, x_adv = torch.rand(2, 33, 3, 8, 8, device="cuda").unbind(0)
    best_s, score = torch.rand(2, 33, device="cuda").unbind(0)
    want_x = torch.where((score > best_s).view(-1, 1, 1, 1), x_adv, best_x)
    want_s = torch.maximum(score, best_s)
    keep_best_(best_x, best_s, x_adv, score, impl=backend)
    assert torch.equal(best_x, want_x) and torch.equal(best_s, want_s)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_keep_best_keeps_a_float64_score_exact(backend):
    """Scores that differ below float32's resolution: compared and kept in float64, as the CPU kernel does."""
    _skip_unavailable(backend)
    best_x, x_adv = torch.rand(2, 17, 3, 4, 4, device="cuda").unbind(0)
    best_s = torch.rand(17, device="cuda", dtype=torch.float64)
    score = best_s + torch.where(torch.rand(17, device="cuda") > 0.5, 1e-12, -1e-12).double()
    want_x = torch.where((score > best_s).view(-1, 1, 1, 1), x_adv, best_x)
    want_s = torch.maximum(score, best_s)
    keep_best_(best_x, best_s, x_adv, score, impl=backend)
    assert torch.equal(best_x, want_x) and torch.equal(best_s, want_s)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_step_is_capturable_in_a_cuda_graph(backend, norm):
    _skip_unavailable(backend)
    x_nat = torch.rand(64, 3, 32, 32, device="cuda")
    grad = torch.randn_like(x_nat)
    e, step = (8 / 255, 2 / 255) if norm == "linf" else (0.5, 0.2)
    eps = torch.full((64,), e, device="cuda")
    x_adv = x_nat.clone()
    pgd_step_(x_adv, grad, x_nat, eps, step, norm=norm, impl=backend)  # warm-up: compile/load outside capture
    torch.cuda.synchronize()
    x_adv.copy_(x_nat)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        pgd_step_(x_adv, grad, x_nat, eps, step, norm=norm, impl=backend)
    x_adv.copy_(x_nat)
    for _ in range(3):
        graph.replay()
    want = x_nat.double().cpu()  # the float64 reference runs on the CPU
    for _ in range(3):
        want = ref_step(want, grad.cpu(), x_nat.cpu(), e, step, norm)
    torch.cuda.synchronize()
    assert (x_adv.cpu().double() - want).abs().max().item() <= 1e-6


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_non_contiguous_cuda_inputs(backend, norm, layout):
    """channels_last, strided views and operands of different layouts, on CUDA tensors."""
    _skip_unavailable(backend)
    gen = torch.Generator(device="cuda").manual_seed(3)
    x_nat = torch.rand(6, 3, 20, 24, generator=gen, device="cuda")
    x_adv = (x_nat + 0.02 * torch.randn(6, 3, 20, 24, generator=gen, device="cuda")).clamp(0, 1)
    grad = torch.randn(6, 3, 20, 24, generator=gen, device="cuda")
    x_adv, grad, x_nat = in_layout(layout, x_adv, grad, x_nat)
    eps, step = (8 / 255, 2 / 255) if norm == "linf" else (0.5, 0.1)
    want = ref_step(x_adv.cpu(), grad.cpu(), x_nat.cpu(), eps, step, norm)
    parent = x_adv._base if layout == "sliced" else None
    before = parent.clone() if parent is not None else None
    pgd_step_(x_adv, grad, x_nat, eps, step, norm=norm, impl=backend)
    assert_close_ulp(x_adv.cpu(), want)
    if parent is not None:  # written through to the parent; its other elements untouched
        assert_only_the_view_changed(parent, before)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype, sample", [(torch.float32, (3, 5, 7)), (torch.bfloat16, (3, 3, 3)),
                                           (torch.float16, (1, 1, 5))], ids=str)  # fmt: skip
def test_keep_best_on_samples_not_a_multiple_of_16_bytes(backend, dtype, sample):
    """Sample sizes of 420, 54 and 10 bytes: no vector load may run past a sample or assume alignment."""
    reason = unavailable_reason(backend, torch.device("cuda"), dtype)
    if reason:
        pytest.skip(reason)
    gen = torch.Generator(device="cuda").manual_seed(4)
    best_x, x_adv = torch.rand(2, 37, *sample, generator=gen, device="cuda").to(dtype).unbind(0)
    best_s, score = torch.rand(2, 37, generator=gen, device="cuda").unbind(0)
    want_x = torch.where((score > best_s).view(-1, 1, 1, 1), x_adv, best_x)
    want_s = torch.maximum(score, best_s)
    keep_best_(best_x, best_s, x_adv, score, impl=backend)
    assert torch.equal(best_x, want_x) and torch.equal(best_s, want_s)


def _bn_model():
    from roli.models import NormalizedModel
    from roli.models.small import small_cnn

    torch.manual_seed(0)
    model = NormalizedModel(small_cnn(10, 3), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)).cuda()
    for m in model.modules():  # BatchNorm statistics away from their init (folding must get them right)
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("per_sample", [False, True])
def test_attack_recorded_in_a_cuda_graph_matches_eager(precision, per_sample):
    from roli.attacks import PGD

    model = _bn_model()
    x = torch.rand(32, 3, 32, 32, device="cuda")
    y = torch.randint(0, 10, (32,), device="cuda")
    eps = torch.rand(32, device="cuda") * 0.05 if per_sample else 8 / 255
    kw = dict(eps=eps, step_size=2 / 255, steps=7, keep="last", precision=precision)
    graphed = PGD(model, cuda_graph=True, seed=1, **kw)
    eager = PGD(model, seed=1, **kw)
    for _ in range(3):  # the first call records; later calls replay on fresh random starts
        a, b = graphed(x, y), eager(x, y)
        assert (a - b).abs().gt(1e-5).float().mean().item() < 1e-3
    opt = torch.optim.SGD(model.parameters(), lr=1.0)  # an in-place update: the next replay must see it
    model.train()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    model.eval()
    a, b = graphed(x, y), eager(x, y)
    assert (a - b).abs().gt(1e-5).float().mean().item() < 1e-3
    assert len(graphed._graphed.recorded) == 1
    if not per_sample:  # a (32,) budget belongs to 32 images; a scalar one to any batch
        graphed(x[:5], y[:5])  # another batch shape records another graph
        assert len(graphed._graphed.recorded) == 2


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_l2_step_is_bit_reproducible(backend):
    """The per-sample L2 sums are added in a fixed order (no float atomics): equal results run to run."""
    _skip_unavailable(backend)
    gen = torch.Generator(device="cuda").manual_seed(1)
    x_nat = torch.rand(16, 3, 224, 224, generator=gen, device="cuda")
    grad = torch.randn(16, 3, 224, 224, generator=gen, device="cuda")
    outs = []
    for _ in range(5):
        x_adv = (x_nat + 0.01 * torch.randn(16, 3, 224, 224, generator=torch.Generator(device="cuda").manual_seed(2),
                                           device="cuda")).clamp(0, 1)  # fmt: skip
        pgd_step_(x_adv, grad, x_nat, 0.5, 0.1, norm="l2", impl=backend)
        outs.append(x_adv)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_training_step_does_not_synchronise():
    """A finetuning step with a deferred training attack queues its work without waiting for the GPU."""
    from roli.attacks.fast import training_attack
    from roli.models import create_classifier
    from roli.training.loop import ft_step

    torch.manual_seed(0)
    model = create_classifier("roli.models.small:small_cnn", 5, in_chans=3).cuda()
    x, y = torch.rand(64, 3, 32, 32, device="cuda"), torch.randint(0, 5, (64,), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    for kind in ("pgd", "fgsm-rs", "n-fgsm"):
        attack = training_attack(kind, model, 8 / 255, 2 / 255, 3, seed=0, deferred=True)
        ft_step(model, attack, opt, x, y)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            loss, _ = ft_step(model, attack, opt, x, y)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert loss.is_cuda and not bool(attack.pop_invalid())


def test_kernels_run_on_a_tensor_of_another_gpu():
    """Tensors on cuda:1 while the current device is 0: the Triton and CUDA launches enter the tensors' device."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    for backend in ("triton", "cuda"):
        if unavailable_reason(backend, torch.device("cuda", 1), torch.float32):
            continue
        x_nat = torch.rand(8, 3, 32, 32, device="cuda:1")
        grad = torch.randn_like(x_nat)
        x_adv = x_nat.clone()
        with torch.cuda.device(0):
            pgd_step_(x_adv, grad, x_nat, 8 / 255, 2 / 255, impl=backend)
        want = ref_step(x_nat.cpu(), grad.cpu(), x_nat.cpu(), 8 / 255, 2 / 255)
        assert_close_ulp(x_adv.cpu(), want)


def test_cuda_graph_attack_on_another_gpu():
    """The CUDA-graph attack records and replays on the images' GPU while another device is current."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    from roli.attacks import PGD
    from roli.models import create_classifier

    torch.manual_seed(0)
    model = create_classifier("roli.models.small:small_cnn", 5, in_chans=3).to("cuda:1").eval()
    x, y = torch.rand(8, 3, 32, 32, device="cuda:1"), torch.randint(0, 5, (8,), device="cuda:1")
    graphed = PGD(model, 8 / 255, 2 / 255, 3, keep="last", seed=0, cuda_graph=True)
    eager = PGD(model, 8 / 255, 2 / 255, 3, keep="last", seed=0)
    with torch.cuda.device(0):
        out = [graphed(x, y) for _ in range(2)]
        ref = [eager(x, y) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))


def _fp8_or_skip():
    from roli.models.fp8 import fp8_supported

    ok, why = fp8_supported("cuda")
    if not ok:
        pytest.skip(why)


def _tiny_vit():
    from roli.models import create_classifier

    torch.manual_seed(0)
    return create_classifier("vit_tiny_patch16_224", 10, img_size=32, patch_size=4, depth=2, input_size=None,
                             mean=(0.5,) * 3, std=(0.25,) * 3).cuda().eval()  # fmt: skip


def test_fp8_gemm_on_the_gpu_matches_the_emulation():
    """The FP8 tensor-core GEMM (torch._scaled_mm) against the float32 emulation the CPU tests check, forward
    (e4m3 x e4m3, fast accumulation) and input gradient (e5m2 x e4m3)."""
    _fp8_or_skip()
    from roli.models.fp8 import FP8Linear

    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 384).cuda().requires_grad_(False)
    x = torch.randn(4, 50, 256, device="cuda", requires_grad=True)
    dy = torch.randn(4, 50, 384, device="cuda", dtype=torch.bfloat16)
    out = {}
    for where in ("cuda", "cpu"):
        m = FP8Linear(lin.to(where))
        m.refresh()
        xi = x.detach().to(where).requires_grad_()
        y = m(xi)
        out[where] = (y.float().cpu(), torch.autograd.grad(y, xi, dy.to(where))[0].float().cpu())
    for a, b in zip(out["cuda"], out["cpu"], strict=True):
        assert (a - b).norm() / b.norm() < 1e-2, float((a - b).norm() / b.norm())


def test_fp8_attack_in_a_cuda_graph_sees_each_steps_weights():
    """The fp8 weights are cast before each replay into buffers the graph reads by address: after an in-place
    update the replayed attack equals the eager fp8 attack with the new weights."""
    _fp8_or_skip()
    from roli.attacks import PGD

    model = _tiny_vit()
    x, y = torch.rand(32, 3, 32, 32, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    kw = dict(eps=8 / 255, step_size=2 / 255, steps=5, keep="last", precision="fp8")
    graphed, eager = PGD(model, cuda_graph=True, seed=1, **kw), PGD(model, seed=1, **kw)
    for update in (False, True, False):
        if update:
            with torch.no_grad():
                for p in model.parameters():
                    p.mul_(1.5)
        a, b = graphed(x, y), eager(x, y)
        assert (a - b).abs().gt(1e-5).float().mean().item() < 1e-2
    assert len(graphed._graphed.recorded) == 1


def test_fp8_training_step_does_not_synchronise():
    _fp8_or_skip()
    from roli.attacks import PGD
    from roli.training.loop import ft_step

    model = _tiny_vit()
    x, y = torch.rand(64, 3, 32, 32, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    attack = PGD(model, eps=8 / 255, step_size=2 / 255, steps=3, keep="last", precision="fp8", deferred=True)
    ft_step(model, attack, opt, x, y, "bf16")  # warm-up (builds the FP8 linears)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ft_step(model, attack, opt, x, y, "bf16")
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_array_batches_come_from_pinned_memory():
    """The uint8 batch is gathered straight into page-locked memory, so its copy to the GPU does not wait."""
    from roli.data.arrays import gather

    x = torch.randint(0, 255, (100, 3, 8, 8), dtype=torch.uint8)
    rows = torch.tensor([5, 1, 99, 42])
    out = gather(x, rows, pinned=True)
    assert out.is_pinned() and torch.equal(out, x[rows])


@pytest.mark.slow  # inductor compiles: gpu_check.sh's compile stage runs it
def test_compiled_attack_with_the_cuda_graph_matches_eager():
    """--compile --cuda-graph: roli's CUDA graph recorded around the compiled model's passes."""
    from roli.attacks import PGD

    model = _tiny_vit()
    x, y = torch.rand(32, 3, 32, 32, device="cuda"), torch.randint(0, 10, (32,), device="cuda")
    kw = dict(eps=8 / 255, step_size=2 / 255, steps=3, keep="last", precision="bf16", seed=1)
    a, b = PGD(torch.compile(model), cuda_graph=True, **kw), PGD(model, **kw)
    for _ in range(2):
        diff = (a(x, y) - b(x, y)).abs().gt(1e-5).float().mean().item()
        assert diff < 0.02, diff  # inductor's bf16 kernels round differently: a few signs may flip
