"""Parameter-efficient finetuning methods of the RoLI paper, each exactly the base model at initialisation.

apply_peft(model, method, ...) modifies a RobustClassifier in place and sets which parameters train:
- "full": everything.
- "linear": the head only; the backbone is frozen and kept in eval mode (BatchNorm statistics fixed).
The backbone's mode in training follows the reference (ENCODER_MODES): eval for linear, LoRA, Adapter and Bias,
train for full finetuning, eval with only prompt dropout for VPT.
- "lora": low-rank updates W + (alpha/r) B A on the qkv projection of every attention block (timm ViT
  and Swin, or any nn.Linear named qkv): targets "qv" (the paper) or "qkv". A random, B zero.
- "adapter": a bottleneck after each block's MLP, h + up(act(down(h))), reduction factor r. Down random,
  up zero.
- "vpt": Visual Prompt Tuning as the paper ran it (Jia et al., deep; roli.models.vpt): prompt tokens join
  the token sequence of every block (Swin: inside every window) and change the function at init, which
  is the paper's RanLI-VPT. timm ViT and Swin backbones.
- "vpt-gated": roli's own variant that starts exactly at the base model: n learned tokens per block that
  the block's tokens attend to through a zero-initialised per-head gate (as in LLaMA-Adapter's zero-init
  attention): out = attn(x) + proj(g * softmax(q k_p^T) v_p). Any ViT/Swin-style attention block.
- "bias": BitFit as the reference selects it: every parameter with "bias" in its name (Swin's
  relative_position_bias_table too), and the head.
The head always trains.

Initialisation (peft_init): "standard" (the default) makes each method what its name says: LoRA's A random
and B zero, the Adapter's down projection random and up zero, so the branches output zero at init and both
factors train. "reference" initialises the branches exactly as the RoLI reference code does (DongXzz/RoLI,
src/models/vit_lora and vit_adapter), which depends on the model family and the run's role:
- LoRA on Swin: the RoLI configs (lora/*_roli.yaml) set ZEROINIT, so A = B = 0: neither matrix ever receives a
  gradient and RoLI-LoRA trains only the head; RanLI-LoRA keeps A kaiming-uniform, B zero (its LoRA trains).
- LoRA on ViT: the reference's ViT ignores ZEROINIT: A kaiming-uniform, B zero in both roles (= standard).
- Adapter (Swin and ViT, both roles): down and up weights and biases all zero: only the up biases learn.
- VPT and Bias: the standard inits are already the reference's. vpt-gated is roli's own: no reference init.
inert_parameters() names the trainable tensors that can never receive a gradient from their current values;
the trainer logs them at the start of each finetuning stage.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from roli.models.vpt import apply_vpt, supports_vpt

METHODS = ("full", "linear", "lora", "adapter", "vpt", "vpt-gated", "bias")
PEFT_INITS = ("standard", "reference")
ROLES = ("roli", "ranli")  # finetuning from the ALP head, or from a random head
# The backbone's mode while the model trains, as the RoLI reference runs each method (src/models/vit_models.py:
# froze_enc for every transfer type but end2end and prompt; its VPT-Swin keeps only prompt dropout active).
ENCODER_MODES = {
    "full": "train",
    "linear": "eval",
    "lora": "eval",
    "adapter": "eval",
    "bias": "eval",
    "vpt": "prompts",
    "vpt-gated": "prompts",
}
_IDENTITY = nn.Identity()


class LoRAQKV(nn.Module):
    """qkv Linear (dim -> 3 dim) plus low-rank updates on the chosen parts (q, k, v)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float, targets: str):
        super().__init__()
        if base.out_features % 3:
            raise ValueError(f"a qkv projection must have 3 x dim outputs; got {base.out_features}")
        self.base, self.targets, self.scale = base, targets, alpha / rank
        dim = base.out_features // 3
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for t in targets:
            a = torch.empty(rank, base.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear: random A
            self.lora_A[t] = nn.Parameter(a)
            self.lora_B[t] = nn.Parameter(torch.zeros(dim, rank))  # zero B: the update starts at zero
        self.dim = dim

    def delta_weight(self) -> torch.Tensor:
        """(3 dim, in) update of the qkv weight."""
        parts = []
        for t in "qkv":
            if t in self.targets:
                parts.append(self.lora_B[t] @ self.lora_A[t] * self.scale)
            else:
                parts.append(self.lora_B[self.targets[0]].new_zeros(self.dim, self.base.in_features))
        return torch.cat(parts, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        h = self.dropout(x)
        updates = [
            (h @ self.lora_A[t].t() @ self.lora_B[t].t()) * self.scale if t in self.targets else None for t in "qkv"
        ]
        zero = torch.zeros_like(out[..., : self.dim])
        return out + torch.cat([u if u is not None else zero for u in updates], -1)

    def merged(self) -> nn.Linear:
        w = self.base.weight
        lin = nn.Linear(
            self.base.in_features,
            self.base.out_features,
            bias=self.base.bias is not None,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            lin.weight.copy_(w + self.delta_weight())
            if self.base.bias is not None:
                lin.bias.copy_(self.base.bias)
        return lin


class Adapter(nn.Module):
    """Wraps an MLP: h = mlp(x); h + up(act(down(h))). Down random (nn.Linear default), up zero."""

    def __init__(self, mlp: nn.Module, dim: int, reduction: int):
        super().__init__()
        self.mlp = mlp
        hidden = max(1, dim // reduction)
        self.down = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.up = nn.Linear(hidden, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.mlp(x)
        return h + self.up(self.act(self.down(h)))


class PromptedAttention(nn.Module):
    """An attention module (timm ViT Attention, or Swin's WindowAttention, whose x holds the tokens of one
    window per row) plus n learned prompt tokens, attended through a zero-initialised per-head gate.
    Prompt dropout (the reference VPT's 0.1) acts on the prompts in train mode only."""

    def __init__(self, attn: nn.Module, n_tokens: int, dropout: float = 0.0):
        super().__init__()
        self.attn = attn
        dim = attn.qkv.in_features
        self.prompts = nn.Parameter(torch.empty(n_tokens, dim).uniform_(-0.5, 0.5) * dim**-0.5)
        self.gate = nn.Parameter(torch.zeros(attn.num_heads))
        self.prompt_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.attn(x, *args, **kwargs)  # the unmodified block (Swin: with its window mask): exact at init
        a = self.attn
        b, n, c = x.shape
        heads, hd = a.num_heads, c // a.num_heads
        q = F.linear(x, a.qkv.weight[:c], a.qkv.bias[:c] if a.qkv.bias is not None else None)
        prompts = self.prompt_dropout(self.prompts)
        kv = F.linear(prompts, a.qkv.weight[c:], a.qkv.bias[c:] if a.qkv.bias is not None else None)
        q_norm, k_norm = getattr(a, "q_norm", _IDENTITY), getattr(a, "k_norm", _IDENTITY)
        q = q_norm(q.view(b, n, heads, hd).transpose(1, 2))  # (B, H, N, hd)
        k, v = kv.view(-1, 2, heads, hd).permute(1, 2, 0, 3)  # (H, P, hd) each
        k = k_norm(k)
        o = F.scaled_dot_product_attention(q, k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
        o = (o * self.gate.view(1, -1, 1, 1)).transpose(1, 2).reshape(b, n, c)
        return out + F.linear(o, a.proj.weight)  # the proj bias is already in `out`


def _prompt_site(attn: nn.Module) -> bool:
    # timm ViT Attention or Swin WindowAttention. The gated prompt term is added after the output
    # projection: exact only when no non-linear norm sits between attention and projection (timm's
    # default: attn.norm is Identity or absent).
    return (
        all(hasattr(attn, a) for a in ("qkv", "proj", "num_heads"))
        and isinstance(attn.qkv, nn.Linear)
        and isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity)
    )


def _blocks_with(model: nn.Module, attr: str) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if hasattr(m, attr) and isinstance(getattr(m, attr), nn.Module)]


def _apply_method(model, method, lora_rank, lora_alpha, lora_dropout, lora_targets, adapter_reduction, vpt_tokens,
                  vpt_dropout) -> None:  # fmt: skip
    """The method's branches on model.backbone (standard inits); apply_peft then decides what trains."""
    backbone = model.backbone
    model.encoder_mode = ENCODER_MODES[method]
    if method == "linear":
        backbone.eval()
    elif method == "lora":
        if lora_rank < 1 or sorted(set(lora_targets)) != sorted(lora_targets) or not set(lora_targets) <= set("qkv"):
            raise ValueError(f"LoRA needs rank >= 1 and targets from q, k, v; got rank {lora_rank}, {lora_targets!r}")
        sites = [(n, m) for n, m in _blocks_with(backbone, "qkv") if isinstance(m.qkv, nn.Linear)]
        if not sites:
            raise ValueError(f"{model.name} has no attention qkv projection: LoRA applies to ViT/Swin-style models")
        for _, m in sites:
            m.qkv = LoRAQKV(m.qkv, lora_rank, lora_alpha, lora_dropout, lora_targets).to(m.qkv.weight)
    elif method == "adapter":
        if adapter_reduction < 1:
            raise ValueError(f"adapter_reduction must be >= 1; got {adapter_reduction}")
        sites = [(n, m) for n, m in _blocks_with(backbone, "mlp") if hasattr(m.mlp, "fc1")]
        if not sites:
            raise ValueError(f"{model.name} has no transformer blocks with an MLP: Adapter applies to ViT/Swin")
        for _, m in sites:
            m.mlp = Adapter(m.mlp, m.mlp.fc1.in_features, adapter_reduction).to(m.mlp.fc1.weight)
    elif method in ("vpt", "vpt-gated"):
        if vpt_tokens < 1:
            raise ValueError(f"vpt_tokens must be >= 1; got {vpt_tokens}")
        if not 0 <= vpt_dropout < 1:
            raise ValueError(f"vpt_dropout must be in [0, 1); got {vpt_dropout}")
        if method == "vpt":
            if not supports_vpt(backbone):
                raise ValueError(
                    f"{model.name} is not a timm ViT or Swin: VPT (the paper's prompts) applies to those; "
                    "vpt-gated works on any ViT/Swin-style attention"
                )
            apply_vpt(backbone, vpt_tokens, vpt_dropout)
        else:
            sites = [(n, m) for n, m in _blocks_with(backbone, "attn") if _prompt_site(m.attn)]
            if not sites:
                raise ValueError(
                    f"{model.name} has no ViT/Swin attention blocks (qkv, proj, num_heads): VPT applies "
                    "to ViT and Swin models"
                )
            for _, m in sites:
                m.attn = PromptedAttention(m.attn, vpt_tokens, vpt_dropout).to(m.attn.qkv.weight)


def _reference_init(model, role: str) -> None:
    """The RoLI reference's inits over the standard ones (see the module docstring): its Swin RoLI-LoRA zeroes A
    too (ZEROINIT; B is zero already), its Adapter zeroes the down projection too (the up one is zero already)."""
    swin_roli = role == "roli" and family(model.backbone) == "swin"
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRAQKV) and swin_roli:
                for a in m.lora_A.values():
                    a.zero_()
            elif isinstance(m, Adapter):
                m.down.weight.zero_()
                m.down.bias.zero_()


def apply_peft(
    model,
    method: str,
    *,
    lora_rank: int = 16,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.0,
    lora_targets: str = "qv",
    adapter_reduction: int = 8,
    vpt_tokens: int = 10,
    vpt_dropout: float = 0.0,
    peft_init: str = "standard",
    role: str = "roli",
) -> dict:
    """Apply `method` to a RobustClassifier in place. peft_init: "standard" or "reference" (the RoLI code's
    inits for this method, model family and `role`, "roli" or "ranli"; see the module docstring). Returns
    {"method", "trainable", "total"}."""
    if method not in METHODS:
        raise ValueError(f"unknown PEFT method {method!r}; use one of {', '.join(METHODS)}")
    if peft_init not in PEFT_INITS or role not in ROLES:
        raise ValueError(f"peft_init must be one of {', '.join(PEFT_INITS)} and role one of {', '.join(ROLES)}")
    if peft_init == "reference":
        _check_reference(model, method)
    training = model.training
    _apply_method(model, method, lora_rank, lora_alpha, lora_dropout, lora_targets, adapter_reduction, vpt_tokens,
                  vpt_dropout)  # fmt: skip
    if peft_init == "reference":
        _reference_init(model, role)
    for name, p in model.named_parameters():
        trainable = (
            method == "full"
            or name.startswith("head.")
            or (method == "lora" and "lora_" in name)
            or (method == "adapter" and (".down." in name or ".up." in name))
            or (method == "vpt" and ".vpt_prompts" in name)
            or (method == "vpt-gated" and (name.endswith(".prompts") or name.endswith(".gate")))
            or (method == "bias" and "bias" in name)  # the reference's rule: Swin's relative_position_bias_table too
        )
        p.requires_grad_(trainable)
    model.train(training)  # new branches (prompts' dropout) take the model's mode, with the method's encoder mode
    return {"method": method, "trainable": count_trainable(model), "total": sum(p.numel() for p in model.parameters())}


def family(backbone: nn.Module) -> str | None:
    """ "swin" or "vit" for timm's SwinTransformer / VisionTransformer (or a subclass, e.g. a prompted one),
    else None. Read from the class hierarchy's names: nothing is imported."""
    names = {c.__name__ for c in type(backbone).__mro__}
    return "swin" if "SwinTransformer" in names else "vit" if "VisionTransformer" in names else None


def _check_reference(model, method: str) -> None:
    if method == "vpt-gated":
        raise ValueError("peft_init reference: vpt-gated is roli's own method and has no reference init")
    if method == "lora" and family(model.backbone) is None:
        raise ValueError(
            f"peft_init reference: the reference's LoRA exists for Swin and ViT only (its init differs between "
            f"them); {model.name} is a {type(model.backbone).__name__}: use peft_init standard"
        )


def inert_parameters(model: nn.Module) -> list[str]:
    """The trainable parameters that can never receive a gradient from their current values, by name:
    - a LoRA pair whose A and B are both zero (B's gradient is a product with A h, A's with B: each is zero while
      the other is);
    - an Adapter whose down projection (weight and bias) and up weight are zero (GELU(0) = 0 gives up.weight no
      signal, and up.weight = 0 passes none back to down; its up bias still learns).
    Gradient steps, momentum and (coupled or decoupled) weight decay keep such zeros at zero, so these tensors
    stay exactly where they are for a whole stage."""
    out = []
    for prefix, m in model.named_modules():
        pre = f"{prefix}." if prefix else ""
        if isinstance(m, LoRAQKV):
            for t in m.targets:
                a, b = m.lora_A[t], m.lora_B[t]
                if a.requires_grad and b.requires_grad and not a.any() and not b.any():
                    out += [f"{pre}lora_A.{t}", f"{pre}lora_B.{t}"]
        elif isinstance(m, Adapter):
            d, u = m.down, m.up
            if not (d.weight.any() or d.bias.any() or u.weight.any()):
                out += [f"{pre}{n}" for n, p in (("down.weight", d.weight), ("down.bias", d.bias),
                                                 ("up.weight", u.weight)) if p.requires_grad]  # fmt: skip
    return out


def what_trains(model: nn.Module) -> dict:
    """The trainable parameters of `model` and those of them that can receive a gradient: {"trainable",
    "receiving_gradient", "inert" (counts of elements), "inert_tensors" (names), "summary" (one line)}."""
    params = dict(model.named_parameters())
    inert = inert_parameters(model)
    inert_set = set(inert)
    trainable = sum(p.numel() for p in params.values() if p.requires_grad)
    dead = sum(params[n].numel() for n in inert)
    live = [n for n, p in params.items() if p.requires_grad and n not in inert_set]
    if not inert:
        summary = f"{trainable:,} trainable parameters, all of them can receive a gradient"
    else:
        kinds = sorted({"LoRA A and B (both zero)" if ".lora_" in n else "Adapter down/up weights" for n in inert})
        rest = (
            "this stage trains the head only"
            if all(n.startswith("head.") for n in live)
            else f"this stage trains {trainable - dead:,} parameters: " + ", ".join(sorted({_group(n) for n in live}))
        )
        summary = (
            f"{trainable:,} trainable parameters; {dead:,} of them ({' and '.join(kinds)}, {len(inert)} tensors) "
            f"are zero on both sides of their branch: they receive no gradient and stay zero; {rest}"
        )
    return {"trainable": trainable, "receiving_gradient": trainable - dead, "inert": dead, "inert_tensors": len(inert),
            "summary": summary}  # fmt: skip


def _group(name: str) -> str:
    if name.startswith("head."):
        return "the head"
    for key, label in ((".up.bias", "the Adapters' up biases"), (".up.", "the Adapters' up projections"),
                       (".down.", "the Adapters' down projections"), ("lora_", "LoRA matrices"),
                       ("vpt_prompts", "prompts"), ("bias", "biases")):  # fmt: skip
        if key in name:
            return label
    return "backbone weights"


def count_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base qkv weight (for export). Returns how many were merged."""
    merged = 0
    for m in list(model.modules()):
        if hasattr(m, "qkv") and isinstance(m.qkv, LoRAQKV):
            m.qkv = m.qkv.merged()
            merged += 1
    return merged
