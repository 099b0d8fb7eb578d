"""What a run builds, one small frozen spec per domain: the model (ModelSpec -> `build`), the data (DataSpec ->
`load`, class subsetting included), the PEFT method (PeftSpec -> `apply`), the attacks (AttackSpec -> the
training attack of a stage, and its label) and the batches (Batches -> loaders).

Each spec checks its own values when it is built, in one line naming the option (BadValue: exit code 2). The
trainer's TrainConfig (roli.config) composes them from its flat options (config.json stays flat, so runs of
any roli version read back); `roli evaluate --run` rebuilds a run's model and data from the same specs, and
nothing here depends on the trainer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field

import torch

from roli import _dist as D
from roli._amp import ATTACK_PRECISIONS, PRECISIONS
from roli._cli import BadValue, parse_budget
from roli._io import first_line
from roli.models.registry import HUB_PREFIXES, lookup
from roli.seeds import derive_seed

log = logging.getLogger("roli.train")


def need(cond: bool, message: str) -> None:
    if not cond:
        raise BadValue(message)


def is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def need_int(name: str, value, low: int) -> None:
    need(is_int(value, low), f"{name.replace('_', '-')}: must be an integer >= {low}; got {value!r}")


def channels(value, name: str) -> list[float] | None:
    """Per-channel statistics from a list or "0.485,0.456,0.406"."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else value
    try:
        out = [float(v) for v in items]
    except (TypeError, ValueError):
        raise BadValue(f"{name}: expected comma-separated numbers, one per channel; got {value!r}") from None
    need(
        bool(out) and all(math.isfinite(v) for v in out),
        f"{name}: expected finite numbers, one per channel; got {value!r}",
    )
    return out


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
        raise BadValue(f"classes: {text!r} is not a list like 0-4 or 1,3,5") from None
    need(
        bool(out) and len(set(out)) == len(out) and min(out) >= 0, f"classes: {text!r} must name distinct classes >= 0"
    )
    return out


# -- the model ---------------------------------------------------------------------------------------------------


TIMM_WEIGHT_ARGS = {  # timm.create_model's arguments that would load weights the run does not record, or no backbone
    "pretrained": "would load timm's weights without the run recording them: drop it and use --pretrained",
    "pretrained_cfg": "would choose weights for timm to load without the run recording them: drop it and use "
    "--checkpoint FILE or --pretrained",
    "pretrained_cfg_overlay": "would choose weights for timm to load without the run recording them: drop it and use "
    "--checkpoint FILE or --pretrained",
    "checkpoint_path": "would make timm load a file without the run recording it: drop it and use --checkpoint FILE",
    "features_only": "would make timm return feature maps, not a backbone a head goes on: drop it",
}
OWN_ARGS = {  # constructor arguments roli sets itself
    "num_classes": "is set by roli (the backbone is built without a classifier; the head's classes come from the "
    "data): drop it",
    "in_chans": "is set by roli (from the data's channels): drop it",
    **TIMM_WEIGHT_ARGS,
}


@dataclass(frozen=True)
class ModelSpec:
    """A classifier: architecture (`name`: a registry backbone, a timm name or package.module:function, with
    constructor `args`), its weights, the preprocessing inside it, and the head it starts from."""

    name: str
    args: dict = field(default_factory=dict)
    checkpoint: str | None = None
    non_strict: bool = False
    ema: bool = False
    download: bool = False
    keep_source_head: bool = False
    pretrained: bool = False
    random_backbone: bool = False
    mean: list | None = None
    std: list | None = None
    input_size: int | None = None
    interpolation: str = "bilinear"
    head_init: str = "torch"

    def __post_init__(self):
        from roli.models.classifier import HEAD_INITS

        need(
            self.checkpoint is None or isinstance(self.checkpoint, str) and self.checkpoint.strip() != "",
            f"checkpoint: {self.checkpoint!r} is not a path; give --checkpoint FILE, or leave it out",
        )

        need(self.head_init in HEAD_INITS, f"head-init: {self.head_init!r} is not one of {', '.join(HEAD_INITS)}")
        need(
            self.interpolation in ("bilinear", "bicubic"),
            f"interpolation: {self.interpolation!r} is not bilinear or bicubic",
        )
        mean, std = channels(self.mean, "mean"), channels(self.std, "std")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        given, missing = ("std", "mean") if mean is None else ("mean", "std")
        need((mean is None) == (std is None), f"{given}: goes with {missing}; give both or neither")
        need(
            mean is None or len(mean) == len(std), f"mean, std: {len(mean or [])} and {len(std or [])} channels differ"
        )
        need(std is None or all(v > 0 for v in std), f"std: must be > 0 per channel; got {std}")
        need(
            self.input_size is None or is_int(self.input_size, 1),
            f"input-size: must be an integer >= 1; got {self.input_size!r}",
        )
        for key, why in OWN_ARGS.items():
            factory = ":" in self.name and not self.name.startswith(HUB_PREFIXES)  # a user's function: its own args
            need(key not in self.args or factory and key in TIMM_WEIGHT_ARGS, f"model-arg: {key} {why}")
        moved = sorted(set(self.args) & {"mean", "std", "input_size", "interpolation"})
        need(
            not moved,
            f"model-arg: {', '.join(moved)} is preprocessing, not a constructor argument: use "
            f"--{moved[0].replace('_', '-')} instead"
            if moved
            else "",
        )

    def weights(self) -> str | None:
        """The backbone's weights: the checkpoint, or a registry backbone's file in the cache."""
        from roli.models import resolve_checkpoint

        entry = lookup(self.name)
        if entry is not None and not self.checkpoint and (self.random_backbone or self.pretrained):
            # a registry name with --random-backbone / --pretrained: its architecture, without the publisher's file
            need(
                not self.pretrained or ":" not in entry.arch,
                f"pretrained: {entry.name} is built by {entry.arch}, which has no timm weights; give --checkpoint "
                "FILE or --random-backbone",
            )
            return None
        try:
            return resolve_checkpoint(self.name, self.checkpoint, self.download)
        except ValueError as e:
            raise BadValue(f"checkpoint: {e}") from None

    def _without_file(self, weights: str | None) -> str:
        """What a registry backbone is built with when its published file is not given (--random-backbone,
        --pretrained), for the log; else ""."""
        entry = lookup(self.name)
        if entry is None or weights or not (self.random_backbone or self.pretrained):
            return ""
        what = "random weights" if self.random_backbone else "timm's own (standard, non-robust) weights"
        return (f" (its architecture {entry.arch} with {what}, not the published robust ones: for those give "
                f"--checkpoint {entry.filename})")  # fmt: skip

    def check_weights(self, method: str, weights: str | None) -> None:
        """Transfer learning from a random backbone is refused unless random_backbone says it is meant."""
        need(
            not self.ema or weights is not None,
            "ema: loads a checkpoint's EMA weights; give --checkpoint FILE (a timm CheckpointSaver file)",
        )
        if method == "pretrain":  # trains the backbone itself: from scratch or from the weights given
            return
        need(
            weights is not None or self.pretrained or self.random_backbone,
            f"model: --method {method} would transfer from a random backbone ({self.name} has no weights): give "
            "--checkpoint FILE (a robust backbone; roli zoo lists published ones), --pretrained (timm's own "
            "weights) or --random-backbone if that is meant",
        )
        need(
            not (self.random_backbone and (weights or self.pretrained)),
            "random-backbone: cannot go with --checkpoint or --pretrained (they give the weights)",
        )
        need(
            not (self.pretrained and ":" in self.name and not self.name.startswith(HUB_PREFIXES)),
            f"pretrained: timm's own weights exist for timm names only, not {self.name}; give --checkpoint FILE",
        )

    def _create(self, num_classes: int, in_chans: int):
        """The classifier with this spec's architecture and preprocessing (timm's weights with pretrained)."""
        from roli.models import create_classifier

        pre = {"mean": self.mean if self.mean is not None else "auto",
               "std": self.std if self.std is not None else "auto", "input_size": self.input_size or "auto",
               "interpolation": self.interpolation}  # fmt: skip
        name, args, entry = self.name, self.args, lookup(self.name)
        if entry is not None and self.pretrained and not self.checkpoint:  # timm's weights: timm's preprocessing
            name, args = entry.arch, {**entry.arch_args, **self.args}
        try:
            extra = {"pretrained": True} if self.pretrained else {}
            return create_classifier(name, num_classes, in_chans=in_chans, **pre, **extra, **args)
        except (ValueError, TypeError, RuntimeError) as e:  # RuntimeError: e.g. a negative width in --model-arg
            raise BadValue(f"model: {first_line(e)}") from None

    def _load(self, model, weights: str, keep_head: bool):
        """`weights` loaded into `model` (its classifier too where keep_head and the shapes fit); refused where
        the file holds NaN/inf. Returns load_pretrained's report."""
        from roli.models import load_pretrained

        try:
            report = load_pretrained(model, weights, strict=not self.non_strict, keep_head=keep_head, ema=self.ema)
        except ValueError as e:
            raise BadValue(f"checkpoint: {e}") from None
        bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
        need(
            not bad,
            f"checkpoint: {weights} holds non-finite values (NaN/inf) in {len(bad)} tensor(s), e.g. "
            f"{bad[0] if bad else ''}; use another file",
        )
        return report

    def build(self, num_classes: int, in_chans: int, device, weights: str | None = None, quiet: bool = False):
        """The classifier with the backbone's `weights` and a fresh random head (the checkpoint's classifier
        only with keep_source_head); the log says which head it starts from. For training."""
        from roli.models import init_head

        model = self._create(num_classes, in_chans)
        head = None  # the checkpoint's classifier, where keep_source_head loaded it
        if weights:
            report = self._load(model, weights, keep_head=self.keep_source_head)
            if not quiet:
                log.info("checkpoint: %s", report)
            if report.head_loaded:
                head = "the checkpoint's classifier (--keep-source-head)"
            else:
                need(
                    not self.keep_source_head,
                    f"keep-source-head: the checkpoint has no classifier for {num_classes} classes ({report.head})",
                )
        else:
            need(not self.keep_source_head, "keep-source-head: needs a --checkpoint whose classifier to keep")
        if head is None:
            if self.head_init != "torch":  # create_classifier's head is already nn.Linear's own init
                init_head(model.head, self.head_init)
            head = f"a fresh random head (head init: {self.head_init})"
        if not quiet:
            log.info("model: %s%s, starting from %s", model.name, self._without_file(weights), head)
        return model.to(device)

    def build_trained(self, num_classes: int, in_chans: int, device, say=print):
        """The classifier as it was trained or published, for evaluation: the checkpoint's weights with its
        classifier; or, for a module without a classifier of its own that returns num_classes outputs, those
        outputs as the logits; or timm's own (pretrained). Refused where nothing supplies a classifier: a
        random head would report chance accuracy. `say` prints what was loaded."""
        model = self._create(num_classes, in_chans)
        weights = self.weights()
        report = self._load(model, weights, keep_head=True) if weights else None
        if report is not None:
            say(f"checkpoint: {report}")
        has_head = report is not None and report.head_loaded
        if not has_head and model.classifier_key is None and model.feat_dim == num_classes:
            # Its outputs are the logits, so the whole module is the classifier (an identity head, exact in any
            # precision).
            with torch.no_grad():
                model.head.weight.copy_(torch.eye(num_classes))
                model.head.bias.zero_()
            has_head = True
            say(f"classifier: {self.name} returns {num_classes} outputs: evaluated as the whole classifier")
        need(
            has_head or self.pretrained,
            f"checkpoint: nothing supplies a classifier for {num_classes} classes "
            f"({report.head if report else 'no --checkpoint'}): evaluate a checkpoint that holds one (a roli "
            "run's best.pt, a model trained on these labels), or set --num-classes to its class count",
        )
        return model.to(device)


# -- PEFT --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PeftSpec:
    """A parameter-efficient finetuning method and its options (roli.models.peft's apply_peft keywords).

    The options are declared here once: each field's metadata (help, and its bounds or choices) gives the
    check below, `roli train`'s flag (--lora-rank, ...) and, with TrainConfig's field of the same name and
    default (tests/test_configs.py checks the two agree), the run's config.json key."""

    method: str = "full"
    lora_rank: int = field(default=16, metadata={"help": "LoRA's rank", "min": 1})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA's scale numerator (scale alpha/rank)"})
    lora_dropout: float = field(
        default=0.0, metadata={"help": "dropout on LoRA's input (reference: 0.1)", "unit": True}
    )
    lora_targets: str = field(
        default="qv",
        metadata={
            "help": "which of q, k, v get LoRA (qv: the paper)",
            "choices": ("q", "k", "v", "qk", "qv", "kv", "qkv"),
        },
    )
    adapter_reduction: int = field(
        default=8, metadata={"help": "the Adapter's bottleneck: width / reduction", "min": 1}
    )
    vpt_tokens: int = field(default=10, metadata={"help": "prompt tokens per block (VPT-deep)", "min": 1})
    vpt_dropout: float = field(default=0.0, metadata={"help": "dropout on the prompts (reference: 0.1)", "unit": True})
    peft_init: str = field(
        default="standard",
        metadata={
            "help": "standard (LoRA A random, B zero; Adapter down random, up zero: the methods as named) or "
            "reference (the RoLI code's inits: Swin RoLI-LoRA A = B = 0, Adapters all zero: the paper's "
            "nearly head-only rows)",
            "choices": ("standard", "reference"),
        },
    )

    @staticmethod
    def options() -> list[dataclasses.Field]:
        """The methods' options (every field but `method`), in declaration order."""
        return [f for f in dataclasses.fields(PeftSpec) if f.name != "method"]

    def __post_init__(self):
        from roli.models.peft import METHODS

        need(self.method in METHODS, f"peft: {self.method!r} is not one of {', '.join(METHODS)}")
        for f in self.options():
            value, flag, meta = getattr(self, f.name), f.name.replace("_", "-"), f.metadata
            if "min" in meta:
                need_int(f.name, value, meta["min"])
            elif "choices" in meta:
                need(
                    isinstance(value, str) and value in meta["choices"],
                    f"{flag}: {value!r} is not one of {', '.join(meta['choices'])}",
                )
            else:
                need(is_number(value), f"{flag}: must be a number; got {value!r}")
                need(not meta.get("unit") or 0 <= value < 1, f"{flag}: must be in [0, 1); got {value}")

    def apply(self, model, role: str = "roli") -> None:
        """This method on `model` (its trainable parameters set) for a finetuning stage of `role` (roli: from a
        trained head; ranli: from a random head; the reference inits differ); a misfit is a one-line BadValue."""
        from roli.models import apply_peft

        options = {f.name: getattr(self, f.name) for f in self.options()}
        try:
            apply_peft(model, self.method, role=role, **options)
        except (ValueError, TypeError) as e:
            raise BadValue(f"peft: {first_line(e)}") from None


# -- data --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    """A dataset (roli.data.load_dataset's spec), its validation split, a class subset relabelled 0..k-1, and
    the file datasets' resize/crop and loading processes."""

    dataset: str = "digits"
    classes: str | None = None
    image_root: str | None = None
    val_percent: float = 10.0
    split_seed: int | None = None
    resize: int = 256
    crop_size: int = 224
    interpolation: str = "bilinear"
    workers: int | None = None
    record_order: str = "file"  # CIFAR: file (the pickles') or tfds (TensorFlow Datasets', as the reference reads)

    def __post_init__(self):
        need(
            is_number(self.val_percent) and 0 < self.val_percent < 100,
            f"val-percent: must be a number in (0, 100); got {self.val_percent!r}",
        )
        need(
            self.split_seed is None or is_int(self.split_seed, 0) and self.split_seed < 2**63,
            f"split-seed: must be an integer in [0, 2**63); got {self.split_seed!r}",
        )
        classes = parse_classes(self.classes)
        need(
            classes is None or len(classes) >= 2,
            f"classes: {self.classes!r} names one class; a classifier needs at least two",
        )
        need(
            self.interpolation in ("bilinear", "bicubic"),
            f"data-interpolation: {self.interpolation!r} is not bilinear or bicubic",
        )
        need_int("resize", self.resize, 1)
        need_int("crop_size", self.crop_size, 1)
        need(self.crop_size <= self.resize, f"crop-size: {self.crop_size} is larger than resize {self.resize}")
        need(self.workers is None or is_int(self.workers, 0), f"workers: must be an integer >= 0; got {self.workers!r}")
        need(self.record_order in ("file", "tfds"), f"record-order: {self.record_order!r} is not file or tfds")
        kind = str(self.dataset).partition(":")[0]
        need(
            self.record_order == "file" or kind in ("cifar10", "cifar100"),
            f"record-order: tfds (TensorFlow Datasets' record order) applies to cifar10: and cifar100: datasets, "
            f"not {kind}",
        )

    def n_workers(self) -> int:
        """Data-loading processes of file datasets: `workers`, else up to 8 from the CPUs (per rank)."""
        if self.workers is not None:
            return self.workers
        return max(1, min(8, (os.cpu_count() or 2) // max(1, D.world()) - 1))

    def load(self):
        """(train, val, test, num_classes), restricted to `classes` (relabelled 0..k-1) when given; the
        validation split records how it was split off (`origin`)."""
        from roli.data import load_dataset

        try:
            s = load_dataset(
                self.dataset,
                val_percent=self.val_percent,
                split_seed=self.split_seed,
                image_root=self.image_root,
                resize=self.resize,
                crop_size=self.crop_size,
                interpolation=self.interpolation,
                record_order=self.record_order,
            )
        except ValueError as e:
            raise BadValue(f"dataset: {e}") from None
        need(
            s.train is not None and s.test is not None,
            f"dataset: {self.dataset} needs train and test splits for training",
        )
        for name, d in (("val", s.val), ("test", s.test)):
            shape, train_shape = d.image_shape() if d is not None else None, s.train.image_shape()
            need(
                shape is None or train_shape is None or shape == train_shape,
                f"dataset: {self.dataset}: the {name} images are {shape} (CHW), the train images {train_shape}; "
                "every split needs one size",
            )
        classes = parse_classes(self.classes)
        if classes is None:
            distinct = torch.unique(s.train.y)
            need(
                len(distinct) >= 2,
                f"dataset: {self.dataset}: every training label is {distinct.tolist()}; a "
                "classifier needs at least two classes",
            )
            need(
                s.num_classes >= 2,
                f"dataset: {self.dataset} has {s.num_classes} class; a classifier needs at least two",
            )
            s.val.origin = s.val_split  # how validation was split off (recorded in config.json)
            return self._nonempty(s.train, s.val, s.test, s.num_classes)
        need(
            max(classes) < s.num_classes,
            f"classes: {self.classes} names a class >= {s.num_classes} (the dataset's count)",
        )
        val = s.val.select_classes(classes)
        val.origin = s.val_split
        return self._nonempty(s.train.select_classes(classes), val, s.test.select_classes(classes), len(classes))

    def _nonempty(self, train, val, test, num_classes):
        """Every split has an image: an empty one would train nothing or report 0.00% of nothing."""
        subset = f" for --classes {self.classes}" if self.classes else ""
        for name, d in (("train", train), ("validation", val), ("test", test)):
            need(len(d) > 0, f"dataset: {self.dataset}: the {name} split is empty{subset}; every split needs images")
        return train, val, test, num_classes


@dataclass(frozen=True)
class Batches:
    """How a run batches its data: the global batch size (split over torchrun ranks for training), the
    device the batches go to, the shuffling seed and the loading processes of file datasets."""

    batch_size: int
    device: str
    seed: int
    workers: int

    def train(self, data, shuffle: bool = True):
        """Per-rank batches under torchrun (the global batch stays batch_size); the whole set otherwise."""
        if D.active() and shuffle:
            return data.loader(
                self.batch_size // D.world(),
                shuffle=True,
                device=self.device,
                seed=self.seed,
                rank=D.rank(),
                world=D.world(),
                workers=self.workers,
            )
        return data.loader(self.batch_size, shuffle=shuffle, device=self.device, seed=self.seed, workers=self.workers)

    def eval(self, data, batch_size: int = 256) -> EvalBatches:
        """Batches of a validation or test set, sharded over torchrun ranks by batch (D.shard)."""
        size = min(batch_size, 4 * self.batch_size) if data.streamed else batch_size
        n = len(data)
        total = -(-n // size)
        ids = list(D.shard(total))
        if D.active():
            parts = [torch.arange(i * size, min(n, (i + 1) * size)) for i in ids]
            data = data.subset(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long))
        return EvalBatches(data.loader(size, device=self.device, workers=self.workers), ids, total)


class EvalBatches:
    """Batches of a validation or test set streamed to the device (never held there whole), and `ids`, their
    indices among the set's batches. Under torchrun each rank takes every world-th batch (D.shard): the
    batches, and the per-batch attack seeds, are those of one process, so reduced results equal its own."""

    def __init__(self, loader, ids: list[int], total: int):
        self.loader, self.ids, self.total = loader, ids, total  # total: the batches of the whole set

    def __iter__(self):
        return iter(self.loader)

    def __len__(self):
        return len(self.ids)


# -- attacks -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GuardSpec:
    """The catastrophic-overfitting guard of single-step training (roli.training.guard): every `every` steps
    and at each epoch end, PGD-5 accuracy on a fixed batch of `images` validation images; a drop of more than
    `drop` below the best check while the single-step accuracy rises restores the last good state and goes
    on with PGD. every=0 switches it off."""

    every: int = 100
    drop: float = 0.2
    images: int = 128

    def __post_init__(self):
        need_int("guard_every", self.every, 0)
        need_int("guard_images", self.images, 1)
        need(is_number(self.drop) and 0 < self.drop < 1, f"guard-drop: must be a fraction in (0, 1); got {self.drop!r}")

    def watches(self, kind: str) -> bool:
        """Whether a stage trained with attack `kind` gets the guard: the single-step attacks, when on."""
        from roli.attacks.fast import SINGLE_STEP

        return self.every > 0 and kind in SINGLE_STEP


@dataclass(frozen=True)
class AttackSpec:
    """The threat model (norm, eps) and the attacks of a run: the training attack of each stage (pgd with
    `steps` steps of `step_size`, fgsm-rs, n-fgsm, none), PGD-`val_steps` for validation and test."""

    norm: str = "linf"
    eps: float | str = "8/255"
    step_size: float | str = "2/255"
    steps: int = 7
    random_start: bool = True
    val_steps: int = 10
    precision: str = "fp32"
    seed: int = 0
    fold_bn: bool = True
    cuda_graph: bool = False
    channels_last: bool = False
    attack_precision: str | None = None  # the training attacks' (None: precision's); validation and test: precision

    def __post_init__(self):
        need(self.norm in ("linf", "l2"), f"norm: {self.norm!r} is not linf or l2")
        need(self.precision in PRECISIONS, f"precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        need(
            self.attack_precision in (None, *ATTACK_PRECISIONS),
            f"attack-precision: {self.attack_precision!r} is not one of {', '.join(ATTACK_PRECISIONS)}",
        )
        need_int("steps", self.steps, 0)
        need_int("val_steps", self.val_steps, 1)
        object.__setattr__(self, "eps", parse_budget(self.eps, "eps", self.norm))
        object.__setattr__(self, "step_size", parse_budget(self.step_size, "step-size"))

    @property
    def training_precision(self) -> str:
        """The training attacks' precision: attack_precision where given, else the run's."""
        return self.attack_precision or self.precision

    def clean(self, kind: str) -> bool:
        """A stage of attack `kind` trains on clean images: none, or PGD with 0 steps."""
        return kind == "none" or (kind == "pgd" and self.steps == 0)

    def label(self, kind: str) -> str:
        from roli.attacks.fast import label

        return "clean" if self.clean(kind) else label(kind, self.steps)

    def training(self, kind: str, net, purpose: str = "training attack"):
        """The training attack `kind` on `net`, checked at the loop's synchronisation points (deferred); None
        trains on clean images. Each torchrun rank draws its own random starts."""
        from roli.attacks.fast import training_attack

        if self.clean(kind):
            return None
        attack = training_attack(
            kind,
            net,
            self.eps,
            self.step_size,
            self.steps,
            self.norm,
            random_start=self.random_start,
            precision=self.training_precision,
            seed=derive_seed(self.seed, purpose, rank=D.rank()),
            memory_format="channels_last" if self.channels_last else "auto",
            fold_bn=self.fold_bn,
            cuda_graph=self.cuda_graph,
            deferred=True,
        )
        return attack

    def evaluation(self, autoattack: str | None = None):
        """Validation and test (roli.attacks.evaluation.Evaluation): PGD-`val_steps` of `step_size` (the best
        iterate, early stop) with the run's seed, and AutoAttack `autoattack` ("standard", ...) if asked."""
        from roli.attacks.evaluation import Evaluation

        return Evaluation(
            self.eps,
            self.step_size,
            self.val_steps,
            norm=self.norm,
            precision=self.precision,
            seed=self.seed,
            autoattack=autoattack,
        )

    def single_step(self, kind: str, net):
        """The guard's own copy of a single-step training attack: its own seed, never the training's draws."""
        from roli.attacks.fast import training_attack

        seed = derive_seed(self.seed, "guard single-step")
        return training_attack(kind, net, self.eps, precision=self.training_precision, seed=seed, fold_bn=self.fold_bn)
