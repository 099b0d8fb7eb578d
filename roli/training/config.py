"""The trainer's configuration: one dataclass, validated field by field, with the reference protocol's
defaults (Linf 8/255, step 2/255, PGD-7 train / PGD-10 val, batch 64, warmup-cosine, SGD for ALP,
AdamW for finetuning). Flags and YAML/JSON config files map onto it; the resolved config is written
into the run directory."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from roli._cli import BadValue, auto_device, parse_budget
from roli._io import first_line
from roli.attacks import fast
from roli.models.classifier import HEAD_INITS
from roli.models.peft import METHODS as PEFT_METHODS

METHODS = ("pretrain", "lp", "alp", "ft", "roli")
# Per kind of stage: optimiser, effective learning rate and weight decay. The reference's CIFAR-10 values:
# ALP 0.0125 (SGD); full FT 2.5e-5 from the ALP head (RoLI) and 1.25e-4 from a random head (RanLI)
# (AdamW); pretraining from scratch: SGD 0.1.
STAGE_DEFAULTS = {
    "pretrain": {"optimizer": "sgd", "lr": 0.1, "weight_decay": 5e-4},
    "lp": {"optimizer": "sgd", "lr": 0.1, "weight_decay": 0.01},
    "alp": {"optimizer": "sgd", "lr": 0.0125, "weight_decay": 0.01},
    "ft": {"optimizer": "adamw", "lr": 2.5e-5, "weight_decay": 0.01},
    "ranli": {"optimizer": "adamw", "lr": 1.25e-4, "weight_decay": 0.01},
}
# The stage kind whose settings the plain --lr/--optimizer/--weight-decay flags set, per method.
PRIMARY = {"pretrain": "pretrain", "lp": "lp", "alp": "alp", "ft": "ft", "roli": "ft"}


@dataclass(frozen=True)
class StageSettings:
    """The resolved optimisation settings of one stage."""

    optimizer: str
    lr: float
    weight_decay: float
    epochs: int
    warmup: int
    attack: str = "pgd"  # the training attack: pgd | fgsm-rs | n-fgsm | none


ConfigError = BadValue  # a bad configuration value: one line, exit code 2


def parse_classes(text: str | None) -> list[int] | None:
    """ "0-4" or "5,6,7" -> class indices (relabelled 0..k-1 in that order)."""
    if text in (None, ""):
        return None
    out = []
    try:
        for part in str(text).split(","):
            lo, sep, hi = part.partition("-")
            out += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    except ValueError:
        raise ConfigError(f"classes: {text!r} is not a list like 0-4 or 1,3,5") from None
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise ConfigError(f"classes: {text!r} must name distinct classes >= 0")
    return out


# sgd: momentum SGD; adamw: torch's AdamW (decay on weights only); adamw-ref: the RoLI reference's AdamW (eps 1e-6,
# no decay on parameters named *bias*), see roli.training.loop.param_groups.
OPTIMIZERS = ("sgd", "adamw", "adamw-ref")
REF_ADAMW_EPS = 1e-6  # the RoLI reference's own AdamW (src/solver/optimizer.py); torch's default is 1e-8


def describe_optimizer(kind: str, lr: float, weight_decay: float, momentum: float) -> str:
    """One line for config.json and --print-config: the optimiser and its decay groups."""
    decay = {"adamw": "on weights (ndim >= 2), 0 on biases/norms/gates",
             "adamw-ref": "on every parameter without 'bias' in its name, 0 on the rest",
             "sgd": "on weights (ndim >= 2), 0 on biases/norms/gates"}[kind]  # fmt: skip
    opt = {"sgd": f"SGD momentum {momentum}", "adamw": "AdamW (torch, eps 1e-8)",
           "adamw-ref": f"AdamW (reference, eps {REF_ADAMW_EPS:g})"}[kind]  # fmt: skip
    return f"{opt}, lr {lr:g}, decay {weight_decay:g} {decay}" if weight_decay else f"{opt}, lr {lr:g}, no decay"


STAGE_KEYS = ("optimizer", "lr", "weight_decay", "epochs", "warmup", "attack")
TRAIN_ATTACKS = (*fast.ATTACKS, "none")


def _check_stage(stage: str, d, cfg) -> None:
    """A per-stage mapping (alp / ft / ranli) of STAGE_KEYS."""
    if not isinstance(d, dict):
        raise ConfigError(f"{stage}: must be a mapping of {', '.join(STAGE_KEYS)}; got {d!r}")
    unknown = sorted(set(d) - set(STAGE_KEYS))
    if unknown:
        raise ConfigError(f"{stage}: unknown keys {', '.join(unknown)} (use {', '.join(STAGE_KEYS)})")
    if "optimizer" in d and d["optimizer"] not in OPTIMIZERS:
        raise ConfigError(f"{stage}.optimizer: {d['optimizer']!r} is not one of {', '.join(OPTIMIZERS)}")
    if "attack" in d:
        _check_attack(f"{stage}.attack", d["attack"], cfg.norm)
    for key in ("lr", "weight_decay"):
        v = d.get(key)
        if key in d and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            raise ConfigError(f"{stage}.{key}: must be a number >= 0; got {v!r}")
    for key, low in (("epochs", 1), ("warmup", 0)):
        v = d.get(key)
        if key in d and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise ConfigError(f"{stage}.{key}: must be an integer >= {low}; got {v!r}")
    epochs = d.get("epochs", cfg.epochs)
    if d.get("warmup", 0) > epochs:
        raise ConfigError(f"{stage}.warmup: {d['warmup']} is more than the stage's {epochs} epochs; set "
                          f"{stage}.warmup (or --{stage}-warmup) to at most {epochs}")  # fmt: skip


def installed_module(spec: str) -> bool:
    """A "package.module:function" spec whose top-level package is installed (site-packages, or roli itself)
    and not part of the standard library; found without importing anything."""
    import importlib.util
    import sys

    top = spec.partition(":")[0].split(".")[0]
    if not top or top in sys.stdlib_module_names:
        return False
    if top == "roli":
        return True
    try:
        found = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return False
    where = (found.origin if found and found.origin else None) or next(iter(found.submodule_search_locations or []),
                                                                        None) if found else None  # fmt: skip
    return where is not None and any(p in ("site-packages", "dist-packages") for p in Path(where).resolve().parts)


def check_code_from_file(model: str, source: str, trust_code: bool) -> None:
    """A model spec read from a file (a config, a run's config.json) imports and calls code: only an installed
    package's, unless --trust-code. Checked before anything is imported."""
    if ":" in str(model) and not trust_code and not installed_module(str(model)):
        raise ConfigError(f"model: {model} (from {source}) would import and run that code; roli runs code named in a "
                          "file only from installed packages: pass --trust-code if you trust the file")  # fmt: skip


SHIPPED = Path(__file__).resolve().parent.parent / "configs"  # roli/configs/<dataset>/<name>.yaml, in the wheel


def shipped_configs() -> list[str]:
    """The names of the shipped settings, e.g. "cifar10/roli_full" (--config NAME; --list-configs)."""
    return sorted(f"{p.parent.name}/{p.stem}" for p in SHIPPED.glob("*/*.yaml"))


def find_config(text: str) -> Path:
    """--config: a YAML/JSON file, or the name of a shipped setting ("cifar10/roli_full", also with .yaml).
    An existing file wins over a name."""
    path = Path(text).expanduser()
    if path.is_file():
        return path
    name = text[: -len(".yaml")] if text.endswith(".yaml") else text
    if re.fullmatch(r"[\w-]+/[\w-]+", name) and (SHIPPED / f"{name}.yaml").is_file():
        return SHIPPED / f"{name}.yaml"
    if re.fullmatch(r"[\w-]+/[\w-]+", name):
        near = [n for n in shipped_configs() if n.split("/")[0] == name.split("/")[0]]
        hint = f" ({name.split('/')[0]} has: {', '.join(n.split('/')[1] for n in near)})" if near else ""
        raise ConfigError(f"config: {text} is neither a file nor a shipped setting{hint}; roli train --list-configs "
                          "lists them")  # fmt: skip
    raise ConfigError(f"config: file not found: {text} (shipped settings by name: roli train --list-configs)")


def _check_attack(name: str, kind, norm: str) -> None:
    if kind not in TRAIN_ATTACKS:
        raise ConfigError(f"{name}: {kind!r} is not one of {', '.join(TRAIN_ATTACKS)}")
    if kind != "none":
        try:
            fast.check_attack(kind, norm)
        except ValueError as e:
            raise ConfigError(f"{name}: {e}") from None


def _channels(value, name: str) -> list[float] | None:
    """Per-channel statistics from a list or "0.485,0.456,0.406"."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    try:
        out = [float(v) for v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: expected comma-separated numbers, one per channel; got {value!r}") from None
    if not out or not all(math.isfinite(v) for v in out):
        raise ConfigError(f"{name}: expected finite numbers, one per channel; got {value!r}")
    return out


@dataclass
class TrainConfig:
    method: str = "roli"
    run_dir: str = "runs/roli"
    # model
    model: str = "roli.models.small:small_cnn"
    model_args: dict = field(default_factory=dict)
    checkpoint: str | None = None
    non_strict: bool = False
    ema: bool = False  # load the checkpoint's EMA weights (timm CheckpointSaver with model EMA)
    download: bool = False  # fetch a registry backbone's file into the cache when no --checkpoint is given
    keep_source_head: bool = False  # start from the checkpoint's classifier (same label space only)
    pretrained: bool = False  # timm names: timm's own (standard, non-robust) weights; needs a reachable hub
    random_backbone: bool = False  # lp/alp/ft/roli without weights: a random backbone, meant (refused otherwise)
    mean: list | None = None  # preprocessing inside the model; None: the registry's / timm's / none
    std: list | None = None
    input_size: int | None = None  # resize inside the model (e.g. CIFAR 32 -> 224)
    interpolation: str = "bilinear"  # of that resize: bilinear (the reference) or bicubic
    peft: str = "full"
    init: str = "alp"
    # --method ft: the name of its finetuning stage in results.json, "RoLI-<peft>" or "RanLI-<peft>" (roli grid
    # names the finetuning it starts from a shared ALP head RoLI, and its folder roli-ft, as one roli run would)
    stage_name: str | None = None
    # The random head every stage that does not continue another starts from (ALP, RanLI, pretrain):
    # reference (the RoLI code's kaiming fan_out + prior bias), torch (nn.Linear's), zero.
    head_init: str = "torch"
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "qv"
    adapter_reduction: int = 8
    vpt_tokens: int = 10
    vpt_dropout: float = 0.0
    # data
    dataset: str = "digits"
    classes: str | None = None
    image_root: str | None = None
    val_percent: float = 10.0
    split_seed: int | None = None
    resize: int = 256  # file datasets: Resize(resize) + crop (train: random crop + flip; eval: centre crop)
    crop_size: int = 224
    data_interpolation: str = "bilinear"  # of that resize
    workers: int | None = None  # data-loading processes of file datasets (default: from the CPU count)
    # optimisation
    epochs: int = 20
    warmup: int = 10
    batch_size: int = 64
    optimizer: str | None = None  # default: sgd for pretrain/lp/alp, adamw for ft
    lr: float | None = None  # the method's own stage (FT for ft/roli); default: DEFAULT_LR[...]
    alp_lr: float | None = None  # the ALP stage inside ft/roli (default 0.0125)
    ranli_lr: float | None = None  # the random-head FT of --compare-ranli (default 1.25e-4)
    weight_decay: float | None = None  # default: 0.01 (ALP/FT), 5e-4 (pretrain)
    momentum: float = 0.9
    # Per-stage settings, each a mapping of optimizer / lr / weight_decay / epochs / warmup, over the
    # flags above: the ALP stage, the finetuning stage, and the random-head (RanLI) finetuning.
    alp: dict = field(default_factory=dict)
    ft: dict = field(default_factory=dict)
    ranli: dict = field(default_factory=dict)
    # attack
    attack: str = "pgd"  # of every training stage (a stage's mapping may set its own): pgd | fgsm-rs | n-fgsm | none
    norm: str = "linf"
    eps: float | str = "8/255"
    step_size: float | str = "2/255"
    steps: int = 7
    random_start: bool = True
    val_steps: int = 10
    autoattack: str | None = None
    # The catastrophic-overfitting guard of single-step training (fgsm-rs, n-fgsm): every `guard_every` steps
    # and at each epoch end, PGD-5 accuracy on a fixed batch of `guard_images` validation images; a drop of
    # more than `guard_drop` below the best check while the single-step accuracy rises restores the last
    # good state and continues the stage with PGD-`steps`. guard_every 0 switches it off.
    guard_every: int = 100
    guard_drop: float = 0.2
    guard_images: int = 128
    # run
    precision: str = "fp32"
    channels_last: bool = False  # conv nets: the model and the attack's images in channels_last
    compile: bool = False  # torch.compile the model used by the attack and the update
    cuda_graph: bool = False  # record the training attack's k steps in a CUDA graph (GPU)
    fold_bn: bool = True  # training attacks fold Conv -> BatchNorm pairs (eval mode: the same function)
    device: str = "auto"  # auto: cuda where a CUDA device is available, else cpu (resolved here, recorded resolved)
    seed: int = 0
    compare_ranli: bool = False

    def __post_init__(self):
        def need(cond: bool, message: str):
            if not cond:
                raise ConfigError(message)

        for f in fields(self):  # values read from YAML/JSON: a string "false" or "no" is not a boolean
            value = getattr(self, f.name)
            if f.type == "bool":
                need(isinstance(value, bool), f"{f.name.replace('_', '-')}: must be true or false; got {value!r}")
            elif f.type == "str" and f.name != "eps":
                need(isinstance(value, str) and value != "",
                     f"{f.name.replace('_', '-')}: must be a non-empty string; got {value!r}")  # fmt: skip
            elif f.type == "dict":
                need(isinstance(value, dict), f"{f.name.replace('_', '-')}: must be a mapping; got {value!r}")
        for name in ("seed", "split_seed"):
            value = getattr(self, name)
            ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63
            need(ok or value is None and name == "split_seed",
                 f"{name.replace('_', '-')}: must be an integer in [0, 2**63); got {value!r}")  # fmt: skip
        need(isinstance(self.val_percent, (int, float)) and not isinstance(self.val_percent, bool),
             f"val-percent: must be a number in (0, 100); got {self.val_percent!r}")  # fmt: skip
        need(self.method in METHODS, f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        need(self.peft in PEFT_METHODS, f"peft: {self.peft!r} is not one of {', '.join(PEFT_METHODS)}")
        need(self.init in ("random", "lp", "alp") or Path(self.init).suffix != "" or Path(self.init).exists(),
             f"init: {self.init!r} is not random, lp, alp or a checkpoint path")  # fmt: skip
        need(self.head_init in HEAD_INITS, f"head-init: {self.head_init!r} is not one of {', '.join(HEAD_INITS)}")
        need(self.norm in ("linf", "l2"), f"norm: {self.norm!r} is not linf or l2")
        _check_attack("attack", self.attack, self.norm)
        need(self.precision in ("fp32", "bf16"), f"precision: {self.precision!r} is not fp32 or bf16")
        need(self.interpolation in ("bilinear", "bicubic"),
             f"interpolation: {self.interpolation!r} is not bilinear or bicubic")  # fmt: skip
        self.mean, self.std = _channels(self.mean, "mean"), _channels(self.std, "std")
        need((self.mean is None) == (self.std is None), "mean, std: give both or neither")
        need(self.mean is None or len(self.mean) == len(self.std),
             f"mean, std: {len(self.mean or [])} and {len(self.std or [])} channels differ")  # fmt: skip
        need(self.std is None or all(v > 0 for v in self.std), f"std: must be > 0 per channel; got {self.std}")
        need(self.input_size is None or (isinstance(self.input_size, int) and not isinstance(self.input_size, bool)
                                         and self.input_size >= 1),
             f"input-size: must be an integer >= 1; got {self.input_size!r}")  # fmt: skip
        moved = sorted(set(self.model_args) & {"mean", "std", "input_size", "interpolation"})
        need(not moved, f"model-arg: {', '.join(moved)} is preprocessing, not a constructor argument: use "
                        f"--{moved[0].replace('_', '-')} instead" if moved else "")  # fmt: skip
        need(self.optimizer in (None, *OPTIMIZERS), f"optimizer: {self.optimizer!r} is not one of "
                                                     f"{', '.join(OPTIMIZERS)}")  # fmt: skip
        need(
            self.autoattack in (None, "standard", "plus", "rand"),
            f"autoattack: {self.autoattack!r} is not standard, plus or rand",
        )
        for name in ("epochs", "batch_size", "steps", "val_steps", "lora_rank", "adapter_reduction", "vpt_tokens",
                     "guard_every", "guard_images"):  # fmt: skip
            value = getattr(self, name)
            low = 0 if name in ("steps", "guard_every") else 1
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
            need(ok, f"{name.replace('_', '-')}: must be an integer >= {low}; got {value!r}")
        need(isinstance(self.warmup, int) and not isinstance(self.warmup, bool) and self.warmup >= 0,
             f"warmup: must be an integer >= 0; got {self.warmup!r}")  # fmt: skip
        need(self.warmup <= self.epochs,
             f"warmup: {self.warmup} warmup epochs is more than the run's {self.epochs} epochs; pass --warmup N with "
             f"N <= {self.epochs} (e.g. --warmup {min(self.epochs, max(1, self.epochs // 10))})")  # fmt: skip
        need(isinstance(self.guard_drop, (int, float)) and not isinstance(self.guard_drop, bool)
             and 0 < self.guard_drop < 1,
             f"guard-drop: must be a fraction in (0, 1); got {self.guard_drop!r}")  # fmt: skip
        need(0 < self.val_percent < 100, f"val-percent: must be in (0, 100); got {self.val_percent}")
        for stage in ("alp", "ft", "ranli"):
            _check_stage(stage, getattr(self, stage), self)
        need(0 <= self.lora_dropout < 1 and 0 <= self.vpt_dropout < 1,
             f"lora-dropout, vpt-dropout: must be in [0, 1); got {self.lora_dropout}, {self.vpt_dropout}")  # fmt: skip
        need(isinstance(self.lora_targets, str) and self.lora_targets in ("q", "k", "v", "qk", "qv", "kv", "qkv"),
             f"lora-targets: {self.lora_targets!r} is not one of q, k, v, qk, qv, kv, qkv")  # fmt: skip
        need(self.data_interpolation in ("bilinear", "bicubic"),
             f"data-interpolation: {self.data_interpolation!r} is not bilinear or bicubic")  # fmt: skip
        for name in ("resize", "crop_size"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                 f"{name.replace('_', '-')}: must be an integer >= 1; got {value!r}")  # fmt: skip
        need(self.crop_size <= self.resize, f"crop-size: {self.crop_size} is larger than resize {self.resize}")
        need(self.workers is None or (isinstance(self.workers, int) and not isinstance(self.workers, bool)
                                      and self.workers >= 0),
             f"workers: must be an integer >= 0; got {self.workers!r}")  # fmt: skip
        for name in ("lr", "alp_lr", "ranli_lr", "weight_decay"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0),
                 f"{name.replace('_', '-')}: must be a number >= 0; got {value!r}")  # fmt: skip
        self.eps = parse_budget(self.eps, "eps", self.norm)
        self.step_size = parse_budget(self.step_size, "step-size")
        need(self.attack == "none" or self.steps == 0 or self.step_size > 0, "step-size: must be > 0 for PGD")
        classes = parse_classes(self.classes)
        need(classes is None or len(classes) >= 2,
             f"classes: {self.classes!r} names one class; a classifier needs at least two")  # fmt: skip
        need(isinstance(self.momentum, (int, float)) and not isinstance(self.momentum, bool)
             and math.isfinite(self.momentum) and 0 <= self.momentum < 1,
             f"momentum: must be a number in [0, 1); got {self.momentum!r}")  # fmt: skip
        self.device = auto_device(self.device)
        need(isinstance(self.device, str) and re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None,
             f"device: {self.device!r} is not cpu, cuda or cuda:N")  # fmt: skip
        need(not self.cuda_graph or str(self.device).startswith("cuda"),
             f"cuda-graph: records the attack on a GPU and needs --device cuda; got {self.device}")  # fmt: skip
        need(self.stage_name is None or self.method == "ft" and re.fullmatch(r"(RoLI|RanLI)-[\w-]+", self.stage_name)
             is not None and (self.stage_name.startswith("RanLI-") == (self.init == "random")),
             f"stage-name: {self.stage_name!r} names a --method ft stage RoLI-<peft> (from a head) or RanLI-<peft> "
             "(--init random)")  # fmt: skip
        need(self.method != "roli" or self.init == "alp",
             f"init: --method roli finetunes from the ALP head; got --init {self.init} (a random head is RanLI: "
             "--method ft --init random, or --compare-ranli beside RoLI)")  # fmt: skip
        need(
            not self.compare_ranli or self.method == "roli",
            f"compare-ranli: runs the random-head baseline beside --method roli; got --method {self.method}",
        )
        self.resolved()  # every stage's settings resolve (e.g. no adamw-ref without decay)

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config: file not found: {path}")
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(path.read_text()) or {}
            else:
                data = json.loads(path.read_text())
        except Exception as e:  # noqa: BLE001 - any parse error
            raise ConfigError(f"config: cannot parse {path}: {first_line(e)}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config: {path} must hold a mapping of options")
        data = {k: v for k, v in data.items() if not str(k).startswith("_")}  # a run's records, not options
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in data if k.replace("-", "_") not in known)
        if unknown:
            raise ConfigError(f"config: unknown options in {path}: {', '.join(unknown)}")
        data = {k.replace("-", "_"): v for k, v in data.items()}
        for stage in ("alp", "ft", "ranli"):  # a flag sets one key of a stage's mapping, not all of it
            if isinstance(overrides.get(stage), dict) and isinstance(data.get(stage), dict):
                overrides[stage] = {**data[stage], **overrides[stage]}
        return cls(**{**data, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)

    def settings(self, kind: str) -> StageSettings:
        """Resolved settings of a stage kind (pretrain | lp | alp | ft | ranli), from the first that sets
        each: the stage's own mapping (alp / ft / ranli); for the method's own stage, the plain flags
        (--lr, --optimizer, --weight-decay, --epochs, --warmup); --alp-lr / --ranli-lr; STAGE_DEFAULTS
        (epochs and warmup: the plain flags). A finetuning stage from a random head (--init random) is
        of kind ranli."""
        if kind == "ft" and self.init == "random":
            kind = "ranli"
        d = STAGE_DEFAULTS[kind]
        own = PRIMARY[self.method] == kind or (kind == "ranli" and self.method == "ft")
        mapping = dict(self.ft) if kind == "ranli" and self.method == "ft" else {}
        mapping |= {"alp": self.alp, "ft": self.ft, "ranli": self.ranli}.get(kind, {})
        legacy_lr = {"alp": self.alp_lr, "ranli": self.ranli_lr}.get(kind)

        def pick(key, flag, default):
            if key in mapping:
                return mapping[key]
            if own and flag is not None:
                return flag
            return default

        lr = pick("lr", self.lr, None)
        if lr is None:
            lr = legacy_lr if legacy_lr is not None else d["lr"]
        return StageSettings(
            optimizer=pick("optimizer", self.optimizer, d["optimizer"]),
            lr=float(lr),
            weight_decay=float(pick("weight_decay", self.weight_decay, d["weight_decay"])),
            epochs=mapping.get("epochs", self.epochs),
            warmup=mapping.get("warmup", self.warmup),
            attack=mapping.get("attack", self.attack),
        )

    def resolved(self) -> dict:
        """The settings every stage of this method runs with (written into config.json)."""
        kinds = {"pretrain": ["pretrain"], "lp": ["lp"], "alp": ["alp"], "roli": ["alp", "ft"],
                 "ft": {"lp": ["lp", "ft"], "alp": ["alp", "ft"]}.get(self.init, ["ft"])}[self.method]  # fmt: skip
        if self.method == "roli" and self.compare_ranli:
            kinds.append("ranli")
        out = {}
        for k in kinds:
            s = self.settings(k)
            name = "ranli" if k == "ft" and self.init == "random" else k
            if k == "lp" and s.optimizer == "adamw-ref":
                raise ConfigError("lp.optimizer: the clean linear probe trains with sgd or adamw, not adamw-ref")
            if s.optimizer == "adamw-ref" and s.weight_decay == 0:
                raise ConfigError(
                    f"{name}.optimizer: adamw-ref with weight_decay 0 is not what the reference ran "
                    "(its optimizer.py falls through to SGD, momentum 0.9, no decay); use sgd"
                )
            detail = describe_optimizer(s.optimizer, s.lr, s.weight_decay, self.momentum)
            out[name] = {"optimizer": s.optimizer, "lr": s.lr, "weight_decay": s.weight_decay, "epochs": s.epochs,
                         "warmup": s.warmup, "attack": s.attack, "optimizer_detail": detail}  # fmt: skip
        return out
