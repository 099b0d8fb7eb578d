"""Visual Prompt Tuning as the RoLI paper ran it (Jia et al., "Visual Prompt Tuning", ECCV 2022; deep, prepend).

Prompt tokens join the token sequence and attend in the same softmax as the image's tokens; deep VPT gives
every transformer block its own prompts, which replace the previous block's prompt outputs. So the prompts
change the function at initialisation: this is the paper's RanLI-VPT baseline (roli.models.peft "vpt-gated"
is the zero-gated variant that starts exactly at the base model).

- ViT (timm VisionTransformer): n prompts inserted after the prefix (CLS) tokens before every block, removed
  after the last one (the classifier reads the CLS token, or the patches' mean). The first block sees
  1 + n + patches tokens.
- Swin (timm SwinTransformer), the RoLI reference's window variant: in every block the (LayerNorm-ed) prompts
  are put into every window in front of its tokens and attend in the window's softmax, with the relative
  position bias and the shift mask zero for prompt rows and columns; the prompts' outputs are averaged over the
  image's windows and go through the residual and the MLP with the image tokens. Each block has its own prompts
  (stage i: embed_dim * 2^i wide), so the prompts patch merging would carry are replaced at once and are not
  computed; the last block's prompt outputs join the final LayerNorm and the average pool, as in the reference.
  The reference averages the prompts' outputs over windows grouped by (index mod batch), which mixes images
  where a stage has more than one window; with deep prompts only the last block's prompt outputs reach the
  features, and Swin-B at 224 has one window in its last stage, so for the paper's model both compute the
  same; here every image averages its own windows (its features never depend on the rest of the batch).
- Init: uniform(-v, v) with v = sqrt(6 / (3 * patch_size^2 + embed_dim)) for every prompt (the reference's).
- Prompt dropout acts on each image's prompts in train mode; the reference's Swin shares one mask over the batch
  for its deep prompts (train mode only, never under an attack, which runs in eval mode).

Applied in place by `apply_vpt(backbone, n_tokens, dropout)`: the backbone's class becomes the prompted
subclass (parameter names unchanged; the prompts are `vpt_prompts.*`), so checkpoints and code that read the
backbone's modules keep working.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from roli._compat import import_timm


def _prompt_init(n_sets: int, n_tokens: int, dim: int, bound: float, like: torch.Tensor) -> nn.Parameter:
    """(n_sets, n_tokens, dim) prompts uniform in [-bound, bound], on `like`'s device and in its dtype."""
    return nn.Parameter(
        torch.empty(n_sets, n_tokens, dim, device=like.device, dtype=like.dtype).uniform_(-bound, bound)
    )


def _bound(patch_size: int, embed_dim: int) -> float:
    return math.sqrt(6.0 / (3 * patch_size * patch_size + embed_dim))


@functools.cache
def _classes():
    timm = import_timm()
    from timm.models.swin_transformer import SwinTransformer, window_partition, window_reverse
    from timm.models.vision_transformer import VisionTransformer

    return timm, VisionTransformer, SwinTransformer, window_partition, window_reverse


def window_attention(attn: nn.Module, x: torch.Tensor, n: int, mask: torch.Tensor | None) -> torch.Tensor:
    """timm WindowAttention on windows whose first n tokens are prompts: the relative position bias and the
    shift mask padded with zeros for the prompts' rows and columns. x: (B * nW, n + window area, C)."""
    b_, tokens, c = x.shape
    qkv = attn.qkv(x).reshape(b_, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B * nW, heads, tokens, head dim) each
    bias = F.pad(attn._get_rel_pos_bias(), (n, 0, n, 0)).to(q.dtype)  # (1, heads, tokens, tokens)
    if mask is not None:
        windows = mask.shape[0]
        full = F.pad(mask, (n, 0, n, 0)).to(q.dtype)  # (nW, tokens, tokens)
        bias = (
            (bias.unsqueeze(1) + full.view(1, windows, 1, tokens, tokens))
            .expand(b_ // windows, -1, -1, -1, -1)
            .reshape(b_, attn.num_heads, tokens, tokens)
        )
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=bias, scale=attn.scale, dropout_p=attn.attn_drop.p if attn.training else 0.0
    )
    return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(b_, tokens, -1)))


def prompted_block(blk: nn.Module, x: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One timm SwinTransformerBlock on image tokens x (B, H, W, C) with prompts p (B, n, C)."""
    batch, h, w, c = x.shape
    n = p.shape[1]
    xn, pn = blk.norm1(x), blk.norm1(p)
    shift = blk.shift_size
    if any(shift):
        xn = torch.roll(xn, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    ws = blk.window_size
    pad_h, pad_w = (ws[0] - h % ws[0]) % ws[0], (ws[1] - w % ws[1]) % ws[1]
    xn = F.pad(xn, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = xn.shape[1], xn.shape[2]
    _, _, _, window_partition, window_reverse = _classes()
    windows = window_partition(xn, ws).view(-1, ws[0] * ws[1], c)  # (B * nW, area, C), image-major
    n_win = windows.shape[0] // batch
    prompts = pn.unsqueeze(1).expand(batch, n_win, n, c).reshape(batch * n_win, n, c)  # each image's own
    mask = blk.get_attn_mask(xn) if getattr(blk, "dynamic_mask", False) else blk.attn_mask
    out = window_attention(blk.attn, torch.cat([prompts, windows], 1), n, mask)
    attn_p = out[:, :n].reshape(batch, n_win, n, c).mean(1)  # the prompts' outputs, averaged over windows
    attn_x = window_reverse(out[:, n:].reshape(-1, ws[0], ws[1], c), ws, hp, wp)[:, :h, :w]
    if any(shift):
        attn_x = torch.roll(attn_x, shifts=shift, dims=(1, 2))
    t = torch.cat([p, x.reshape(batch, h * w, c)], 1)
    t = t + blk.drop_path1(torch.cat([attn_p, attn_x.reshape(batch, h * w, c)], 1))
    t = t + blk.drop_path2(blk.mlp(blk.norm2(t)))
    return t[:, n:].reshape(batch, h, w, c), t[:, :n]


_PROMPTED: dict[type, type] = {}


def prompted_classes() -> dict[type, type]:
    """{timm class: its prompted subclass}, built once (timm is imported on first use)."""
    if _PROMPTED:
        return _PROMPTED
    _, vit_cls, swin_cls, _, _ = _classes()

    class PromptedViT(vit_cls):
        """A timm VisionTransformer with deep prompts (see the module docstring)."""

        def _prompts(self, i: int, batch: int, dtype) -> torch.Tensor:
            return self.prompt_dropout(self.vpt_prompts[i].to(dtype).expand(batch, -1, -1))

        def forward_features(self, x, attn_mask=None, is_causal=False):
            if attn_mask is not None or is_causal:
                raise ValueError("VPT: attention masks are not supported with prompts")
            x = self.patch_embed(x)
            x = self._pos_embed(x)
            x = self.patch_drop(x)
            x = self.norm_pre(x)
            pre, n, batch = self.num_prefix_tokens, self.vpt_prompts.shape[1], x.shape[0]
            for i, blk in enumerate(self.blocks):  # (B, prefix + n + patches, D) from the first block on
                rest = x[:, pre:] if i == 0 else x[:, pre + n :]
                x = blk(torch.cat([x[:, :pre], self._prompts(i, batch, x.dtype), rest], 1))
            x = torch.cat([x[:, :pre], x[:, pre + n :]], 1)
            return self.norm(x)

    class PromptedSwin(swin_cls):
        """A timm SwinTransformer with the reference's deep window prompts (see the module docstring)."""

        def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = self.patch_embed(x)  # (B, H, W, C)
            batch, p = x.shape[0], None
            for stage, prompts in zip(self.layers, self.vpt_prompts, strict=True):
                x = stage.downsample(x)
                for j, blk in enumerate(stage.blocks):
                    p = self.prompt_dropout(prompts[j].to(x.dtype).expand(batch, -1, -1))
                    x, p = prompted_block(blk, x, p)
            return self.norm(x), self.norm(p)

        def forward_features(self, x: torch.Tensor) -> torch.Tensor:
            """(B, n + H W, C): the last block's prompts, then the image tokens, after the final LayerNorm."""
            x, p = self._features(x)
            return torch.cat([p, x.flatten(1, 2)], 1)

        def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
            x = self.head.drop(x.mean(1))  # the average over prompts and image tokens (the reference's avgpool)
            return x if pre_logits else self.head.fc(x)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.forward_head(self.forward_features(x))

    for cls in (PromptedViT, PromptedSwin):  # importable by name (pickle), created on first use (module __getattr__)
        cls.__qualname__, cls.__module__ = cls.__name__, __name__
        globals()[cls.__name__] = cls
    _PROMPTED.update({vit_cls: PromptedViT, swin_cls: PromptedSwin})
    return _PROMPTED


def __getattr__(name: str):
    if name in ("PromptedViT", "PromptedSwin"):
        prompted_classes()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def supports_vpt(backbone: nn.Module) -> bool:
    """Whether apply_vpt can prompt this backbone: a timm VisionTransformer or SwinTransformer (exactly those
    classes, as the published robust backbones are), with average pooling for Swin."""
    cls = prompted_classes().get(type(backbone))
    if cls is None:
        return False
    return (
        cls.__name__ != "PromptedSwin"
        or getattr(backbone.head, "global_pool", None) is not None
        and getattr(backbone.head.global_pool, "pool_type", "avg") == "avg"
    )


def apply_vpt(backbone: nn.Module, n_tokens: int, dropout: float = 0.0) -> int:
    """Give a timm ViT or Swin backbone deep prompts in place (see the module docstring). Returns the number of
    prompt parameters."""
    classes = prompted_classes()
    if not supports_vpt(backbone):
        raise ValueError(
            f"VPT applies to timm VisionTransformer and SwinTransformer backbones (the published robust "
            f"ViT/Swin); got {type(backbone).__name__}"
        )
    like = next(backbone.parameters())  # the prompts take the backbone's device and dtype
    if classes.get(type(backbone)).__name__ == "PromptedViT":
        dim, patch = backbone.embed_dim, backbone.patch_embed.patch_size[0]
        backbone.vpt_prompts = _prompt_init(len(backbone.blocks), n_tokens, dim, _bound(patch, dim), like)
    else:
        dims = [stage.blocks[0].norm1.normalized_shape[0] for stage in backbone.layers]
        bound = _bound(backbone.patch_embed.patch_size[0], dims[0])
        backbone.vpt_prompts = nn.ParameterList(
            [
                _prompt_init(len(stage.blocks), n_tokens, d, bound, like)
                for stage, d in zip(backbone.layers, dims, strict=True)
            ]
        )
    backbone.prompt_dropout = nn.Dropout(dropout)
    backbone.__class__ = classes[type(backbone)]
    return (
        sum(p.numel() for p in backbone.vpt_prompts.parameters())
        if isinstance(backbone.vpt_prompts, nn.Module)
        else backbone.vpt_prompts.numel()
    )
