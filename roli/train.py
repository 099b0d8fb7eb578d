"""`python -m roli.train`: the RoLI pipeline end to end.

    python -m roli.train                                   # the built-in demonstration (digits, ~30 s)
    python -m roli.train --method pretrain --dataset digits --classes 0-4 --eps 0.1 --step-size 0.025 ...
    python -m roli.train --method roli --checkpoint robust.pt --dataset cifar10:~/data --compare-ranli
    python -m roli.train --resume runs/roli                # continue an interrupted run

Methods: pretrain (adversarial or, with --attack none, standard training from scratch), lp (clean linear
probing through the feature cache), alp (adversarial linear probing), ft (adversarial finetuning with
--peft and --init random|lp|alp|PATH), roli (ALP then FT from the best ALP model; --compare-ranli also
runs the random-head baseline). Defaults follow the reference protocol; a --config YAML/JSON file sets
any option and flags override it. Outputs in --run-dir: config.json, per stage metrics.jsonl,
best.pt, last.pt, curves.png; results.json with the final test metrics.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from roli import _dist as D
from roli._cli import BadValue, OneLineParser, parse_kwargs, prog
from roli._io import first_line
from roli.config import (
    METHODS,
    OPTIMIZERS,
    SELECT_BY,
    STAGE_DEFAULTS,
    TRACKERS,
    TRAIN_ATTACKS,
    TrainConfig,
    check_code_from_file,
    find_config,
    parse_set_options,
    shipped_configs,
)
from roli.models.classifier import HEAD_INITS
from roli.rundir import MARKER, check_as_written
from roli.specs import PeftSpec
from roli.training.loop import Interrupted, NonFiniteLoss
from roli.training.run import run


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=prog("train"), description=__doc__.strip(), argument_default=None)
    g = p.add_argument_group("run")
    g.add_argument("--method", choices=METHODS, help="pretrain | lp | alp | ft | roli (default roli)")
    g.add_argument(
        "--config",
        help="YAML or JSON file with any of these options (flags override it), or the name "
        "of a shipped setting of the paper, e.g. cifar10/roli_lora (see --list-configs)",
    )
    g.add_argument("--list-configs", action="store_true", help="list the shipped settings (--config NAME) and exit")
    g.add_argument(
        "--trust-code",
        action="store_true",
        help="run a package.module:function model named in a config file or a run's config.json even "
        "when it is not an installed package's",
    )
    g.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved settings as JSON and exit (reads no data, writes nothing)",
    )
    g.add_argument("--run-dir", help="where outputs go (default runs/roli)")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="start over in a non-empty run directory")
    g.add_argument("--seed", type=int)
    g.add_argument(
        "--log",
        action="append",
        choices=TRACKERS,
        help="also send every metrics.jsonl record to tensorboard (RUN_DIR/tensorboard), wandb (offline without "
        "network) or csv (STAGE/metrics.csv); repeatable (default: metrics.jsonl only)",
    )
    g.add_argument("--device", help="auto (default: cuda where available, else cpu), cpu, cuda or cuda:N")
    g.add_argument(
        "--precision",
        choices=["fp32", "bf16", "fp16"],
        help="bf16: autocast for attack and update (CPU and GPU); fp16: float16 autocast with torch's GradScaler "
        "for the update (GPUs without bf16: V100, T4); default fp32",
    )
    g.add_argument(
        "--attack-precision",
        choices=["fp32", "bf16", "fp16", "fp8"],
        help="the training attacks' precision (default: --precision's). fp8: their linear layers through float8 "
        "GEMMs (e4m3 forward, e5m2 gradients, dynamic scaling, weights cast once per attack), the rest in bf16; "
        "GPUs of compute capability 8.9+ (L40S, H100, H200), emulated on the CPU. Validation, test and the "
        "update keep --precision",
    )
    g.add_argument(
        "--accumulate",
        type=int,
        help="split each batch into K micro-batches (attack and backward per micro-batch, one update per batch): "
        "the same batch and learning rate with 1/K of the activation memory (default 1)",
    )
    g.add_argument("--channels-last", action="store_true", default=None, help="conv nets: channels_last memory layout")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (attack and update)")
    g.add_argument(
        "--cuda-graph",
        action="store_true",
        default=None,
        help="GPU: record the training attack's k steps in a CUDA graph and replay it",
    )
    g.add_argument(
        "--no-fold-bn",
        dest="fold_bn",
        action="store_false",
        default=None,
        help="training attacks: do not fold the Conv->BatchNorm pairs",
    )
    g = p.add_argument_group("model")
    g.add_argument(
        "--model",
        help="a published robust backbone (python -m roli.zoo), a timm name or "
        "package.module:function (default roli.models.small:small_cnn)",
    )
    g.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="constructor argument (repeatable)")
    g.add_argument("--checkpoint", help="robust backbone weights (timm, MadryLab, ARES or roli format)")
    g.add_argument(
        "--pretrained",
        action="store_true",
        default=None,
        help="timm names: start from timm's own (non-robust) weights; needs a reachable hub",
    )
    g.add_argument(
        "--random-backbone",
        action="store_true",
        default=None,
        help="lp/alp/ft/roli without --checkpoint or --pretrained: a random backbone, on purpose (refused otherwise)",
    )
    g.add_argument("--non-strict", action="store_true", help="accept missing/unexpected checkpoint keys")
    g.add_argument("--ema", action="store_true", help="load the checkpoint's EMA weights (timm CheckpointSaver files)")
    g.add_argument(
        "--download",
        action="store_true",
        help="registry backbones: fetch the file into the cache when no --checkpoint is given",
    )
    g.add_argument(
        "--keep-source-head", action="store_true", help="start from the checkpoint's classifier (same label space only)"
    )
    g.add_argument("--mean", help="per-channel mean applied inside the model, e.g. 0.485,0.456,0.406")
    g.add_argument("--std", help="per-channel std applied inside the model")
    g.add_argument("--input-size", type=int, help="resize images to this size inside the model (e.g. 224 for CIFAR)")
    g.add_argument("--interpolation", choices=["bilinear", "bicubic"], help="of that resize (default bilinear)")
    g.add_argument("--peft", help="full | linear | lora | adapter | vpt | vpt-gated | bias (finetuning)")
    g.add_argument("--init", help="head of finetuning: random | lp | alp | PATH to a roli head checkpoint")
    g.add_argument(
        "--head-init",
        choices=list(HEAD_INITS),
        help="the random head of ALP, RanLI and pretraining: reference (the RoLI code's kaiming fan_out "
        "weights, bias -log(99)), torch (nn.Linear's; the default), zero",
    )
    for f in PeftSpec.options():  # --lora-rank, ...: declared once, in roli.specs.PeftSpec
        kind = {"int": int, "float": float}.get(str(f.type), str)
        g.add_argument("--" + f.name.replace("_", "-"), type=kind, help=f.metadata["help"])
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="digits | npz:PATH | cifar10:ROOT | cifar100:ROOT | imagefolder:ROOT | json:DIR")
    g.add_argument("--classes", help="train on these classes only, relabelled, e.g. 0-4 or 1,3,5")
    g.add_argument("--image-root", help="image root of a json:DIR dataset")
    g.add_argument("--val-percent", type=float)
    g.add_argument("--split-seed", type=int)
    g.add_argument("--resize", type=int, help="file datasets: resize the shorter side to this (default 256)")
    g.add_argument("--crop-size", type=int, help="file datasets: then crop this (default 224)")
    g.add_argument("--data-interpolation", choices=["bilinear", "bicubic"], help="of that resize (default bilinear)")
    g.add_argument("--workers", type=int, help="data-loading processes (default: from the CPU count)")
    g.add_argument(
        "--data-hash",
        choices=["full", "stat"],
        help="what the run's fingerprint hashes of image files: full (their bytes, streamed; the time it took is "
        "logged) or stat (sizes and mtimes only, for very large folders; an explicit opt-out). Array data is "
        "always hashed whole (default full)",
    )
    g.add_argument(
        "--record-order",
        choices=["file", "tfds"],
        help="CIFAR: the order train[:45000] / train[45000:] and the test batches are taken in: file (the pickles', "
        "the default) or tfds (TensorFlow Datasets' record order, as the reference reads them; the shipped CIFAR "
        "configs)",
    )
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--warmup", type=int, help="warmup epochs of the warmup-cosine schedule")
    g.add_argument("--batch-size", type=int)
    g.add_argument(
        "--optimizer",
        choices=list(OPTIMIZERS),
        help="sgd (momentum); adamw (torch's, decay on weights only); adamw-ref (the RoLI reference's: "
        "eps 1e-6, no decay on parameters named *bias*)",
    )
    g.add_argument("--lr", type=float, help="learning rate of the method's stage (FT for ft/roli)")
    g.add_argument("--alp-lr", type=float, help="learning rate of the ALP stage inside ft/roli")
    g.add_argument("--alp-weight-decay", type=float, help="weight decay of the ALP stage inside ft/roli")
    g.add_argument("--alp-optimizer", choices=list(OPTIMIZERS), help="optimiser of the ALP stage (default sgd)")
    g.add_argument("--alp-epochs", type=int, help="epochs of the ALP stage inside ft/roli")
    g.add_argument("--alp-warmup", type=int, help="warmup epochs of the ALP stage inside ft/roli")
    g.add_argument("--ranli-lr", type=float, help="learning rate of the random-head baseline (--compare-ranli)")
    g.add_argument("--ranli-weight-decay", type=float, help="weight decay of the random-head baseline")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--momentum", type=float)
    g = p.add_argument_group("attack")
    g.add_argument(
        "--attack",
        choices=TRAIN_ATTACKS,
        help="training attack of every stage: pgd (PGD-k, default), fgsm-rs (step 1.25 eps), n-fgsm (noise "
        "2 eps, step eps), none (standard training)",
    )
    g.add_argument(
        "--alp-attack",
        choices=TRAIN_ATTACKS,
        help="training attack of the ALP stage inside ft/roli (default: --attack)",
    )
    g.add_argument(
        "--guard-every",
        type=int,
        help="single-step attacks: check for catastrophic overfitting every N steps (default 100; 0: off)",
    )
    g.add_argument(
        "--guard-drop",
        type=float,
        help="a drop of the guard's PGD-5 accuracy below its best by more than this is a collapse (0.2)",
    )
    g.add_argument("--guard-images", type=int, help="validation images of the guard's checks (default 128)")
    g.add_argument("--norm", choices=["linf", "l2"])
    g.add_argument("--eps", help="budget, e.g. 8/255")
    g.add_argument("--step-size", help="PGD step, e.g. 2/255")
    g.add_argument("--steps", type=int, help="PGD steps for training (default 7)")
    g.add_argument("--val-steps", type=int, help="PGD steps for validation and test (default 10)")
    g.add_argument(
        "--select-by",
        choices=list(SELECT_BY),
        help="the validation figure that picks each stage's best epoch: pgd (default: an example counts as broken "
        "if the clean image or any PGD iterate is misclassified) or reference-pgd (the RoLI code's scoring: per "
        "batch of 64, the iterate with the highest mean loss); both are recorded",
    )
    g.add_argument(
        "--no-random-start",
        dest="random_start",
        action="store_false",
        default=None,
        help="training PGD starts at the clean image instead of a random point of the ball",
    )
    g.add_argument(
        "--autoattack",
        choices=["standard", "plus", "rand", "none"],
        help="also run AutoAttack on the test set after each stage (default: none; the shipped configs: standard); "
        "none turns a config's off",
    )
    g.add_argument("--compare-ranli", action="store_true", help="with --method roli: also run the random-head baseline")
    g.add_argument(
        "--n-ex",
        type=int,
        help="the test evaluation after each stage: the first N test images only (default: all; results.json "
        "and roli report mark the figures partial)",
    )
    g.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="any config option, the value read as YAML; KEY.SUBKEY sets one key of a mapping "
        "(alp.lr=0.01, model_args.drop_path_rate=0.1); repeatable",
    )
    p.add_defaults({f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING})
    p.add_defaults(HELP_DEFAULTS)
    return p


def _stage_default(key: str) -> str:
    """A per-stage default in words, from STAGE_DEFAULTS: "ALP 0.0125, FT 2.5e-05, ..."."""
    return ", ".join(f"{kind} {d[key]}" for kind, d in STAGE_DEFAULTS.items())


# The defaults --help shows where an option's None means something (the shipped configs set their own).
HELP_DEFAULTS = {
    "lr": f"per stage: {_stage_default('lr')}",
    "weight_decay": f"per stage: {_stage_default('weight_decay')}",
    "optimizer": f"per stage: {_stage_default('optimizer')}",
    "alp_lr": STAGE_DEFAULTS["alp"]["lr"],
    "alp_weight_decay": STAGE_DEFAULTS["alp"]["weight_decay"],
    "alp_optimizer": STAGE_DEFAULTS["alp"]["optimizer"],
    "alp_epochs": "--epochs",
    "alp_warmup": "--warmup",
    "alp_attack": "--attack",
    "ranli_lr": STAGE_DEFAULTS["ranli"]["lr"],
    "ranli_weight_decay": STAGE_DEFAULTS["ranli"]["weight_decay"],
    "split_seed": "0 (CIFAR: the tail of train, unseeded)",
    "mean": "the registry's, else timm's, else none",
    "std": "the registry's, else timm's, else none",
    "input_size": "the registry's or timm's native size, else none",
    "classes": "all",
    "checkpoint": "none (a registry model: its file in the cache)",
    "workers": "from the CPU count",
    "accumulate": 1,
}


def config_from_args(args) -> tuple[TrainConfig, bool, bool]:
    skip = ("config", "resume", "overwrite", "print_config", "list_configs", "trust_code", "set", "model_arg")
    flags = {k: v for k, v in vars(args).items() if v is not None and k not in skip}
    for stage, keys in (
        ("alp", ("weight_decay", "optimizer", "epochs", "warmup", "attack")),  # --alp-lr / --ranli-lr: effective
        ("ranli", ("weight_decay",)),
    ):
        per_stage = {k: flags.pop(f"{stage}_{k}") for k in keys if f"{stage}_{k}" in flags}
        if per_stage:
            flags[stage] = per_stage
    if args.model_arg:
        flags["model_args"] = parse_kwargs(args.model_arg)
    if flags.get("autoattack") == "none":
        flags["autoattack"] = None  # over a config's: no AutoAttack
    for b in (
        "non_strict",
        "compare_ranli",
        "channels_last",
        "compile",
        "cuda_graph",
        "ema",
        "download",
        "keep_source_head",
        "pretrained",
        "random_backbone",
    ):
        if not flags.get(b):
            flags.pop(b, None)
    _merge_sets(flags, parse_set_options(args.set))
    try:
        return _config(args, flags)
    except TypeError as e:  # e.g. an option a config file names that TrainConfig does not have
        raise BadValue(f"config: {e}") from None


def _merge_sets(flags: dict, sets: dict) -> None:
    """--set's options join the flags; one option given both ways with two values is refused."""
    for key, value in sets.items():
        if isinstance(value, dict) and isinstance(flags.get(key), dict):
            clash = sorted(k for k in value if k in flags[key] and flags[key][k] != value[k])
            if clash:
                raise BadValue(f"--set: {key}.{clash[0]} is also given by a flag, with another value; give it once")
            flags[key] = {**flags[key], **value}
        elif key in flags and flags[key] != value:
            raise BadValue(f"--set: {key} is also given as --{key.replace('_', '-')}, with another value; give it once")
        else:
            flags[key] = value


# What --resume may change: how the run executes, not what it computes.
RESUMABLE = {"device", "workers", "channels_last", "compile", "cuda_graph", "download", "autoattack", "log"}


def _config(args, flags: dict) -> tuple[TrainConfig, bool, bool]:
    if args.resume:
        if Path(args.resume).is_dir() and not (Path(args.resume) / MARKER).is_file():
            raise BadValue(
                f"resume: {args.resume} was not written by roli (it has no {MARKER} marker); roli "
                "resumes only its own runs"
            )
        if not (Path(args.resume) / "config.json").is_file():
            raise BadValue(
                f"resume: {args.resume} holds no config.json (its start was killed, or it was deleted): start it "
                "again with --overwrite, or use another --run-dir"
            )
        check_as_written(  # before config.json is read: an edited one is refused, not trusted
            Path(args.resume),
            "resume",
            "put back the file roli wrote, or move it away and start over with --overwrite",
            regenerated=True,
        )
        if args.overwrite or "run_dir" in flags or args.config:
            given = [
                f
                for f, on in (
                    ("--overwrite", args.overwrite),
                    ("--run-dir", "run_dir" in flags),
                    ("--config", args.config),
                )
                if on
            ]
            raise BadValue(
                f"resume: {', '.join(given)} cannot go with --resume (it continues RUN_DIR as it was configured)"
            )
        saved = Path(args.resume) / "config.json"
        before = TrainConfig.from_file(saved, run_dir=args.resume)
        after = TrainConfig.from_file(saved, **{**flags, "run_dir": args.resume})
        changed = sorted(k for k, v in before.to_dict().items() if k not in RESUMABLE and after.to_dict()[k] != v)
        if changed:
            names = ", ".join("--" + k.replace("_", "-") for k in changed)
            raise BadValue(
                f"resume: {names} would change what the run computes; start a new run for that "
                "(--run-dir) or drop the flags"
            )
        if "model" not in flags:
            check_code_from_file(after.model, str(saved), args.trust_code)
        return after, True, False
    if args.config:
        path = find_config(args.config)
        cfg = TrainConfig.from_file(path, **flags)
        if "model" not in flags:
            check_code_from_file(cfg.model, str(path), args.trust_code)
        cfg.check_flags_read(flags)
        for note in cfg.notes:
            print(f"{prog('train')}: {note}", file=sys.stderr)
        return cfg, False, bool(args.overwrite)
    cfg = TrainConfig(**flags)
    cfg.check_flags_read(flags)
    return cfg, False, bool(args.overwrite)


def _worker_error(e: Exception) -> str:
    """The message of an error raised in a DataLoader worker (torch wraps it in a multi-line report)."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("ValueError: "):
            return line[len("ValueError: ") :]
    return lines[0] if lines else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return _demo()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list_configs:
        names = shipped_configs()
        print("\n".join(names))
        print(
            f"{len(names)} shipped settings (the paper's protocol, generated by roli/configs/make_configs.py of the "
            "source repository): "
            f"{prog('train')} --config NAME --checkpoint FILE ...",
            file=sys.stderr,
        )
        return 0
    try:
        return _main(parser, args)
    finally:
        D.shutdown()  # a gloo group left alive at exit aborts the process


def _demo() -> int:
    from roli.training.demo import run_demo

    me = prog("train")
    try:
        run_demo()
    except BadValue as e:
        print(f"{me}: error: {first_line(e)}", file=sys.stderr)
        return 2
    except Interrupted as e:  # its runs saved their state; the demonstration starts over (the source stays cached)
        print(f"{me}: the demonstration was {e}; run `{me}` again to start it over", file=sys.stderr)
        return 128 + e.signum
    except NonFiniteLoss as e:
        print(f"{me}: error: {e}", file=sys.stderr)
        return 1
    return 0


def _main(parser, args) -> int:
    me = prog("train")
    cfg = None
    try:
        cfg, resume, overwrite = config_from_args(args)
        if args.print_config:
            print(json.dumps(cfg.record(), indent=2))
            return 0
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise BadValue("device: cuda requested but no CUDA device is available")
        run(cfg, resume=resume, overwrite=overwrite, config_file=str(find_config(args.config)) if args.config else None)
    except BadValue as e:
        print(f"{me}: error: {first_line(e)}", file=sys.stderr)
        return 2
    except ValueError as e:  # a bad image found while training (decoded in a loader worker)
        cause = _worker_error(e)
        if "unreadable image" not in cause:
            raise
        print(
            f"{me}: error: dataset: {cause}; remove or replace the file (the run's state is saved at each "
            "epoch end: --resume continues)",
            file=sys.stderr,
        )
        return 2
    except Interrupted as e:
        where = args.resume or (cfg.run_dir if cfg else "RUN_DIR")
        print(f"{me}: {e}; the state is saved in {e.where}. Resume with: {me} --resume {where}", file=sys.stderr)
        return 128 + e.signum
    except NonFiniteLoss as e:
        print(f"{me}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from roli._cli import exit_with

    exit_with(main)
