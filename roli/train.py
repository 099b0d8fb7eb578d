"""`python -m roli.train`: the RoLI pipeline end to end.

    python -m roli.train                                   # the built-in demonstration (digits, ~2 min)
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
import logging
import sys
from pathlib import Path

import torch

from roli._cli import OneLineParser, parse_kwargs
from roli._io import save_json
from roli.data import ArrayData
from roli.models import apply_peft
from roli.training import dist as D
from roli.training.config import METHODS, ConfigError, TrainConfig
from roli.training.loop import Interrupted, NonFiniteLoss
from roli.training.pipeline import (
    build_model,
    check_run_dir,
    evaluate_test,
    linear_probe,
    load_init,
    load_splits,
    prepare_run_dir,
    train_stage,
)

log = logging.getLogger("roli.train")
PROG = "python -m roli.train"


def _peft(cfg: TrainConfig, model) -> None:
    apply_peft(model, cfg.peft, lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
               adapter_reduction=cfg.adapter_reduction, vpt_tokens=cfg.vpt_tokens)  # fmt: skip


def run(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Run cfg.method in cfg.run_dir; returns {stage: {"val": best, "test": metrics}}."""
    run_dir = Path(cfg.run_dir)
    D.init_from_env(cfg.device)
    if D.active() and cfg.batch_size % D.world():
        raise ConfigError(f"batch-size: {cfg.batch_size} is not divisible by the {D.world()} torchrun processes")
    check_run_dir(run_dir, resume, overwrite)  # nothing is written before every input is validated
    splits = load_splits(cfg)
    train, _, test, num_classes = splits
    in_chans = train.x.shape[1] if isinstance(train, ArrayData) else 3

    def fresh():
        torch.manual_seed(cfg.seed)
        return build_model(cfg, num_classes, in_chans)

    if cfg.method == "ft" and cfg.init not in ("random", "lp", "alp"):
        load_init(cfg, fresh(), cfg.init)  # validates the head checkpoint up front
    D.barrier()  # every rank has validated before rank 0 touches the run directory
    if D.is_main():
        prepare_run_dir(run_dir, resume, overwrite)
        save_json(cfg.to_dict(), run_dir / "config.json")
    D.barrier()
    _log_to(run_dir / "train.log")

    results = {}

    def finish(name, model, best):
        results[name] = {"val": best, "test": evaluate_test(cfg, model, test)}
        if D.is_main():
            save_json(results, run_dir / "results.json")

    m = cfg.method
    if m == "pretrain":
        model = fresh()
        apply_peft(model, "full")
        finish("pretrain", model, train_stage(cfg, "pretrain", model, splits, run_dir / "pretrain", resume))
    elif m == "lp":
        model = fresh()
        finish("lp", model, linear_probe(cfg, model, splits, run_dir / "lp"))
    elif m == "alp":
        model = fresh()
        finish("alp", model, train_stage(cfg, "alp", model, splits, run_dir / "alp", resume))
    elif m == "ft":
        model = fresh()
        if cfg.init == "lp":
            finish("lp", model, linear_probe(cfg, model, splits, run_dir / "lp"))
        elif cfg.init == "alp":
            finish("alp", model, train_stage(cfg, "alp", model, splits, run_dir / "alp", resume))
        elif cfg.init != "random":
            load_init(cfg, model, cfg.init)
        _peft(cfg, model)
        finish(f"ft ({cfg.peft}, init {Path(cfg.init).name})", model,
               train_stage(cfg, "ft", model, splits, run_dir / "ft", resume))  # fmt: skip
    else:  # roli
        model = fresh()
        finish("alp", model, train_stage(cfg, "alp", model, splits, run_dir / "alp", resume))
        _peft(cfg, model)
        finish(f"RoLI-{cfg.peft}", model, train_stage(cfg, "ft", model, splits, run_dir / "roli-ft", resume))
        if cfg.compare_ranli:
            ranli = dataclasses.replace(cfg, init="random", lr=cfg.ranli_lr)
            model = fresh()
            _peft(cfg, model)
            finish(f"RanLI-{cfg.peft}", model, train_stage(ranli, "ft", model, splits, run_dir / "ranli-ft", resume))
    if D.is_main():
        print(render(results, cfg))
    return results


def render(results: dict, cfg: TrainConfig) -> str:
    steps = f"PGD-{cfg.val_steps}"
    cols = ["stage", "val clean", f"val {steps}", "test clean", f"test {steps}"] + (
        ["AutoAttack"] if cfg.autoattack else []
    )
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    for name, r in results.items():
        v, t = r["val"], r["test"]
        cells = [
            name,
            pct(v.get("val_clean")),
            pct(v.get("val_robust")),
            pct(t["clean"]),
            pct(t[f"pgd{cfg.val_steps}"]),
        ]
        if cfg.autoattack:
            cells.append(pct(t.get("autoattack")))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _log_to(path: Path) -> None:
    root = logging.getLogger("roli")
    root.setLevel(logging.INFO if D.is_main() else logging.WARNING)  # rank-0-only logging
    if not D.is_main():
        return
    if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) for h in root.handlers):
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(console)
    for h in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        root.removeHandler(h)
        h.close()
    fh = logging.FileHandler(path)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.addHandler(fh)


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n")[0], argument_default=None)
    g = p.add_argument_group("run")
    g.add_argument("--method", choices=METHODS, help="pretrain | lp | alp | ft | roli (default roli)")
    g.add_argument("--config", help="YAML or JSON file with any of these options (flags override it)")
    g.add_argument("--run-dir", help="where outputs go (default runs/roli)")
    g.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="start over in a non-empty run directory")
    g.add_argument("--seed", type=int)
    g.add_argument("--device", help="cpu or cuda")
    g.add_argument("--precision", choices=["fp32", "bf16"], help="bf16: autocast for attack and update (CPU and GPU)")
    g.add_argument("--channels-last", action="store_true", default=None, help="conv nets: channels_last memory layout")
    g.add_argument("--compile", action="store_true", default=None, help="torch.compile the model (attack and update)")
    g.add_argument("--cuda-graph", action="store_true", default=None,
                   help="GPU: record the training attack's k steps in a CUDA graph and replay it")  # fmt: skip
    g.add_argument("--no-fold-bn", dest="fold_bn", action="store_false", default=None,
                   help="training attacks: do not fold the Conv->BatchNorm pairs")  # fmt: skip
    g = p.add_argument_group("model")
    g.add_argument("--model", help="timm name or package.module:function (default roli.models.small:small_cnn)")
    g.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="constructor argument (repeatable)")
    g.add_argument("--checkpoint", help="robust backbone weights (timm, MadryLab, ARES or roli format)")
    g.add_argument("--non-strict", action="store_true", help="accept missing/unexpected checkpoint keys")
    g.add_argument("--peft", help="full | linear | lora | adapter | vpt | bias (finetuning)")
    g.add_argument("--init", help="head of finetuning: random | lp | alp | PATH to a roli head checkpoint")
    g.add_argument("--lora-rank", type=int)
    g.add_argument("--lora-alpha", type=float)
    g.add_argument("--adapter-reduction", type=int)
    g.add_argument("--vpt-tokens", type=int)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="digits | npz:PATH | cifar10:ROOT | cifar100:ROOT | imagefolder:ROOT | json:DIR")
    g.add_argument("--classes", help="train on these classes only, relabelled, e.g. 0-4 or 1,3,5")
    g.add_argument("--image-root", help="image root of a json:DIR dataset")
    g.add_argument("--val-percent", type=float)
    g.add_argument("--split-seed", type=int)
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int)
    g.add_argument("--warmup", type=int, help="warmup epochs of the warmup-cosine schedule")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--optimizer", choices=["sgd", "adamw"])
    g.add_argument("--lr", type=float, help="learning rate of the method's stage (FT for ft/roli)")
    g.add_argument("--alp-lr", type=float, help="learning rate of the ALP stage inside ft/roli")
    g.add_argument("--ranli-lr", type=float, help="learning rate of the random-head baseline (--compare-ranli)")
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--momentum", type=float)
    g = p.add_argument_group("attack")
    g.add_argument("--attack", choices=["pgd", "none"], help="training attack (none: standard training)")
    g.add_argument("--norm", choices=["linf", "l2"])
    g.add_argument("--eps", help="budget, e.g. 8/255")
    g.add_argument("--step-size", help="PGD step, e.g. 2/255")
    g.add_argument("--steps", type=int, help="PGD steps for training (default 7)")
    g.add_argument("--val-steps", type=int, help="PGD steps for validation and test (default 10)")
    g.add_argument("--no-random-start", dest="random_start", action="store_false", default=None,
                   help="training PGD starts at the clean image instead of a random point of the ball")  # fmt: skip
    g.add_argument("--autoattack", choices=["standard", "plus", "rand"], help="also run AutoAttack on the test set")
    g.add_argument("--compare-ranli", action="store_true", help="with --method roli: also run the random-head baseline")
    return p


def config_from_args(args) -> tuple[TrainConfig, bool, bool]:
    flags = {k: v for k, v in vars(args).items() if v is not None and k not in ("config", "resume", "overwrite")}
    flags.pop("model_arg", None)
    if args.model_arg:
        flags["model_args"] = parse_kwargs(args.model_arg)
    for b in ("non_strict", "compare_ranli", "channels_last", "compile", "cuda_graph"):
        if not flags.get(b):
            flags.pop(b, None)
    try:
        return _config(args, flags)
    except TypeError as e:  # e.g. an option a config file names that TrainConfig does not have
        raise ConfigError(f"config: {e}") from None


def _config(args, flags: dict) -> tuple[TrainConfig, bool, bool]:
    if args.resume:
        saved = Path(args.resume) / "config.json"
        if not saved.is_file():
            raise ConfigError(f"resume: {args.resume} holds no config.json: not a roli run directory")
        flags["run_dir"] = args.resume
        return TrainConfig.from_file(saved, **flags), True, False
    if args.config:
        return TrainConfig.from_file(args.config, **flags), False, bool(args.overwrite)
    return TrainConfig(**flags), False, bool(args.overwrite)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        from roli.training.demo import run_demo

        run_demo()
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _main(parser, args)
    finally:
        D.shutdown()  # a gloo group left alive at exit aborts the process


def _main(parser, args) -> int:
    cfg = None
    try:
        cfg, resume, overwrite = config_from_args(args)
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError("device: cuda requested but no CUDA device is available")
        run(cfg, resume=resume, overwrite=overwrite)
    except ConfigError as e:
        print(f"{PROG}: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except Interrupted as e:
        where = args.resume or (cfg.run_dir if cfg else "RUN_DIR")
        print(f"{PROG}: {e}; the state is saved in {e.where}. Resume with: {PROG} --resume {where}", file=sys.stderr)
        return 128 + e.signum
    except NonFiniteLoss as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
