"""One test per realistic one-line bug that once passed the whole suite (issue 37): VPT's eval path and Swin's
prompt init and shifted-window mask, the optimisers' decay groups, what decides the grid's shared ALP stage, the
preprocessing a ModelSpec builds, the guard's seed stream, and the class order of a relabelled subset. Each
expected value is written here (a literal, a formula or a float64 computation by hand), never read off the code
under test."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_models import images

from roli.models import apply_peft, create_classifier

VIT = dict(img_size=32, patch_size=4, depth=2)


# -- 1. VPT on ViT: prompt dropout only in training --------------------------------------------------------------


def test_vit_vpt_prompt_dropout_is_off_in_eval():
    torch.manual_seed(0)
    m = create_classifier("vit_tiny_patch16_224", 5, **VIT)
    apply_peft(m, "vpt", vpt_tokens=6, vpt_dropout=0.5)
    x = images(3, seed=2)
    m.eval()
    with torch.no_grad():
        a, b = m(x), m(x)
        m.backbone.prompt_dropout.p = 0.0  # the same model without dropout: what eval must compute
        c = m(x)
        m.backbone.prompt_dropout.p = 0.5
    assert torch.equal(a, b) and torch.equal(a, c)
    m.train()  # in training the prompts are dropped: two forwards differ
    with torch.no_grad():
        assert not torch.equal(m(x), m(x))


# -- 2. VPT on Swin: every stage's prompts with the stage-0 bound ------------------------------------------------


def test_swin_vpt_prompts_use_the_stage0_bound_in_every_stage():
    torch.manual_seed(0)
    m = create_classifier("swin_tiny_patch4_window7_224", 5, img_size=32, window_size=2, embed_dim=24,
                          depths=(2, 2), num_heads=(1, 2))  # fmt: skip
    apply_peft(m, "vpt", vpt_tokens=8)
    bound = math.sqrt(6 / (3 * 4**2 + 24))  # the reference's VPT init: patch 4, the stage-0 embed_dim 24
    for stage in m.backbone.vpt_prompts:  # stage 1 is 48 wide: its own width would give sqrt(6/96) = 0.25
        top = float(stage.detach().abs().max())
        assert 0.95 * bound < top <= bound, (top, bound)


# -- 3. VPT on Swin: the shifted-window mask, prompts in front -----------------------------------------------------


def _region_mask(size: int, ws: int, shift: int) -> torch.Tensor:
    """Swin's shifted-window attention mask by hand: positions of the rolled grid labelled by region (three bands
    per axis), -100 where two tokens of one window come from different regions. (H * W, H * W), by position."""
    label = torch.zeros(size, size, dtype=torch.long)
    bands = [(0, size - ws), (size - ws, size - shift), (size - shift, size)]
    r = 0
    for h0, h1 in bands:
        for w0, w1 in bands:
            label[h0:h1, w0:w1] = r
            r += 1
    flat = label.flatten()
    return (flat[:, None] != flat[None, :]).double() * -100.0


def _prompted_block_by_hand(blk, x, p, shift: int):
    """One prompted Swin block in float64, window by window, image by image: x (B, H, W, C), p (B, n, C)."""
    b, size, _, c = x.shape
    ws, n, heads = blk.window_size[0], p.shape[1], blk.attn.num_heads
    xn, pn = blk.norm1(x), blk.norm1(p)
    xs = torch.roll(xn, shifts=(-shift, -shift), dims=(1, 2)) if shift else xn
    mask = _region_mask(size, ws, shift) if shift else torch.zeros(size * size, size * size, dtype=torch.float64)
    table = blk.attn.relative_position_bias_table
    rel_index = blk.attn.relative_position_index.view(-1)
    rel = table[rel_index].view(ws * ws, ws * ws, heads).permute(2, 0, 1)  # (heads, area, area)
    out_x = torch.zeros_like(xs)
    out_p = torch.zeros(b, n, c, dtype=torch.float64)
    windows = (size // ws) ** 2
    for i in range(b):
        for wi in range(size // ws):
            for wj in range(size // ws):
                rows = [(wi * ws + r, wj * ws + s) for r in range(ws) for s in range(ws)]
                pos = torch.tensor([h * size + w for h, w in rows])
                tokens = torch.stack([xs[i, h, w] for h, w in rows])  # (area, C)
                seq = torch.cat([pn[i], tokens])  # prompts first
                q, k, v = blk.attn.qkv(seq).view(n + ws * ws, 3, heads, c // heads).permute(1, 2, 0, 3)
                logits = q @ k.transpose(-1, -2) * (c // heads) ** -0.5
                extra = torch.zeros(heads, n + ws * ws, n + ws * ws, dtype=torch.float64)
                extra[:, n:, n:] = rel + mask[pos][:, pos]  # prompt rows and columns: no bias, no mask
                o = (torch.softmax(logits + extra, -1) @ v).transpose(0, 1).reshape(n + ws * ws, c)
                o = blk.attn.proj(o)
                out_p[i] += o[:n] / windows
                for t, (h, w) in enumerate(rows):
                    out_x[i, h, w] = o[n + t]
    if shift:
        out_x = torch.roll(out_x, shifts=(shift, shift), dims=(1, 2))
    t = torch.cat([p, x.reshape(b, size * size, c)], 1) + torch.cat([out_p, out_x.reshape(b, size * size, c)], 1)
    t = t + blk.mlp(blk.norm2(t))
    return t[:, n:].reshape(b, size, size, c), t[:, :n]


def test_swin_vpt_shifted_windows_match_a_hand_computation():
    torch.manual_seed(0)
    m = create_classifier("swin_tiny_patch4_window7_224", 5, img_size=16, window_size=2, embed_dim=8, depths=(2,),
                          num_heads=(2,)).double().eval()  # fmt: skip
    apply_peft(m, "vpt", vpt_tokens=3)
    blocks = m.backbone.layers[0].blocks
    assert [tuple(blk.shift_size) for blk in blocks] == [(0, 0), (1, 1)]  # block 1: shifted windows
    x = images(2, seed=3).double()[:, :, :16, :16]
    with torch.no_grad():
        got = m.features(x)
        t = m.backbone.patch_embed(m.pre(x))  # (B, 4, 4, C)
        prompts = m.backbone.vpt_prompts[0]  # deep: block j gets set j
        p = None
        for j, blk in enumerate(blocks):
            t, p = _prompted_block_by_hand(blk, t, prompts[j].expand(2, -1, -1), shift=j)
        want = m.backbone.norm(torch.cat([p, t.flatten(1, 2)], 1)).mean(1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# -- 4. decay groups: weights decay, biases and norms do not -------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_decay_groups_by_dimension(optimizer):
    from roli.training.loop import make_optimizer, param_groups

    torch.manual_seed(0)
    m = create_classifier("vit_tiny_patch16_224", 5, **VIT)
    groups = param_groups(m, 0.05, optimizer)
    opt = make_optimizer(groups, optimizer, 0.1, 0.9)
    names = {id(p): n for n, p in m.named_parameters()}
    by_decay = {}
    for g in opt.param_groups:
        by_decay.setdefault(g["weight_decay"], set()).update(names[id(p)] for p in g["params"])
    assert set(by_decay) == {0.05, 0.0}
    assert {"head.weight", "backbone.blocks.0.attn.qkv.weight", "backbone.patch_embed.proj.weight"} <= by_decay[0.05]
    assert {"head.bias", "backbone.blocks.0.norm1.weight", "backbone.blocks.0.attn.qkv.bias",
            "backbone.norm.bias"} <= by_decay[0.0]  # fmt: skip
    assert by_decay[0.05] == {n for n, p in m.named_parameters() if p.ndim >= 2}  # the rule: weights, not 1-D


def test_alp_decays_the_head_weight_only():
    from roli.training.loop import make_optimizer, param_groups

    m = create_classifier("roli.models.small:small_cnn", 4, in_chans=1)
    apply_peft(m, "linear")
    opt = make_optimizer(param_groups(m, 0.01, "sgd"), "sgd", 0.1, 0.9)
    names = {id(p): n for n, p in m.named_parameters()}
    got = {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert got == {"head.weight": 0.01, "head.bias": 0.0}


# -- 5, 6. what decides the grid's shared ALP stage ---------------------------------------------------------------


def test_head_init_decides_alp_and_finetuning_decay_does_not():
    from roli.config import TrainConfig
    from roli.grid import alp_key

    base = TrainConfig(method="roli", peft="full", run_dir="unused", device="cpu")
    key = alp_key(base, {"data": 1})
    assert alp_key(dataclasses.replace(base, head_init="zero"), {"data": 1}) != key
    assert alp_key(dataclasses.replace(base, head_init="reference"), {"data": 1}) != key
    assert alp_key(dataclasses.replace(base, weight_decay=0.3), {"data": 1}) == key  # --weight-decay: the FT's
    assert alp_key(dataclasses.replace(base, ft={"weight_decay": 0.3}), {"data": 1}) == key
    assert alp_key(dataclasses.replace(base, alp={"weight_decay": 0.3}), {"data": 1}) != key
    assert alp_key(dataclasses.replace(base, peft_init="reference", peft="lora"), {"data": 1}) == key


# -- 7. a ModelSpec's preprocessing ------------------------------------------------------------------------------


def test_model_spec_normalises_with_its_own_mean_and_std():
    from roli.specs import ModelSpec

    spec = ModelSpec("roli.models.small:small_cnn", mean="0.1,0.2,0.3", std="0.4,0.5,0.6")
    model = spec.build(3, 3, "cpu", quiet=True)
    x = images(2, seed=4)
    want = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)
    torch.testing.assert_close(model.pre(x), want, rtol=1e-6, atol=1e-6)


# -- 8. the guard's single-step copy has its own seed stream -----------------------------------------------------


def test_guard_single_step_and_guard_check_have_their_own_seeds():
    from roli.specs import AttackSpec

    spec = AttackSpec(eps=0.1, step_size=0.025, seed=11)
    net = create_classifier("roli.models.small:small_cnn", 3, in_chans=1)
    single = spec.single_step("fgsm-rs", net)
    assert single.seed == 11 + 7  # the "guard single-step" stream, written out
    assert spec.training("fgsm-rs", net).seed == 11 + 0  # the training attack's stream (rank 0)


# -- 9. a class subset is relabelled in the order given ----------------------------------------------------------


def test_class_subset_relabelled_in_the_given_order():
    from roli.specs import DataSpec

    full = DataSpec("digits").load()
    sub = DataSpec("digits", classes="3,1,2").load()
    table = {3: 0, 1: 1, 2: 2}
    keep = [i for i, v in enumerate(full[0].y.tolist()) if v in table]
    assert torch.equal(sub[0].x, full[0].x[keep])
    assert sub[0].y.tolist() == [table[v] for v in full[0].y[keep].tolist()]
    assert sub[3] == 3
