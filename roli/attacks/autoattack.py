"""AutoAttack (Croce & Hein, ICML 2020) through its reference implementation, `pyautoattack` on PyPI.

roli does not re-implement any attack of AutoAttack. It puts its model contract in front (images in
[0, 1], eval mode, frozen parameters, optional bf16 autocast) and runs the attacks of the chosen
version (configured by pyautoattack itself) one after another, each only on the points still unbroken,
exactly as AutoAttack's own evaluation does, recording the robust accuracy after each attack.

Resuming: pyautoattack 0.2.0's own state file cannot be resumed (it writes its sets of attack names as
strings and reads them back unconverted, and its restore path returns an unbound variable). So roli
keeps its own state file, written atomically after every finished attack: robust flags, adversarial
images and per-attack accuracy. An interrupted evaluation restarts at the first unfinished attack.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from roli._amp import autocast_for
from roli._io import load_tagged, save_torch
from roli.attacks._checks import check_images, check_labels
from roli.attacks._mode import attack_mode

log = logging.getLogger("roli.autoattack")
VERSIONS = ("standard", "plus", "rand", "custom")
DLR_ATTACKS = ("apgd-t", "apgd-dlr")  # their loss reads the 4 largest logits
MIN_CLASSES_DLR = 4
STATE_FORMAT = 1


@dataclass
class AutoAttackResult:
    x_adv: torch.Tensor  # (B, ...): the first successful adversarial image per point, else the clean one
    clean_accuracy: float
    robust_accuracy: float  # worst case over the attacks that ran
    per_attack: dict[str, float] = field(default_factory=dict)  # robust accuracy after each attack, in order
    robust: torch.Tensor | None = None  # (B,) bool

    def __repr__(self) -> str:  # the figures, not the tensors
        per = ", ".join(f"{k} {100 * v:.2f}%" for k, v in self.per_attack.items())
        return (f"AutoAttackResult(clean {100 * self.clean_accuracy:.2f}%, robust {100 * self.robust_accuracy:.2f}%"
                f"{', after ' + per if per else ''}; x_adv {tuple(self.x_adv.shape)})")  # fmt: skip


class _Logits(nn.Module):
    def __init__(self, model: nn.Module, precision: str):
        super().__init__()
        self.model, self.precision = model, precision

    def forward(self, x):
        with autocast_for(x.device, self.precision):
            return self.model(x).float()


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's class and of every parameter and buffer (names, shapes, values)."""
    h = hashlib.sha1(type(model).__qualname__.encode())
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _share(flags: torch.Tensor) -> float:
    """The share of True from exact counts (a float32 mean would read 0.9 as 0.89999998)."""
    return int(flags.sum()) / max(1, flags.numel())


def _fingerprint(x, y, **config) -> str:
    h = hashlib.sha1(repr(sorted(config.items())).encode())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    h.update(y.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _load_state(path: Path, fingerprint: str) -> dict | None:
    if not path.exists():
        return None
    state = load_tagged(path, STATE_FORMAT, "roli AutoAttack state file (delete it or pass another path)")
    if state.get("fingerprint") != fingerprint:
        raise ValueError(
            f"AutoAttack state file {path} was made for another evaluation (model, data, eps, norm, version, "
            "attacks or seed differ); delete it or pass another path"
        )
    return state


class _Forward(logging.Handler):
    """Passes AutoAttack's own warnings (its checks: randomness, output range, dynamic models, class count, Square's
    success) to roli's log, where run logs and the console see them."""

    def emit(self, record: logging.LogRecord) -> None:
        log.warning("AutoAttack: %s", record.getMessage())


@contextlib.contextmanager
def forwarded_warnings():
    source = logging.getLogger("auto-attack")
    handler = _Forward(logging.WARNING)
    source.addHandler(handler)
    try:
        yield
    finally:
        source.removeHandler(handler)


def cross_check(
    n: int, clean: float, aa_clean: float, aa_robust: float, per_attack: dict[str, float], pgd: float | None = None
) -> list[str]:
    """Checks of a finished AutoAttack evaluation over n examples; each problem is logged as one warning line and
    returned. roli runs AutoAttack's attacks one call each, which bypasses AutoAttack's own check that Square (a
    gradient-free attack) finds little the gradient attacks missed: it is run here on the totals, with
    AutoAttack's own function. Also: AutoAttack must not be weaker than PGD (by more than 1 point), and its clean
    accuracy must be the evaluation's (beyond float rounding of a folded model: more than 0.1% of n apart)."""
    found: list[str] = []

    class Collect:
        def warning(self, msg):
            found.append(f"AutoAttack: {msg}")

    if "square" in per_attack:
        from pyautoattack import checks

        checks.check_square_sr({"clean": aa_clean, **per_attack}, logger=Collect())
    if pgd is not None and aa_robust > pgd + 0.01:
        found.append(
            f"AutoAttack robust accuracy {aa_robust:.2%} is above PGD's {pgd:.2%} by more than 1 point: the "
            "stronger attack did worse, which points at a broken evaluation (randomness in the model, "
            "gradient masking, or a state file of another run)"
        )
    if abs(round(aa_clean * n) - round(clean * n)) > max(1, n // 1000):  # counts, not float products
        found.append(
            f"AutoAttack's clean accuracy {aa_clean:.2%} differs from the evaluation's {clean:.2%} on the "
            f"same {n} images: the model's outputs are not deterministic"
        )
    for message in found:
        log.warning(message)
    return found


def _check_args(x, y, eps: float, norm: str, version: str, attacks) -> str:
    """run_autoattack's arguments checked; returns the norm's name in AutoAttack's spelling."""
    if version not in VERSIONS:
        raise ValueError(f"AutoAttack version must be one of {VERSIONS}; got {version!r}")
    if (version == "custom") != (attacks is not None):
        raise ValueError("pass attacks=[...] exactly when version='custom'")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0; got {eps}")
    aa_norm = {"linf": "Linf", "l2": "L2"}.get(norm)
    if aa_norm is None:
        raise ValueError(f"norm must be 'linf' or 'l2'; got {norm!r}")
    check_images(x, (0.0, 1.0))
    check_labels("y", y, x)
    return aa_norm


def _adversary(adversary, wrapped, x):
    """A reference AutoAttack made quiet and fitted to the model's class count: targeted attacks aim at the
    top other classes, never more than the model has; the DLR loss needs MIN_CLASSES_DLR classes."""
    adversary.verbose = False
    if len(x):
        n_cls = wrapped(x[:1]).shape[1]
        dlr = [a for a in adversary.attacks_to_run if a in DLR_ATTACKS]
        if dlr and n_cls < MIN_CLASSES_DLR:
            raise ValueError(
                f"AutoAttack's DLR loss ({', '.join(dlr)}) needs at least {MIN_CLASSES_DLR} classes; "
                f"the model has {n_cls}"
            )
        for attack in (adversary.apgd_targeted, adversary.fab):
            attack.n_target_classes = max(1, min(attack.n_target_classes, n_cls - 1))
    return adversary


def _joined(data) -> tuple[torch.Tensor, torch.Tensor]:
    """run_autoattack's data as one (x, y) pair; the older (model, x, y, eps) form answered with the new one."""
    if isinstance(data, torch.Tensor):
        raise TypeError(
            "run_autoattack(model, data, eps): data is a (x, y) pair or an iterable of (x, y) batches, as in "
            "robust_accuracy and eps_sweep; call run_autoattack(model, (x, y), eps)"
        )
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    batches = list(data)
    if not batches:
        raise ValueError("run_autoattack: data holds no batches")
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def run_autoattack(
    model: nn.Module,
    data,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    attacks: list[str] | None = None,
    state_path: str | Path | None = None,
    batch_size: int = 250,
    seed: int = 0,
    precision: str = "fp32",
    progress: Callable[[str], None] | None = None,
) -> AutoAttackResult:
    """Run AutoAttack on `data`, called as robust_accuracy and eps_sweep are:
    `run_autoattack(model, (x, y), 8 / 255)`.

    Args:
        model: images in [0, 1] -> logits (roli's model contract).
        data: a (x, y) pair, (B, C, H, W) images in [0, 1] and (B,) labels, or an iterable of (x, y) batches
            (joined into one set: AutoAttack runs its attacks one by one over all the points still robust).
        eps: the budget; norm: "linf" or "l2".
        version: "standard" (APGD-CE, APGD-T, FAB-T, Square), "plus", "rand", or "custom" with `attacks`
            (names from apgd-ce, apgd-dlr, apgd-t, fab, fab-t, square).
        state_path: makes the evaluation resumable (see the module docstring).
        batch_size, seed: passed to AutoAttack; precision: "fp32" or "bf16" (autocast around the model).
        progress: receives a line after each attack (its name, the points still robust, the seconds it took).
    """
    try:
        from pyautoattack import AutoAttack
    except ImportError as e:
        raise ImportError(f"AutoAttack needs the reference implementation: pip install pyautoattack ({e})") from None
    x, y = _joined(data)
    aa_norm = _check_args(x, y, eps, norm, version, attacks)
    path = Path(state_path) if state_path is not None else None
    with attack_mode(model) as inner, torch.no_grad(), forwarded_warnings():
        wrapped = _Logits(inner, precision)
        adversary = _adversary(
            AutoAttack(
                wrapped, eps=float(eps), norm=aa_norm, version=version, attacks=attacks, seed=seed, device=x.device
            ),
            wrapped,
            x,
        )
        order = list(adversary.attacks_to_run)
        fingerprint = state = None
        if path is not None:  # hashing the weights is only needed to bind a state file to them
            fingerprint = _fingerprint(
                x,
                y,
                eps=float(eps),
                norm=norm,
                version=version,
                attacks=order,
                seed=seed,
                model=model_fingerprint(inner),
                precision=precision,
            )
            state = _load_state(path, fingerprint)

        def predict(images):
            return torch.cat([wrapped(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])

        if state is None:
            robust = predict(x) == y
            state = {"format": STATE_FORMAT, "fingerprint": fingerprint, "done": [], "per_attack": {},
                     "clean": _share(robust), "robust": robust.cpu(),
                     "x_adv": x.detach().cpu()}  # fmt: skip
        robust = state["robust"].to(x.device)
        x_adv = state["x_adv"].to(device=x.device, dtype=x.dtype)
        for name in order:
            if name in state["done"]:
                continue
            started = time.time()
            idx = torch.nonzero(robust)[:, 0]
            if idx.numel():
                adversary.attacks_to_run = [name]
                with torch.enable_grad():
                    cand, _ = adversary.run_standard_evaluation(x[idx], y[idx], batch_size=batch_size)
                broken = predict(cand) != y[idx]
                x_adv[idx[broken]] = cand[broken]
                robust[idx[broken]] = False
            state["done"].append(name)
            state["per_attack"][name] = _share(robust)
            state["robust"], state["x_adv"] = robust.cpu(), x_adv.cpu()
            if path is not None:
                save_torch(state, path)
            if progress is not None:
                progress(
                    f"AutoAttack {name}: {int(robust.sum())}/{len(y)} still robust ({time.time() - started:.0f} s)"
                )
    return AutoAttackResult(x_adv, state["clean"], _share(robust), dict(state["per_attack"]), robust)
