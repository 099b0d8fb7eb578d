"""The trainer's configuration: one dataclass, validated field by field, with the reference protocol's
defaults (Linf 8/255, step 2/255, PGD-7 train / PGD-10 val, batch 64, warmup-cosine, SGD for ALP,
AdamW for finetuning). Flags and YAML/JSON config files map onto it; the resolved config is written
into the run directory."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from pathlib import Path

from roli._cli import BadValue, auto_device
from roli._io import first_line
from roli.attacks import fast
from roli.models.registry import HUB_PREFIXES
from roli.specs import AttackSpec, Batches, DataSpec, GuardSpec, ModelSpec, PeftSpec, is_int, is_number, need, need_int
from roli.specs import parse_classes as parse_classes  # re-exported: the grid and tests read it here

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
    lr_from: str = ""  # how lr was derived (config.json's _resolved, --print-config, the log)

    def as_mapping(self) -> dict:
        """The settings as a per-stage mapping of STAGE_KEYS (the form --alp / --ft and config.json take)."""
        return {k: getattr(self, k) for k in STAGE_KEYS}


# --select-by: the validation figure that picks each stage's best epoch (a key of metrics.jsonl's rows)
SELECT_BY = {"pgd": "val_robust", "reference-pgd": "val_robust_reference"}
DATA_HASH = ("full", "stat")  # --data-hash: what a fingerprint hashes of image files

ConfigError = BadValue  # the public name of roli's one user-error type (roli.training exports it)


# sgd: momentum SGD; adamw: torch's AdamW (decay on weights only); adamw-ref: the RoLI reference's AdamW (eps 1e-6,
# no decay on parameters named *bias*), see roli.training.loop.param_groups.
OPTIMIZERS = ("sgd", "adamw", "adamw-ref")
TRACKERS = ("tensorboard", "wandb", "csv")  # --log: roli.training.tracking
REF_ADAMW_EPS = 1e-6  # the RoLI reference's own AdamW (src/solver/optimizer.py); torch's default is 1e-8


def describe_optimizer(kind: str, lr: float, weight_decay: float, momentum: float) -> str:
    """One line for config.json and --print-config: the optimiser and its decay groups."""
    decay = {
        "adamw": "on weights (ndim >= 2), 0 on biases/norms/gates",
        "adamw-ref": "on every parameter without 'bias' in its name, 0 on the rest",
        "sgd": "on weights (ndim >= 2), 0 on biases/norms/gates",
    }[kind]
    opt = {
        "sgd": f"SGD momentum {momentum}",
        "adamw": "AdamW (torch, eps 1e-8)",
        "adamw-ref": f"AdamW (reference, eps {REF_ADAMW_EPS:g})",
    }[kind]
    return f"{opt}, lr {lr:g}, decay {weight_decay:g} {decay}" if weight_decay else f"{opt}, lr {lr:g}, no decay"


STAGE_KEYS = ("optimizer", "lr", "weight_decay", "epochs", "warmup", "attack")
TRAIN_ATTACKS = (*fast.ATTACKS, "none")


def _check_stage(stage: str, d, norm: str, run_epochs: int) -> None:
    """A per-stage mapping (alp / ft / ranli) of STAGE_KEYS."""
    if not isinstance(d, dict):
        raise BadValue(f"{stage}: must be a mapping of {', '.join(STAGE_KEYS)}; got {d!r}")
    unknown = sorted(set(d) - set(STAGE_KEYS))
    if unknown:
        raise BadValue(f"{stage}: unknown keys {', '.join(unknown)} (use {', '.join(STAGE_KEYS)})")
    if "optimizer" in d and d["optimizer"] not in OPTIMIZERS:
        raise BadValue(f"{stage}.optimizer: {d['optimizer']!r} is not one of {', '.join(OPTIMIZERS)}")
    if "attack" in d:
        _check_attack(f"{stage}.attack", d["attack"], norm)
    for key in ("lr", "weight_decay"):
        v = d.get(key)
        if key in d and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            raise BadValue(f"{stage}.{key}: must be a number >= 0; got {v!r}")
    for key, low in (("epochs", 1), ("warmup", 0)):
        v = d.get(key)
        if key in d and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise BadValue(f"{stage}.{key}: must be an integer >= {low}; got {v!r}")
    epochs = d.get("epochs", run_epochs)
    if d.get("warmup", 0) > epochs:
        raise BadValue(
            f"{stage}.warmup: {d['warmup']} is more than the stage's {epochs} epochs; set "
            f"{stage}.warmup (or --{stage}-warmup) to at most {epochs}"
        )


MAPPINGS = ("model_args", "alp", "ft", "ranli")  # the options that hold a mapping: --set KEY.SUB=VALUE sets one key


def _set_value(text: str):
    """--set KEY=VALUE: the value read as YAML (numbers, true/false, null, lists, mappings), else the string."""
    import yaml

    try:
        return _yaml(text)
    except yaml.YAMLError:
        return text
    except ValueError as e:  # a key given twice
        raise BadValue(f"--set: {text}: {e}") from None


def parse_set_options(items: list[str] | None) -> dict:
    """--set KEY=VALUE (roli train and roli grid): any TrainConfig option, its value read as YAML; a dotted key
    sets one key of a mapping option (alp.lr=0.01, model_args.drop_path_rate=0.1), merged with the rest of it."""
    out: dict = {}
    known = {f.name for f in fields(TrainConfig)}
    for item in items or []:
        key, sep, text = item.partition("=")
        key, value = key.strip().replace("-", "_"), _set_value(text)
        top, dot, sub = key.partition(".")
        if not sep or not top or (dot and not sub):
            raise BadValue(f"--set: expected KEY=VALUE or KEY.SUBKEY=VALUE; got {item!r}")
        if top not in known:
            raise BadValue(f"--set: {top} is not a config option (roli train --print-config lists them)")
        if dot and top not in MAPPINGS:
            raise BadValue(f"--set: {top} is not a mapping; only {', '.join(MAPPINGS)} take KEY.SUBKEY")
        if dot and top != "model_args" and sub not in STAGE_KEYS:
            raise BadValue(f"--set: {top}.{sub}: a stage's keys are {', '.join(STAGE_KEYS)}")
        where, name = (out.setdefault(top, {}), sub) if dot else (out, top)
        if not isinstance(where, dict):
            raise BadValue(f"--set: {top} is set whole and by key; give one of the two")
        if name in where and where[name] != value:
            raise BadValue(f"--set: {key} is set twice, to {where[name]!r} and {value!r}")
        where[name] = value
    return out


# roli's own model constructors: the only "package.module:function" specs a file may name without --trust-code.
ROLI_MODELS = frozenset(
    {
        "roli.models.small:small_cnn",
        "roli.models.convstem:convnext_tiny_convstem",
        "roli.models.convstem:convnext_small_convstem",
        "roli.models.convstem:convnext_base_convstem",
        "roli.models.convstem:convnext_large_convstem",
    }
)


def names_code(model) -> bool:
    """Whether a model spec names code to import and call: a "package.module:function" spec (anything with a colon
    but timm's "hf-hub:" names, which are data) that is not one of roli's own constructors. Registry and timm
    names build through their registries."""
    spec = str(model)
    return ":" in spec and not spec.startswith(HUB_PREFIXES) and spec not in ROLI_MODELS


def check_code_from_file(model, source: str, trust_code: bool) -> None:
    """A model spec read from a file (a config, a run's config.json, a grid's config) is data: a registry or timm
    name, or one of roli's own constructors; a spec that would import and call other code is refused unless
    --trust-code. Checked before anything is imported. (A spec typed on the command line runs as typed.)"""
    if names_code(model) and not trust_code:
        raise BadValue(
            f"model: {model} (from {source}) would import and run that code; a file may name registry or timm "
            "models and roli's own: pass --trust-code if you trust the file, or give --model on the command line"
        )


def _read_options(path: Path):
    """A config file's content (YAML by its suffix, else JSON), safely: YAML builds only plain data (no tags that
    construct objects); a key given twice in one mapping is an error (both readers would keep the last silently)."""
    text = path.read_text()
    if path.suffix not in (".yaml", ".yml"):
        return json.loads(text, object_pairs_hook=_unique_pairs)
    return _yaml(text) or {}


# Numbers with an exponent that YAML 1.1 (PyYAML) reads as strings: 1e-3, 5E4, 1.5e3 (it wants a dot and a signed
# exponent); YAML 1.2 and every user read them as numbers.
EXPONENT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


def _yaml(text: str):
    """YAML read as plain data (SafeLoader's constructors only; 1e-3 is a number), a key given twice in one mapping
    a ValueError."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):  # SafeLoader's constructors only
        pass

    def mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base": its keys may be overridden here
                continue
            key = loader.construct_object(key_node, deep=deep)
            try:
                twice = key in seen
            except TypeError:  # an unhashable key: construct_mapping refuses it (a YAMLError)
                continue
            if twice:
                raise ValueError(f"{key!r} is given twice (line {key_node.start_mark.line + 1})")
            seen.add(key)
        return loader.construct_mapping(node, deep)

    UniqueKeys.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    UniqueKeys.add_implicit_resolver("tag:yaml.org,2002:float", EXPONENT, list("-+0123456789."))
    return yaml.load(text, Loader=UniqueKeys)  # noqa: S506 - a SafeLoader


def _unique_pairs(pairs: list) -> dict:
    keys = [k for k, _ in pairs]
    twice = next((k for k in keys if keys.count(k) > 1), None)
    if twice is not None:
        raise ValueError(f"{twice!r} is given twice")
    return dict(pairs)


SHIPPED = Path(__file__).resolve().parent / "configs"  # roli/configs/<dataset>/<name>.yaml, in the wheel


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
        raise BadValue(
            f"config: {text} is neither a file nor a shipped setting{hint}; roli train --list-configs lists them"
        )
    raise BadValue(f"config: file not found: {text} (shipped settings by name: roli train --list-configs)")


def trainable_warmup(epochs: int, warmup: int | None = None, of: int | None = None) -> int:
    """A warmup for `epochs` epochs that leaves at least one epoch training at lr > 0: `warmup` of `of` epochs
    scaled in proportion (default: a tenth), at most epochs - 1."""
    scaled = round(warmup * epochs / of) if warmup is not None and of else max(1, epochs // 10)
    return max(0, min(epochs - 1, scaled))


def _scale_warmup(data: dict, overrides: dict) -> str | None:
    """--epochs N over a config file that sets its warmup (and no --warmup): the warmup scales in proportion
    (the shipped 10 of 20 becomes 2 of 5), leaving an epoch at lr > 0. Returns the note for the log and
    config.json."""
    if "epochs" not in overrides or "warmup" in overrides or "warmup" not in data:
        return None
    file_epochs, warmup, epochs = data.get("epochs", 20), data["warmup"], overrides["epochs"]
    if not all(is_int(v, 0) for v in (file_epochs, warmup, epochs)) or file_epochs < 1 or epochs < 1:
        return None  # bad values: the checks of the fields say what is wrong
    if epochs == file_epochs:
        return None
    data["warmup"] = trainable_warmup(epochs, warmup, file_epochs)
    return f"--epochs {epochs} over the file's {file_epochs}: its warmup {warmup} scaled to {data['warmup']}"


def _flags_over_mappings(data: dict, overrides: dict) -> None:
    """A plain flag given over a config file wins over the file's per-stage value it stands for: --lr,
    --optimizer and --weight-decay over the method's own stage (ft; also ranli for --init random), --alp-lr
    over alp.lr, --ranli-lr over ranli.lr; a non-CIFAR --dataset drops a CIFAR file's record_order. Removes
    those keys from `data`."""
    method, init = overrides.get("method", data.get("method", "roli")), overrides.get("init", data.get("init"))
    own = {"pretrain": [], "lp": [], "alp": ["alp"], "ft": ["ft"], "roli": ["ft"]}.get(method, [])
    if method == "ft" and init == "random":
        own = ["ft", "ranli"]
    pairs = [(flag, stage) for flag in ("lr", "optimizer", "weight_decay") for stage in own]
    pairs += [("alp_lr", "alp"), ("ranli_lr", "ranli")]
    kind = str(overrides.get("dataset", "")).partition(":")[0]
    if kind and kind not in ("cifar10", "cifar100") and "record_order" not in overrides:
        data.pop("record_order", None)  # a CIFAR file's TFDS order does not apply to the --dataset given over it
    for flag, stage in pairs:
        key = "lr" if flag.endswith("lr") else flag
        if overrides.get(flag) is not None and isinstance(data.get(stage), dict) and key in data[stage]:
            if stage in overrides and isinstance(overrides[stage], dict) and key in overrides[stage]:
                continue  # the flag's own per-stage form (e.g. --alp-weight-decay) already set it
            data[stage] = {k: v for k, v in data[stage].items() if k != key}


def _check_attack(name: str, kind, norm: str) -> None:
    if kind not in TRAIN_ATTACKS:
        raise BadValue(f"{name}: {kind!r} is not one of {', '.join(TRAIN_ATTACKS)}")
    if kind != "none":
        try:
            fast.check_attack(kind, norm)
        except ValueError as e:
            raise BadValue(f"{name}: {e}") from None


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
    # the PEFT method's options: PeftSpec's fields, same names and defaults (tests/test_configs.py checks both)
    lora_rank: int = PeftSpec.lora_rank
    lora_alpha: float = PeftSpec.lora_alpha
    lora_dropout: float = PeftSpec.lora_dropout
    lora_targets: str = PeftSpec.lora_targets
    adapter_reduction: int = PeftSpec.adapter_reduction
    vpt_tokens: int = PeftSpec.vpt_tokens
    vpt_dropout: float = PeftSpec.vpt_dropout
    peft_init: str = PeftSpec.peft_init
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
    # CIFAR's record order: file (the pickles'), or tfds (TensorFlow Datasets', in which the reference reads its
    # train[:45000] / train[45000:] and its test batches; the shipped CIFAR configs)
    record_order: str = "file"
    # What a run's fingerprint hashes of image files: full (every file's bytes, streamed, with its size and mtime)
    # or stat (sizes and mtimes only: for very large folders, said in the log). Array data is always hashed whole.
    data_hash: str = "full"
    # optimisation
    epochs: int = 20
    warmup: int = 10
    batch_size: int = 64
    accumulate: int = 1  # each batch as this many micro-batches (attack + backward each), one update per batch
    optimizer: str | None = None  # default: sgd for pretrain/lp/alp, adamw for ft
    lr: float | None = None  # the method's own stage (FT for ft/roli); default: STAGE_DEFAULTS
    alp_lr: float | None = None  # the ALP stage inside ft/roli (default 0.0125)
    ranli_lr: float | None = None  # the random-head FT of --compare-ranli (default 1.25e-4)
    weight_decay: float | None = None  # default: 0.01 (ALP/FT), 5e-4 (pretrain)
    momentum: float = 0.9
    # The batch size at which the per-stage mappings' learning rates (alp / ft / ranli below) hold: with another
    # --batch-size they scale linearly, as the reference's BASE_LR x BATCH/256 does (the shipped configs: 64).
    # None: no scaling. The plain flags (--lr, --alp-lr, --ranli-lr) always set the effective rate.
    lr_batch: int | None = None
    # Per-stage settings, each a mapping of STAGE_KEYS (optimizer / lr / weight_decay / epochs / warmup /
    # attack), over the flags above: the ALP stage, the finetuning stage, and the random-head (RanLI) finetuning.
    alp: dict = field(default_factory=dict)
    ft: dict = field(default_factory=dict)
    ranli: dict = field(default_factory=dict)
    # attack
    attack: str = "pgd"  # of every training stage (a stage's mapping may set its own): pgd | fgsm-rs | n-fgsm | none
    # the threat model and the PGD of training and validation (their defaults are AttackSpec's)
    norm: str = AttackSpec.norm
    eps: float | str = AttackSpec.eps
    step_size: float | str = AttackSpec.step_size
    steps: int = AttackSpec.steps
    random_start: bool = AttackSpec.random_start
    val_steps: int = AttackSpec.val_steps
    # the validation figure that picks each stage's best epoch: pgd (roli's per-example worst case over the clean
    # image and every iterate) or reference-pgd (the RoLI code's: per batch of 64, the iterate of highest mean loss)
    select_by: str = "pgd"
    autoattack: str | None = None
    n_ex: int | None = None  # the test evaluation after each stage: the first N test images (figures marked partial)
    # the catastrophic-overfitting guard of single-step training (fgsm-rs, n-fgsm): GuardSpec (roli.specs)
    guard_every: int = GuardSpec.every
    guard_drop: float = GuardSpec.drop
    guard_images: int = GuardSpec.images
    # run
    precision: str = "fp32"
    attack_precision: str | None = None  # the training attacks' (None: precision's); fp8 only here (roli.models.fp8)
    channels_last: bool = False  # conv nets: the model and the attack's images in channels_last
    compile: bool = False  # torch.compile the model used by the attack and the update
    cuda_graph: bool = False  # record the training attack's k steps in a CUDA graph (GPU)
    fold_bn: bool = True  # training attacks fold Conv -> BatchNorm pairs (eval mode: the same function)
    device: str = "auto"  # auto: cuda where a CUDA device is available, else cpu (resolved here, recorded resolved)
    seed: int = 0
    compare_ranli: bool = False
    log: list = field(default_factory=list)  # experiment tracking besides metrics.jsonl: tensorboard, wandb, csv

    def __post_init__(self):
        self._check_types()
        need(self.method in METHODS, f"method: {self.method!r} is not one of {', '.join(METHODS)}")
        need(
            self.init in ("random", "lp", "alp") or Path(self.init).suffix != "" or Path(self.init).exists(),
            f"init: {self.init!r} is not random, lp, alp or a checkpoint path",
        )
        # Each domain's values are checked where its spec is built (roli.specs); the parsed forms are kept.
        model, attack = self.model_spec, self.attack_spec
        self.mean, self.std, self.eps, self.step_size = model.mean, model.std, attack.eps, attack.step_size
        self.peft_spec, self.data_spec, self.guard_spec  # noqa: B018 - built to check them
        _check_attack("attack", self.attack, self.norm)
        need(self.attack == "none" or self.steps == 0 or self.step_size > 0, "step-size: must be > 0 for PGD")
        need(
            self.autoattack in (None, "standard", "plus", "rand"),
            f"autoattack: {self.autoattack!r} is not standard, plus or rand",
        )
        need(
            isinstance(self.log, list) and all(k in TRACKERS for k in self.log),
            f"log: {self.log!r} must list trackers out of {', '.join(TRACKERS)}",
        )
        need(
            is_int(self.accumulate, 1) and (not is_int(self.batch_size, 1) or self.accumulate <= self.batch_size),
            f"accumulate: must be an integer in [1, batch-size {self.batch_size}]; got {self.accumulate!r}",
        )
        need(self.n_ex is None or is_int(self.n_ex, 1), f"n-ex: must be an integer >= 1; got {self.n_ex!r}")
        self._check_optimisation()
        need(self.data_hash in DATA_HASH, f"data-hash: {self.data_hash!r} is not one of {', '.join(DATA_HASH)}")
        need(self.select_by in SELECT_BY, f"select-by: {self.select_by!r} is not one of {', '.join(SELECT_BY)}")
        self.device = auto_device(self.device)
        need(
            isinstance(self.device, str) and re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None,
            f"device: {self.device!r} is not cpu, cuda or cuda:N",
        )
        need(
            not self.cuda_graph or str(self.device).startswith("cuda"),
            f"cuda-graph: records the attack on a GPU and needs --device cuda; got {self.device}",
        )
        if self.attack_precision == "fp8":
            from roli.models.fp8 import fp8_supported

            ok, why = fp8_supported(self.device)
            need(ok, f"attack-precision fp8: {why}; use --attack-precision bf16")
        self._check_method_combinations()
        self.resolved()  # every stage's settings resolve (e.g. no adamw-ref without decay)

    def _check_types(self) -> None:
        for f in fields(self):  # values read from YAML/JSON: a string "false" or "no" is not a boolean
            value, name = getattr(self, f.name), f.name.replace("_", "-")
            if f.type == "bool":
                need(isinstance(value, bool), f"{name}: must be true or false; got {value!r}")
            elif f.type == "str" and f.name != "eps":
                need(isinstance(value, str) and value != "", f"{name}: must be a non-empty string; got {value!r}")
            elif f.type == "dict":
                need(isinstance(value, dict), f"{name}: must be a mapping; got {value!r}")
        need(is_int(self.seed, 0) and self.seed < 2**63, f"seed: must be an integer in [0, 2**63); got {self.seed!r}")

    def _check_optimisation(self) -> None:
        need(
            self.optimizer in (None, *OPTIMIZERS),
            f"optimizer: {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}",
        )
        need_int("epochs", self.epochs, 1)
        need_int("batch_size", self.batch_size, 1)
        if self.lr_batch is not None:
            need_int("lr_batch", self.lr_batch, 1)
        need_int("warmup", self.warmup, 0)
        need(
            self.warmup <= self.epochs,
            f"warmup: {self.warmup} warmup epochs is more than the run's {self.epochs} epochs; pass --warmup N with "
            f"N < {self.epochs} (e.g. --warmup {trainable_warmup(self.epochs)})",
        )
        for stage in ("alp", "ft", "ranli"):
            _check_stage(stage, getattr(self, stage), self.norm, self.epochs)
            d = getattr(self, stage)
            epochs, warmup = d.get("epochs", self.epochs), d.get("warmup", self.warmup)
            need(
                not (epochs == 1 and warmup >= 1),
                f"warmup: a stage of 1 epoch with warmup {warmup} trains nothing (the warmup's epoch 0 runs at lr 0): "
                "pass --warmup 0" + (f" (or {stage}.warmup 0)" if "warmup" in d or "epochs" in d else ""),
            )
        for name in ("lr", "alp_lr", "ranli_lr", "weight_decay"):
            value = getattr(self, name)
            need(
                value is None or is_number(value) and value >= 0,
                f"{name.replace('_', '-')}: must be a number >= 0; got {value!r}",
            )
        need(
            is_number(self.momentum) and 0 <= self.momentum < 1,
            f"momentum: must be a number in [0, 1); got {self.momentum!r}",
        )

    def _check_method_combinations(self) -> None:
        need(
            self.stage_name is None
            or self.method == "ft"
            and re.fullmatch(r"(RoLI|RanLI)-[\w-]+", self.stage_name) is not None
            and (self.stage_name.startswith("RanLI-") == (self.init == "random")),
            f"stage-name: {self.stage_name!r} names a --method ft stage RoLI-<peft> (from a head) or RanLI-<peft> "
            "(--init random)",
        )
        need(
            self.method != "roli" or self.init == "alp",
            f"init: --method roli finetunes from the ALP head; got --init {self.init} (a random head is RanLI: "
            "--method ft --init random, or --compare-ranli beside RoLI)",
        )
        need(
            not self.compare_ranli or self.method == "roli",
            f"compare-ranli: runs the random-head baseline beside --method roli; got --method {self.method}",
        )

    def check_flags_read(self, given: dict) -> None:
        """Options given on the command line (`given`: TrainConfig's names, the per-stage mappings included) that
        no stage of this method reads are refused, not ignored: the PEFT options and --init without a finetuning
        stage, --alp-* without an ALP stage, --ranli-* without a random-head stage."""
        kinds = set(self.resolved())
        names = [(k, f"--{k}-{sub}") for k, v in given.items() if k in ("alp", "ranli") for sub in v] + [
            (k, f"--{k}") for k in given if k not in ("alp", "ranli")
        ]
        peft = {"peft", *(f.name for f in PeftSpec.options())}
        method = f"--method {self.method}" + (f" --init {self.init}" if self.method == "ft" else "")
        for keys, read, what in (
            (peft, self.method in ("ft", "roli"), "configures the finetuning stage of --method ft and roli"),
            ({"init"}, self.method in ("ft", "roli"), "is the head that --method ft finetunes from"),
            ({"alp", "alp_lr"}, "alp" in kinds, "configures the ALP stage"),
            ({"ranli", "ranli_lr"}, "ranli" in kinds, "configures the random-head stage (--compare-ranli)"),
        ):
            unread = sorted(flag.replace("_", "-") for key, flag in names if key in keys)
            if unread and not read:
                raise BadValue(f"{unread[0][2:]}: {unread[0]} {what}; {method} has no such stage and would ignore it: "
                               "drop it")  # fmt: skip

    # -- what each domain builds from (roli.specs) ------------------------------------------------------------

    @cached_property
    def model_spec(self) -> ModelSpec:
        return ModelSpec(
            self.model,
            self.model_args,
            self.checkpoint,
            self.non_strict,
            self.ema,
            self.download,
            self.keep_source_head,
            self.pretrained,
            self.random_backbone,
            self.mean,
            self.std,
            self.input_size,
            self.interpolation,
            self.head_init,
        )

    @cached_property
    def peft_spec(self) -> PeftSpec:
        return PeftSpec(self.peft, **{f.name: getattr(self, f.name) for f in PeftSpec.options()})

    @cached_property
    def data_spec(self) -> DataSpec:
        return DataSpec(
            self.dataset,
            self.classes,
            self.image_root,
            self.val_percent,
            self.split_seed,
            self.resize,
            self.crop_size,
            self.data_interpolation,
            self.workers,
            self.record_order,
        )

    @cached_property
    def attack_spec(self) -> AttackSpec:
        return AttackSpec(
            self.norm,
            self.eps,
            self.step_size,
            self.steps,
            self.random_start,
            self.val_steps,
            self.precision,
            self.seed,
            self.fold_bn,
            self.cuda_graph,
            self.channels_last,
            self.attack_precision,
        )

    @cached_property
    def guard_spec(self) -> GuardSpec:
        return GuardSpec(self.guard_every, self.guard_drop, self.guard_images)

    @cached_property
    def batches(self) -> Batches:
        return Batches(self.batch_size, self.device, self.seed, self.data_spec.n_workers())

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> TrainConfig:
        path = Path(path)
        if not path.is_file():
            raise BadValue(f"config: file not found: {path}")
        try:
            data = _read_options(path)
        except Exception as e:  # noqa: BLE001 - any parse error
            raise BadValue(f"config: cannot parse {path}: {first_line(e)}") from None
        if not isinstance(data, dict):
            raise BadValue(f"config: {path} must hold a mapping of options")
        data = {k: v for k, v in data.items() if not str(k).startswith("_")}  # a run's records, not options
        spelled = {}
        for k in data:
            other = spelled.setdefault(str(k).replace("-", "_"), k)
            if other != k:
                raise BadValue(f"config: {path} gives {other!r} twice (also as {k!r}); keep one")
        known = {f.name for f in fields(cls)}
        unknown = sorted(k for k in data if k.replace("-", "_") not in known)
        if unknown:
            raise BadValue(f"config: unknown options in {path}: {', '.join(unknown)}")
        data = {k.replace("-", "_"): v for k, v in data.items()}
        _flags_over_mappings(data, overrides)
        note = _scale_warmup(data, overrides)
        if isinstance(overrides.get("model_args"), dict) and isinstance(data.get("model_args"), dict):
            if "model" not in overrides:  # --model-arg adds to the file's model's arguments
                overrides["model_args"] = {**data["model_args"], **overrides["model_args"]}
        for stage in ("alp", "ft", "ranli"):  # a flag sets one key of a stage's mapping, not all of it
            if isinstance(overrides.get(stage), dict) and isinstance(data.get(stage), dict):
                overrides[stage] = {**data[stage], **overrides[stage]}
        cfg = cls(**{**data, **overrides})
        cfg.notes = [note] if note else []
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)

    def inputs(self, config_file: str | None = None) -> dict[str, Path]:
        """The files and folders the run reads, by flag: checkpoint, --init head, the dataset's path, the image
        root, the config file (--overwrite must not delete them)."""
        out = {}
        if self.checkpoint:
            out["--checkpoint"] = Path(self.checkpoint).expanduser()
        if self.init not in ("random", "lp", "alp"):
            out["--init"] = Path(self.init).expanduser()
        kind, sep, arg = str(self.dataset).partition(":")
        if sep and arg:
            out["--dataset"] = Path(arg).expanduser()
        if self.image_root:
            out["--image-root"] = Path(self.image_root).expanduser()
        if config_file:
            out["--config"] = Path(config_file).expanduser()
        return out

    def record(self, data: dict | None = None) -> dict:
        """config.json: the options (what --resume and --config read back), plus records that they skip: the
        settings each stage resolved to, the data splits used, the versions and the command line."""
        import sys

        import torch

        import roli

        return {**self.to_dict(), "_resolved": self.resolved(), "_data": data or {},
                "_notes": getattr(self, "notes", []),
                "_versions": {"roli": roli.__version__, "torch": torch.__version__, "python": sys.version.split()[0]},
                "_command": [Path(sys.argv[0]).name, *sys.argv[1:]]}  # fmt: skip

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

        lr, lr_from = self._stage_lr(kind, mapping, own, legacy_lr, d["lr"])
        return StageSettings(
            optimizer=pick("optimizer", self.optimizer, d["optimizer"]),
            lr=float(lr),
            weight_decay=float(pick("weight_decay", self.weight_decay, d["weight_decay"])),
            epochs=mapping.get("epochs", self.epochs),
            warmup=mapping.get("warmup", self.warmup),
            attack=mapping.get("attack", self.attack),
            lr_from=lr_from,
        )

    def _stage_lr(self, kind: str, mapping: dict, own: bool, legacy, default: float) -> tuple[float, str]:
        """A stage's effective learning rate and where it came from. A per-stage mapping's lr (a config file's)
        holds at batch lr_batch and scales linearly to this run's batch (the reference: BASE_LR x BATCH/256);
        --lr (the method's own stage), --alp-lr, --ranli-lr and roli's defaults are effective rates as given."""
        if "lr" in mapping:
            base = float(mapping["lr"])
            if self.lr_batch is None:
                return base, f"{kind}.lr {base:g} (not scaled: no lr_batch)"
            if self.batch_size == self.lr_batch:
                return base, f"{kind}.lr {base:g} at batch {self.lr_batch} (this run's batch)"
            lr = base * self.batch_size / self.lr_batch
            return lr, f"{kind}.lr {base:g} at batch {self.lr_batch}, x {self.batch_size}/{self.lr_batch} = {lr:g}"
        if own and self.lr is not None:
            return float(self.lr), f"--lr {self.lr:g} (effective, not scaled)"
        if legacy is not None:
            return float(legacy), f"--{kind}-lr {legacy:g} (effective, not scaled)"
        return float(default), f"roli's default {default:g} for {kind} (not scaled with the batch)"

    def resolved(self) -> dict:
        """The settings every stage of this method runs with (written into config.json)."""
        kinds = {
            "pretrain": ["pretrain"],
            "lp": ["lp"],
            "alp": ["alp"],
            "roli": ["alp", "ft"],
            "ft": {"lp": ["lp", "ft"], "alp": ["alp", "ft"]}.get(self.init, ["ft"]),
        }[self.method]
        if self.method == "roli" and self.compare_ranli:
            kinds.append("ranli")
        out = {}
        for k in kinds:
            s = self.settings(k)
            name = "ranli" if k == "ft" and self.init == "random" else k
            if k == "lp" and s.optimizer == "adamw-ref":
                raise BadValue("lp.optimizer: the clean linear probe trains with sgd or adamw, not adamw-ref")
            if s.optimizer == "adamw-ref" and s.weight_decay == 0:
                raise BadValue(
                    f"{name}.optimizer: adamw-ref with weight_decay 0 is not what the reference ran "
                    "(its optimizer.py falls through to SGD, momentum 0.9, no decay); use sgd"
                )
            detail = describe_optimizer(s.optimizer, s.lr, s.weight_decay, self.momentum)
            out[name] = {**s.as_mapping(), "optimizer_detail": detail, "lr_from": s.lr_from}
        return out
