"""Robust checkpoints in the formats people publish them in, and roli's own checkpoints.

Reading (load_pretrained), in this order:
- files: .pt/.pth/.bin (torch.load with weights_only=True; refused, not unpickled, if that fails; the
  argparse Namespace that timm's CheckpointSaver stores as "args" is the one class allowed beyond tensors)
  and .safetensors;
- nesting: the state dict itself, or under "state_dict", "model", "model_state" or "net"; with ema=True
  (CLI: --ema) the EMA weights under "state_dict_ema", "model_ema" or "ema" (timm's CheckpointSaver keeps
  both when training with model EMA, as ARES did);
- the RoLI reference code's own saved models (fvcore "model": nn.Sequential(normalize, ViT/Swin) with the
  backbone under "enc." and the head under "head.last_layer."): its ViT names (transformer.embeddings...,
  attn.query/key/value) become timm's, its normaliser buffers are dropped; see _from_roli_reference;
- prefixes: "module." (DataParallel/DDP), "model.", "module.model.", "attacker.model." (MadryLab
  robustness, whose "normalizer."/"attacker.normalize." entries are dropped: roli normalises inside its
  own model), "backbone."; RobustBench's "normalize.mean/std" are dropped too; the prefix that matches the
  backbone's own key names best is taken;
- timm's own checkpoint filter of the backbone's architecture (timm.models.<module>.checkpoint_filter_fn),
  when it has one: the original Swin layout (patch merging at the end of a stage), relative-position
  tables, patch- and position-embedding resizing for another input size, ConvNeXt's original names;
- the classifier of the checkpoint (timm's `classifier` key, e.g. fc / head / head.fc): with
  keep_head=True it becomes roli's head when its class count matches; by default it is never used (a
  backbone's classifier speaks of the source task's labels): the report says it was found.
Strict by default: missing or unexpected backbone keys raise an error that lists them and names the
flag that relaxes it. A checkpoint that matches no backbone key is refused even when not strict: roli
never silently runs a random backbone.

Writing (save_checkpoint / load_checkpoint): the whole model or only its trainable parameters (PEFT),
with metadata, written atomically (temporary file + rename).
"""

from __future__ import annotations

import argparse
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from roli._io import first_line, load_tagged, save_torch

NESTING_KEYS = ("state_dict", "model", "model_state", "net")
EMA_KEYS = ("state_dict_ema", "model_ema", "ema")
PREFIXES = (
    "",
    "module.",
    "model.",
    "module.model.",
    "attacker.model.",
    "module.attacker.model.",
    "backbone.",
    "module.backbone.",
)
DROPPED = (
    "normalizer.",
    "attacker.normalize.",
    "attacker.",
    "module.normalizer.",
    "module.attacker.",
    "normalize.",
    "module.normalize.",
)
ROLI_FORMAT = "roli-checkpoint"


@dataclass
class LoadReport:
    path: str
    prefix: str
    loaded: int
    head: str  # "loaded (...)" | "found (...), not used ..." | "dropped (...)" | "not in checkpoint"
    ignored: list[str] = field(default_factory=list)  # dropped wrapper entries (normalizer etc.)
    missing: list[str] = field(default_factory=list)  # only when strict=False
    unexpected: list[str] = field(default_factory=list)  # only when strict=False
    notes: list[str] = field(default_factory=list)  # conversions applied (layout, EMA, filter)
    head_loaded: bool = False

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded} backbone tensors from {self.path}", f"head: {self.head}"]
        if self.prefix:
            parts.append(f"stripped prefix {self.prefix!r}")
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)} wrapper entries")
        parts += self.notes
        if self.missing or self.unexpected:
            parts.append(f"NOT STRICT: {len(self.missing)} missing, {len(self.unexpected)} unexpected keys")
        return "; ".join(parts)


def _torch_load(path: Path):
    with torch.serialization.safe_globals([argparse.Namespace]):  # timm CheckpointSaver's "args"
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | Path, ema: bool = False, notes: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, un-nested (the EMA copy with ema=True). Raises ValueError with the
    reason. `notes` receives what was chosen when the file holds a choice."""
    path = Path(path)
    notes = notes if notes is not None else []
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): an interrupted download or copy?")
    if path.suffix == ".safetensors":
        if ema:
            raise ValueError(f"{path}: --ema needs a file with EMA weights; a .safetensors file holds one state dict")
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError("loading .safetensors needs: pip install safetensors") from None
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any parse failure
            raise ValueError(f"cannot read {path}: {first_line(e)}") from None
    try:
        obj = _torch_load(path)
    except Exception as e:  # noqa: BLE001 - corrupt file, or a pickle with arbitrary objects
        raise ValueError(
            f"cannot read {path} as a weights-only checkpoint ({first_line(e)[:200]}); "
            "re-save it as a plain state dict or .safetensors"
        ) from None
    if isinstance(obj, dict) and not _is_state(obj):
        ema_key = next((k for k in EMA_KEYS if isinstance(obj.get(k), dict) and _is_state(obj[k])), None)
        if ema:
            if ema_key is None:
                raise ValueError(f"{path} holds no EMA weights (looked under {', '.join(EMA_KEYS)}); drop --ema")
            notes.append(f"EMA weights ({ema_key})")
            obj = obj[ema_key]
        elif ema_key is not None:
            notes.append(f"the file also holds EMA weights under {ema_key!r} (--ema loads them)")
    elif ema:
        raise ValueError(f"{path} holds one state dict, no EMA weights; drop --ema")
    for _ in range(3):  # {"model": {"state_dict": {...}}} and the like
        if isinstance(obj, dict) and not _is_state(obj):
            inner = next((obj[k] for k in NESTING_KEYS if isinstance(obj.get(k), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not _is_state(obj):
        raise ValueError(f"{path} holds no state dict of tensors (looked under {', '.join(NESTING_KEYS)})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _is_state(d: dict) -> bool:
    tensors = sum(isinstance(v, torch.Tensor) for v in d.values())
    return tensors > 0 and tensors >= len(d) / 2


def _strip(state: dict, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _best_prefix(state: dict, wanted: set[str], head_key: str | None) -> str:
    def score(prefix):
        keys = _strip(state, prefix)
        return sum(k in wanted or (head_key is not None and k.startswith(head_key + ".")) for k in keys)

    return max(PREFIXES, key=lambda p: (score(p), -len(p)))


# -- the RoLI reference code's saved models ---------------------------------------------------------------

_REF_ROOT = re.compile(r"^((?:module\.)?(?:\d+\.)?)enc\.")
_REF_VIT_BLOCK = re.compile(r"^transformer\.encoder\.layer\.(\d+)\.(.+)$")
_REF_VIT_RENAMES = (
    ("attention_norm.", "norm1."),
    ("ffn_norm.", "norm2."),
    ("ffn.", "mlp."),
    ("attn.out.", "attn.proj."),
)


def _from_roli_reference(state: dict, notes: list[str]) -> tuple[dict, dict, list[str]] | None:
    """(backbone state in timm names, head state, ignored keys) of a model saved by the RoLI reference code
    (DongXzz/RoLI), or None when `state` is not one. Its ViT is converted to timm's names (q, k, v joined
    into qkv); its Swin already uses the original Swin names (timm's filter converts them later)."""
    roots = {m.group(1) for k in state if (m := _REF_ROOT.match(k))}
    if len(roots) != 1:
        return None
    root = roots.pop()
    if f"{root}head.last_layer.weight" not in state:
        return None
    enc = _strip(state, root + "enc.")
    head = _strip(state, root + "head.last_layer.")
    extra_head = [k for k in state if k.startswith(root + "head.") and not k.startswith(root + "head.last_layer.")]
    if extra_head:
        raise ValueError(f"the RoLI reference model has an MLP head ({extra_head[0]}, ...): roli's head is linear")
    ignored = [k for k in state if not k.startswith(root)]  # the normaliser's (and resize's) buffers
    peft = [k for k in enc if any(t in k for t in ("lora", "adapter", "prompt"))]
    lora = [k for k in peft if "lora" in k]
    if lora and all(not bool(enc[k].any()) for k in lora):  # its LoRA is zero-initialised and never trained
        notes.append(f"dropped {len(lora)} all-zero LoRA tensors of the reference (they add nothing)")
        enc = {k: v for k, v in enc.items() if k not in lora}
        peft = [k for k in peft if k not in lora]
    if peft:
        raise ValueError(
            f"the RoLI reference model holds PEFT parameters roli cannot convert ({peft[0]}, "
            f"{len(peft)} in all); merge them into the backbone first"
        )
    if any(k.startswith("transformer.") for k in enc):
        enc = _reference_vit_to_timm(enc)
        notes.append("converted the RoLI reference ViT to timm names")
    else:
        notes.append("RoLI reference Swin (original Swin names)")
    return enc, head, ignored


def _reference_vit_to_timm(enc: dict) -> dict:
    fixed = {"transformer.embeddings.patch_embeddings.weight": "patch_embed.proj.weight",
             "transformer.embeddings.patch_embeddings.bias": "patch_embed.proj.bias",
             "transformer.embeddings.cls_token": "cls_token",
             "transformer.embeddings.position_embeddings": "pos_embed",
             "transformer.encoder.encoder_norm.weight": "norm.weight",
             "transformer.encoder.encoder_norm.bias": "norm.bias"}  # fmt: skip
    out, qkv = {}, {}
    for k, v in enc.items():
        if k in fixed:
            out[fixed[k]] = v
            continue
        m = _REF_VIT_BLOCK.match(k)
        if m is None:
            out[k] = v  # left as is: strict loading names it
            continue
        block, rest = m.groups()
        q = re.match(r"attn\.(query|key|value)\.(weight|bias)$", rest)
        if q:
            qkv.setdefault((block, q.group(2)), {})[q.group(1)] = v
            continue
        for old, new in _REF_VIT_RENAMES:
            if rest.startswith(old):
                rest = new + rest[len(old) :]
                break
        out[f"blocks.{block}.{rest}"] = v
    for (block, kind), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"the RoLI reference ViT block {block} lacks some of attn.query/key/value.{kind}")
        out[f"blocks.{block}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def _timm_filter(state: dict, backbone: nn.Module, notes: list[str]) -> dict:
    """timm's own checkpoint filter of the backbone's architecture, where it has one."""
    try:
        module = importlib.import_module(type(backbone).__module__)
    except ImportError:  # pragma: no cover - the class's module is always importable
        return state
    fn = getattr(module, "checkpoint_filter_fn", None)
    if fn is None or not type(backbone).__module__.startswith("timm."):
        return state
    try:
        out = fn(dict(state), backbone)
    except Exception as e:  # noqa: BLE001 - timm's filter met a layout it does not know
        raise ValueError(
            f"timm's checkpoint filter for {type(backbone).__name__} failed ({first_line(e)[:150]}): "
            "is this checkpoint of this architecture?"
        ) from None
    if set(out) != set(state) or any(out[k].shape != state[k].shape for k in out if k in state):
        notes.append(f"converted by timm's {type(backbone).__name__} checkpoint filter")
    return out


def load_pretrained(
    model, path: str | Path, strict: bool = True, keep_head: bool = False, ema: bool = False
) -> LoadReport:
    """Load a (robust) backbone checkpoint into a RobustClassifier. See the module docstring.

    Args:
        keep_head: use the checkpoint's classifier as the model's head when its class count matches
            (evaluation of a whole classifier, or a downstream task with the source's label space). By
            default the head stays as it is (a fresh random head), whatever the checkpoint holds.
        ema: load the EMA weights of a file that holds both (timm CheckpointSaver with model EMA).
    """
    notes: list[str] = []
    state = read_state_dict(path, ema=ema, notes=notes)
    reference = _from_roli_reference(state, notes)
    ignored: list[str] = []
    head_key = model.classifier_key
    if reference is not None:
        backbone_state, head_state, ignored = reference
        prefix, foreign = "", []
        backbone_state = _timm_filter(backbone_state, model.backbone, notes)
    elif all(k.startswith(("backbone.", "head.")) for k in state) and any(k.startswith("head.") for k in state):
        prefix = "backbone."  # roli's own full model state: backbone.* / head.*
        backbone_state = _timm_filter(_strip(state, "backbone."), model.backbone, notes)
        head_state = _strip(state, "head.")
        foreign = []
    else:
        wanted = set(model.backbone.state_dict())
        prefix = _best_prefix(state, wanted, head_key)
        ignored = [k for k in state if not k.startswith(prefix) and k.startswith(DROPPED)]
        foreign = [k for k in state if not k.startswith(prefix) and k not in ignored]
        stripped = _timm_filter(_strip(state, prefix), model.backbone, notes)
        head_state = _strip(stripped, head_key + ".") if head_key else {}
        backbone_state = {k: v for k, v in stripped.items() if not (head_key and k.startswith(head_key + "."))}
    expected = model.backbone.state_dict()
    missing = [k for k in expected if k not in backbone_state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in backbone_state if k not in expected] + foreign
    shape_bad = [k for k, v in backbone_state.items() if k in expected and v.shape != expected[k].shape]
    matched = [k for k in backbone_state if k in expected and k not in shape_bad]
    if not matched:
        have, want = ", ".join(list(state)[:3]), ", ".join(list(expected)[:3])
        raise ValueError(
            f"{path}: no tensor matches the backbone {model.name} (the checkpoint has {have}; the model expects {want})"
        )
    if shape_bad:
        example = _shapes(shape_bad[:3], backbone_state, expected)
        raise ValueError(
            f"{path}: {len(shape_bad)} tensors have other shapes than in {model.name} "
            f"(e.g. {example}): another architecture?"
        )
    if strict and (missing or unexpected):
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys ({', '.join(missing[:4])})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:4])})")
        raise ValueError(
            f"{path} does not match the backbone {model.name}: {'; '.join(problems)}. "
            "To load it anyway, pass strict=False (CLI: --non-strict)"
        )
    model.backbone.load_state_dict({k: backbone_state[k] for k in matched}, strict=False)
    head, head_loaded = "not in checkpoint", False
    w, b = head_state.get("weight"), head_state.get("bias")
    if w is not None and w.shape == model.head.weight.shape and keep_head:
        with torch.no_grad():
            model.head.weight.copy_(w)
            if b is not None:
                model.head.bias.copy_(b)
            else:
                model.head.bias.zero_()
        head, head_loaded = f"loaded from the checkpoint ({w.shape[0]} classes)", True
    elif w is not None and w.shape == model.head.weight.shape:
        head = (
            f"the checkpoint's classifier ({w.shape[0]} classes) is not used: a fresh random head "
            "(keep it with keep_head=True / --keep-source-head when the label space is the same)"
        )
    elif w is not None:
        head = f"dropped (checkpoint has {w.shape[0]} classes, the model {model.num_classes})"
    return LoadReport(
        str(path),
        prefix,
        len(matched),
        head,
        ignored,
        missing if not strict else [],
        unexpected if not strict else [],
        notes,
        head_loaded,
    )


def _shapes(keys, got, want) -> str:
    return ", ".join(f"{k}: {tuple(got[k].shape)} vs {tuple(want[k].shape)}" for k in keys)


def save_checkpoint(model: nn.Module, path: str | Path, trainable_only: bool = False, meta: dict | None = None) -> None:
    """Save the model (or only its trainable parameters, for PEFT) atomically, with plain-data metadata."""
    state = model.state_dict()
    if trainable_only:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in names}
    payload = {
        "format": ROLI_FORMAT,
        "version": 1,
        "trainable_only": trainable_only,
        "state_dict": {k: v.detach().cpu() for k, v in state.items()},
        "meta": dict(meta or {}),
    }
    save_torch(payload, path)


def load_checkpoint(model: nn.Module, path: str | Path) -> dict:
    """Load a checkpoint written by save_checkpoint into `model` (strictly). Returns its metadata."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    payload = load_tagged(path, ROLI_FORMAT, "roli checkpoint (for published weights use load_pretrained)")
    state = payload["state_dict"]
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    missing = [] if payload["trainable_only"] else [k for k in own if k not in state]
    bad = [k for k in state if k in own and state[k].shape != own[k].shape]
    if unexpected or missing or bad:
        raise ValueError(
            f"{path} does not fit this model: {len(missing)} missing ({', '.join(missing[:3])}), "
            f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}), {len(bad)} with other "
            f"shapes ({_shapes(bad[:2], state, own) if bad else ''})"
        )
    model.load_state_dict(state, strict=not payload["trainable_only"])
    return payload["meta"]
