"""Robust checkpoints in the formats people publish them in, and roli's own checkpoints.

Reading (load_pretrained):
- files: .pt/.pth/.bin (torch.load with weights_only=True; refused, not unpickled, if that fails) and
  .safetensors;
- nesting: the state dict itself, or under "state_dict", "model", "model_state" or "net";
- prefixes: "module." (DataParallel/DDP), "model.", "module.model.", "attacker.model." (MadryLab
  robustness, whose "normalizer."/"attacker.normalize." entries are dropped: roli normalises inside its
  own model), "backbone."; the prefix that matches the backbone's own key names best is taken;
- key names: timm's (so ARES and other timm-based robust checkpoints load as they are);
- the classifier of the checkpoint (timm's `classifier` key, e.g. fc / head / head.fc) becomes roli's
  head when its class count matches, and is dropped (and reported) when it does not.
Strict by default: missing or unexpected backbone keys raise an error that lists them and names the
flag that relaxes it. A checkpoint that matches no backbone key is refused even when not strict: roli
never silently runs a random backbone.

Writing (save_checkpoint / load_checkpoint): the whole model or only its trainable parameters (PEFT),
with metadata, written atomically (temporary file + rename).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from roli._io import load_tagged, save_torch

NESTING_KEYS = ("state_dict", "model", "model_state", "net")
PREFIXES = ("", "module.", "model.", "module.model.", "attacker.model.", "module.attacker.model.", "backbone.",
            "module.backbone.")  # fmt: skip
DROPPED = ("normalizer.", "attacker.normalize.", "attacker.", "module.normalizer.", "module.attacker.")
ROLI_FORMAT = "roli-checkpoint"


@dataclass
class LoadReport:
    path: str
    prefix: str
    loaded: int
    head: str  # "loaded" | "dropped (...)" | "not in checkpoint"
    ignored: list[str] = field(default_factory=list)  # dropped wrapper entries (normalizer etc.)
    missing: list[str] = field(default_factory=list)  # only when strict=False
    unexpected: list[str] = field(default_factory=list)  # only when strict=False

    def __str__(self) -> str:
        parts = [f"loaded {self.loaded} backbone tensors from {self.path}", f"head: {self.head}"]
        if self.prefix:
            parts.append(f"stripped prefix {self.prefix!r}")
        if self.ignored:
            parts.append(f"ignored {len(self.ignored)} wrapper entries")
        if self.missing or self.unexpected:
            parts.append(f"NOT STRICT: {len(self.missing)} missing, {len(self.unexpected)} unexpected keys")
        return "; ".join(parts)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, un-nested. Raises ValueError with the reason."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError("loading .safetensors needs: pip install safetensors") from None
        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - any parse failure
            raise ValueError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - corrupt file, or a pickle with arbitrary objects
        raise ValueError(
            f"cannot read {path} as a weights-only checkpoint ({str(e).splitlines()[0][:200]}); "
            "re-save it as a plain state dict or .safetensors"
        ) from None
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


def load_pretrained(model, path: str | Path, strict: bool = True) -> LoadReport:
    """Load a (robust) backbone checkpoint into a RobustClassifier. See the module docstring."""
    state = read_state_dict(path)
    if all(k.startswith(("backbone.", "head.")) for k in state) and any(k.startswith("head.") for k in state):
        prefix = "backbone."  # roli's own full model state: backbone.* / head.*
        backbone_state = _strip(state, "backbone.")
        head_state = _strip(state, "head.")
    else:
        wanted = set(model.backbone.state_dict())
        head_key = model.classifier_key
        prefix = _best_prefix(state, wanted, head_key)
        stripped = _strip(state, prefix)
        head_state = _strip(stripped, head_key + ".") if head_key else {}
        backbone_state = {k: v for k, v in stripped.items() if not (head_key and k.startswith(head_key + "."))}
    own_head = "head." if prefix == "backbone." and head_state else None
    ignored = [k for k in state if not k.startswith(prefix) and k.startswith(DROPPED)]
    foreign = [k for k in state if not k.startswith(prefix) and k not in ignored
               and not (own_head and k.startswith(own_head))]  # fmt: skip
    expected = model.backbone.state_dict()
    missing = [k for k in expected if k not in backbone_state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in backbone_state if k not in expected] + foreign
    shape_bad = [k for k, v in backbone_state.items() if k in expected and v.shape != expected[k].shape]
    matched = [k for k in backbone_state if k in expected and k not in shape_bad]
    if not matched:
        have, want = ", ".join(list(state)[:3]), ", ".join(list(expected)[:3])
        raise ValueError(f"{path}: no tensor matches the backbone {model.name} (the checkpoint has {have}; "
                         f"the model expects {want})")  # fmt: skip
    if shape_bad:
        example = _shapes(shape_bad[:3], backbone_state, expected)
        raise ValueError(f"{path}: {len(shape_bad)} tensors have other shapes than in {model.name} "
                         f"(e.g. {example}): another architecture?")  # fmt: skip
    if strict and (missing or unexpected):
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys ({', '.join(missing[:4])})")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:4])})")
        raise ValueError(f"{path} does not match the backbone {model.name}: {'; '.join(problems)}. "
                         "To load it anyway, pass strict=False (CLI: --non-strict)")  # fmt: skip
    model.backbone.load_state_dict({k: backbone_state[k] for k in matched}, strict=False)
    head = "not in checkpoint (random init)"
    if head_state:
        w, b = head_state.get("weight"), head_state.get("bias")
        if w is not None and w.shape == model.head.weight.shape:
            with torch.no_grad():
                model.head.weight.copy_(w)
                if b is not None:
                    model.head.bias.copy_(b)
            head = "loaded"
        elif w is not None:
            head = f"dropped (checkpoint has {w.shape[0]} classes, the model {model.num_classes})"
    return LoadReport(str(path), prefix, len(matched), head, ignored,
                      missing if not strict else [], unexpected if not strict else [])  # fmt: skip


def _shapes(keys, got, want) -> str:
    return ", ".join(f"{k}: {tuple(got[k].shape)} vs {tuple(want[k].shape)}" for k in keys)


def save_checkpoint(model: nn.Module, path: str | Path, trainable_only: bool = False, meta: dict | None = None) -> None:
    """Save the model (or only its trainable parameters, for PEFT) atomically, with plain-data metadata."""
    state = model.state_dict()
    if trainable_only:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in names}
    payload = {"format": ROLI_FORMAT, "version": 1, "trainable_only": trainable_only,
               "state_dict": {k: v.detach().cpu() for k, v in state.items()}, "meta": dict(meta or {})}  # fmt: skip
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
        raise ValueError(f"{path} does not fit this model: {len(missing)} missing ({', '.join(missing[:3])}), "
                         f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}), {len(bad)} with other "
                         f"shapes ({_shapes(bad[:2], state, own) if bad else ''})")  # fmt: skip
    model.load_state_dict(state, strict=not payload["trainable_only"])
    return payload["meta"]
