"""The shipped settings (roli/configs/<dataset>/<name>.yaml): every file validates, carries the reference's
values, and runs its stages (one optimisation step each) on generated data in its dataset's layout with
a tiny Swin substituted for ARES Swin-B. `--print-config` resolves a file without touching anything."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_SWIN
from test_data import _png, _write_cifar

from roli._compat import import_timm
from roli.config import TrainConfig
from roli.training.run import run

CONFIGS = Path(__file__).resolve().parent.parent / "roli" / "configs"
FILES = sorted(CONFIGS.glob("*/*.yaml"))
DATASETS = ("cifar10", "cifar100", "caltech256", "cub200", "stanford_dogs")
NAMES = ["alp"] + [f"{k}_{p}" for p in ("full", "lora", "adapter", "bias", "vpt") for k in ("roli", "ranli")]


def test_every_dataset_and_method_is_shipped_and_validates():
    assert {(f.parent.name, f.stem) for f in FILES} == {(d, n) for d in DATASETS for n in NAMES}
    for f in FILES:
        cfg = TrainConfig.from_file(f)
        assert cfg.model == "ares_swin_b" and cfg.model_args == {"drop_path_rate": 0.5}
        assert cfg.batch_size == 64 and cfg.steps == 7 and cfg.val_steps == 10 and abs(cfg.eps - 8 / 255) < 1e-12
        if cfg.peft == "lora":
            assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets) == (16, 16, 0.1, "qv")
        if cfg.peft == "vpt":
            assert cfg.vpt_tokens == (20 if f.parent.name == "cub200" else 10) and cfg.vpt_dropout == 0.1


def test_reference_values_resolve_per_stage():
    # CIFAR-10: ALP 0.0125 (SGD, wd 0.01), full FT 2.5e-5 from the ALP head and 1.25e-4 from a random head
    cfg = TrainConfig.from_file(CONFIGS / "cifar10" / "roli_full.yaml", compare_ranli=True)
    r = cfg.resolved()
    assert (r["alp"]["optimizer"], r["alp"]["lr"], r["alp"]["weight_decay"]) == ("sgd", 0.0125, 0.01)
    assert (r["ft"]["optimizer"], r["ft"]["lr"], r["ft"]["weight_decay"]) == ("adamw-ref", 2.5e-5, 0.01)
    assert (r["ranli"]["optimizer"], r["ranli"]["lr"]) == ("adamw-ref", 1.25e-4)
    cub = TrainConfig.from_file(CONFIGS / "cub200" / "alp.yaml").resolved()["alp"]
    assert (cub["lr"], cub["weight_decay"], cub["epochs"]) == (0.25, 0.001, 60)
    # Stanford Dogs RanLI-LoRA: the YAML's WEIGHT_DECAY 0.0001 > 0, so the reference's AdamW with 0.01 ran.
    dogs = TrainConfig.from_file(CONFIGS / "stanford_dogs" / "ranli_lora.yaml").resolved()
    assert {k: v for k, v in dogs["ranli"].items() if k not in ("optimizer_detail", "lr_from")} == {
        "optimizer": "adamw-ref",
        "lr": 0.00125,
        "weight_decay": 0.01,
        "epochs": 40,
        "warmup": 10,
        "attack": "pgd",
    }
    # a flag changes one key of a stage's mapping, not the others
    over = TrainConfig.from_file(CONFIGS / "cifar10" / "roli_full.yaml", alp={"lr": 0.5}).resolved()["alp"]
    assert (over["lr"], over["weight_decay"], over["optimizer"]) == (0.5, 0.01, "sgd")


# The reference's optimizer.py on its YAML values (DongXzz/RoLI configs/): OPTIMIZER adamw with WEIGHT_DECAY 0
# falls through to SGD (momentum 0.9, no decay); with WEIGHT_DECAY > 0 its AdamW runs with 0.01. Three shipped
# settings are of the first kind: CIFAR-100 RanLI-LoRA (BASE_LR 0.05), Caltech256 RoLI-Adapter (0.0005) and
# RoLI-Bias (0.00001); effective rates are BASE_LR x 64/256.
FALL_THROUGH = {("cifar100", "ranli_lora", "ranli"): 0.0125, ("caltech256", "roli_adapter", "ft"): 0.000125,
                ("caltech256", "roli_bias", "ft"): 2.5e-6}  # fmt: skip


def test_every_config_resolves_the_optimiser_the_reference_ran():
    seen = set()
    for f in FILES:
        cfg = TrainConfig.from_file(f)
        assert cfg.head_init == "reference", f
        for stage, s in cfg.resolved().items():
            key = (f.parent.name, f.stem, stage)
            if stage == "alp":
                assert s["optimizer"] == "sgd" and s["weight_decay"] > 0, key
            elif key in FALL_THROUGH:
                seen.add(key)
                assert (s["optimizer"], s["weight_decay"], s["lr"]) == ("sgd", 0.0, FALL_THROUGH[key]), key
            else:
                assert (s["optimizer"], s["weight_decay"]) == ("adamw-ref", 0.01), key
    assert seen == set(FALL_THROUGH)


def test_reference_adamw_groups_on_a_swin():
    """adamw-ref: torch's AdamW with eps 1e-6; every parameter named *bias* (relative_position_bias_table
    included) without decay, the rest with the stage's decay (0.01 in the shipped settings)."""
    from roli.models import apply_peft, create_classifier
    from roli.training.loop import make_optimizer, param_groups

    timm = import_timm()
    torch.manual_seed(0)
    net = timm.create_model("swin_base_patch4_window7_224", num_classes=0, **TINY_SWIN)
    model = create_classifier(net, 5, mean=None, std=None, input_size=None)
    groups = param_groups(model, 0.01, "adamw-ref")
    opt = make_optimizer(groups, "adamw-ref", 1e-4, 0.9)
    assert isinstance(opt, torch.optim.AdamW) and all(g["eps"] == 1e-6 for g in opt.param_groups)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in opt.param_groups[0]["params"]}
    plain = {names[id(p)] for p in opt.param_groups[1]["params"]}
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert plain == {n for n in names.values() if "bias" in n} and decayed == set(names.values()) - plain
    assert any("relative_position_bias_table" in n for n in plain) and "head.weight" in decayed
    assert any(n.endswith("norm1.weight") for n in decayed)  # LayerNorm weights decay (the reference's names miss)
    # Bias finetuning trains exactly those parameters (and the head)
    apply_peft(model, "bias")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == plain | {"head.weight"}


def _data(dataset: str, root: Path) -> dict:
    rng = np.random.default_rng(0)
    if dataset.startswith("cifar"):
        _write_cifar(root, dataset, rng)
        return {"dataset": f"{dataset}:{root}", "input_size": None}
    labels = {"cub200": ["001", "002", "003"], "stanford_dogs": [1, 2, 3], "caltech256": [0, 1, 2]}[dataset]
    splits = {"train": 6, "val": 2, "test": 2}
    (root / "splits").mkdir(parents=True)
    for split, per_class in splits.items():
        mapping = {}
        for label in labels:
            for i in range(per_class):
                rel = f"{label}.cls/{split}_{i}.jpg"
                _png(root / "images" / rel, rng, size=(40, 36))
                mapping[rel] = label
        (root / "splits" / f"{split}.json").write_text(json.dumps(mapping))
    return {"dataset": f"json:{root / 'splits'}", "image_root": str(root / "images"), "resize": 36, "crop_size": 32}


def _run_config(path: Path, tmp_path: Path, checkpoint: str) -> dict:
    base = TrainConfig.from_file(path)
    over = _data(path.parent.name, tmp_path / "data") | {"checkpoint": checkpoint,
        "model_args": TINY_SWIN, "epochs": 1, "warmup": 0, "steps": 1, "val_steps": 1, "autoattack": None,
        "run_dir": str(tmp_path / "run"), "workers": 0, "compare_ranli": base.method == "roli",
        "alp": {**base.alp, "epochs": 1, "warmup": 0}, "ft": {**base.ft, "epochs": 1, "warmup": 0},
        "ranli": {**base.ranli, "epochs": 1, "warmup": 0}}  # fmt: skip
    cfg = TrainConfig.from_file(path, **over)
    results = run(cfg)
    assert all(r["test"]["n"] > 0 for r in results.values())
    return results


@pytest.mark.parametrize("path", [CONFIGS / d / n for d, n in (("cifar10", "roli_lora.yaml"),
                                  ("cub200", "roli_vpt.yaml"), ("stanford_dogs", "ranli_adapter.yaml"))],
                         ids=lambda p: f"{p.parent.name}/{p.stem}")  # fmt: skip
def test_configs_run_a_step(path, tmp_path, tiny_ares):
    results = _run_config(path, tmp_path, tiny_ares)
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["_resolved"] and cfg["_versions"]["torch"]
    if path.parent.name != "cifar10":
        labels = json.loads((tmp_path / "run" / "labels.json").read_text())["classes"]
        assert len(labels) == 3 and str(labels[0]) in ("001", "1")
    assert len(results) == (3 if cfg["method"] == "roli" else 1)


@pytest.mark.slow
@pytest.mark.parametrize("path", FILES, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_config_runs_a_step(path, tmp_path, tiny_ares):
    results = _run_config(path, tmp_path, tiny_ares)
    shipped = TrainConfig.from_file(path)
    written = json.loads((tmp_path / "run" / "config.json").read_text())["_resolved"]
    for stage, settings in shipped.resolved().items():  # the paper's optimisation settings, untouched by the run
        assert {k: written[stage][k] for k in ("optimizer", "lr", "weight_decay")} == {
            k: settings[k] for k in ("optimizer", "lr", "weight_decay")}, stage  # fmt: skip
    names = {"alp": ["alp"], "roli": ["alp", f"RoLI-{shipped.peft}", f"RanLI-{shipped.peft}"]}.get(
        shipped.method, [f"ft ({shipped.peft}, init random)"])  # fmt: skip
    assert list(results) == names
    for r in results.values():  # the standard PEFT init: everything trainable can receive a gradient
        if "trainable" in r:
            assert r["trainable"]["inert"] == 0 and r["trainable"]["receiving_gradient"] > 0


def test_print_config_touches_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-m", "roli.train", "--config", str(CONFIGS / "cub200" / "roli_lora.yaml"),
                        "--dataset", "json:/nonexistent", "--run-dir", str(tmp_path / "run"), "--print-config"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["dataset"] == "json:/nonexistent" and shown["_resolved"]["ft"]["lr"] == 0.00125
    assert not (tmp_path / "run").exists()


def test_peft_options_are_declared_once():
    """A PEFT option is a field of roli.specs.PeftSpec: the trainer's config carries it under the same name and
    default, `roli train` has its flag, apply_peft takes it with the same default, grid shares ALP across it."""
    import dataclasses
    import inspect

    from roli.grid import NOT_ALP
    from roli.models.peft import apply_peft
    from roli.specs import PeftSpec
    from roli.train import build_parser

    names = [f.name for f in PeftSpec.options()]
    assert names == ["lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "adapter_reduction", "vpt_tokens",
                     "vpt_dropout", "peft_init"]  # fmt: skip
    config = {f.name: f for f in dataclasses.fields(TrainConfig)}
    keywords = inspect.signature(apply_peft).parameters
    flags = {a.dest: a for a in build_parser()._actions}
    values = {"lora_rank": 4, "lora_alpha": 2.5, "lora_dropout": 0.25, "lora_targets": "kv", "adapter_reduction": 3,
              "vpt_tokens": 7, "vpt_dropout": 0.5, "peft_init": "reference"}  # fmt: skip
    argv = [a for k, v in values.items() for a in ("--" + k.replace("_", "-"), str(v))]
    parsed = build_parser().parse_args(argv)
    for f in PeftSpec.options():
        assert config[f.name].default == f.default == keywords[f.name].default, f.name
        assert f.name in flags and f.name in NOT_ALP and getattr(parsed, f.name) == values[f.name], f.name
    spec = TrainConfig(peft="lora", **values).peft_spec
    assert (spec.method, spec.lora_rank, spec.lora_targets, spec.vpt_dropout) == ("lora", 4, "kv", 0.5)
    assert spec.peft_init == "reference"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"lora_rank": 0}, "lora-rank: must be an integer >= 1; got 0"),
        ({"adapter_reduction": 2.5}, "adapter-reduction: must be an integer >= 1; got 2.5"),
        ({"lora_targets": "qq"}, "lora-targets: 'qq' is not one of q, k, v, qk, qv, kv, qkv"),
        ({"vpt_dropout": 1.0}, r"vpt-dropout: must be in \[0, 1\); got 1.0"),
        ({"lora_alpha": "big"}, "lora-alpha: must be a number; got 'big'"),
        ({"peft_init": "paper"}, "peft-init: 'paper' is not one of standard, reference"),
    ],
)
def test_peft_options_are_checked_where_the_spec_is_built(options, message):
    from roli._cli import BadValue
    from roli.specs import PeftSpec

    with pytest.raises(BadValue, match=message):
        PeftSpec("lora", **options)


@pytest.mark.parametrize(
    "name, text, said",
    [
        ("dup.yaml", "method: lp\nlr: 0.1\nmethod: alp\n", "cannot parse {p}: 'method' is given twice (line 3)"),
        ("nested.yml", "alp:\n  lr: 1\n  lr: 2\n", "cannot parse {p}: 'lr' is given twice (line 3)"),
        ("dup.json", '{"method": "lp", "method": "alp"}', "cannot parse {p}: 'method' is given twice"),
        ("inner.json", '{"alp": {"lr": 1, "lr": 2}}', "cannot parse {p}: 'lr' is given twice"),
        ("dash.yaml", "alp_lr: 0.1\nalp-lr: 0.2\n", "{p} gives 'alp_lr' twice (also as 'alp-lr'); keep one"),
        ("list.yaml", "- lp\n- alp\n", "{p} must hold a mapping of options"),
        ("merged.yaml", "_b: &b {lr: 1}\nalp:\n  <<: *b\n  epochs: 2\n  epochs: 3\n",
         "cannot parse {p}: 'epochs' is given twice (line 5)"),
        ("code.yaml", "method: !!python/object/apply:os.system ['touch PWNED']\n",
         "cannot parse {p}: could not determine a constructor for the tag "
         "'tag:yaml.org,2002:python/object/apply:os.system'"),
        ("bytes.yaml", b"\xb7\xff\x00",
         "cannot parse {p}: 'utf-8' codec can't decode byte 0xb7 in position 0: invalid start"),
    ],
)  # fmt: skip
def test_a_config_file_says_what_is_wrong_with_it(tmp_path, monkeypatch, name, text, said):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(Exception) as e:
        TrainConfig.from_file(path)
    assert str(e.value).startswith("config: " + said.format(p=path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # nothing ran


def test_a_config_files_merge_keys_and_overrides_are_yaml_as_usual(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("_base: &b {lr: 0.5, epochs: 3}\nmethod: alp\nalp:\n  <<: *b\n  lr: 0.25\n")
    assert TrainConfig.from_file(path).alp == {"lr": 0.25, "epochs": 3}


def test_set_values_are_yaml_with_each_key_once():
    from roli._cli import BadValue
    from roli.config import parse_set_options

    assert parse_set_options(["model_args={a: 1, b: [2, 3]}", "lr=1e-3", "model=!!python/name:os.system"]) == {
        "model_args": {"a": 1, "b": [2, 3]},
        "lr": 1e-3,
        "model": "!!python/name:os.system",  # an unknown tag: the text itself, never an object
    }
    with pytest.raises(BadValue) as e:
        parse_set_options(["model_args={a: 1, a: 2}"])
    assert str(e.value) == "--set: {a: 1, a: 2}: 'a' is given twice (line 1)"


def test_numbers_with_an_exponent_are_numbers_in_config_files_and_set(tmp_path):
    import yaml

    from roli.config import parse_set_options

    path = tmp_path / "e.yaml"
    path.write_text("method: alp\nlr: 1e-3\nweight_decay: 5E-2\nalp: {lr: 1.5e-2, weight_decay: 2e-4}\n")
    cfg = TrainConfig.from_file(path)
    assert (cfg.lr, cfg.weight_decay, cfg.alp) == (0.001, 0.05, {"lr": 0.015, "weight_decay": 0.0002})
    assert parse_set_options(["lr=1e-3", "alp.lr=-2e-2", "seed=7"]) == {
        "lr": 0.001, "alp": {"lr": -0.02}, "seed": 7}  # fmt: skip
    assert parse_set_options(["model=1e-3x"]) == {"model": "1e-3x"}
    assert yaml.safe_load("1e-3") == "1e-3"  # PyYAML's own loader is left as it is


def test_find_config_files_names_and_what_it_says_otherwise(tmp_path, monkeypatch):
    from roli._cli import BadValue
    from roli.config import SHIPPED, find_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert (
        find_config("cifar10/roli_lora") == find_config("cifar10/roli_lora.yaml") == SHIPPED / "cifar10/roli_lora.yaml"
    )
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "roli_lora").write_text("method: lp\n")  # a file of that name wins over the setting
    assert find_config("cifar10/roli_lora") == Path("cifar10/roli_lora")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "mine.yaml").write_text("method: lp\n")
    assert find_config("~/mine.yaml") == tmp_path / "home" / "mine.yaml"
    names = ", ".join(sorted(NAMES))
    for text, said in (
        ("cifar100/roli_lorax", f"cifar100/roli_lorax is neither a file nor a shipped setting (cifar100 has: {names}); "
         "roli train --list-configs lists them"),
        ("cifar100/x.yaml", f"cifar100/x.yaml is neither a file nor a shipped setting (cifar100 has: {names}); "
         "roli train --list-configs lists them"),
        ("mnist/roli_lora", "mnist/roli_lora is neither a file nor a shipped setting; roli train --list-configs lists "
         "them"),
        ("nope.yaml", "file not found: nope.yaml (shipped settings by name: roli train --list-configs)"),
        ("a/b/c.yaml", "file not found: a/b/c.yaml (shipped settings by name: roli train --list-configs)"),
    ):  # fmt: skip
        with pytest.raises(BadValue) as e:
            find_config(text)
        assert str(e.value) == f"config: {said}"


@pytest.mark.parametrize(
    "data, overrides, warmup, note",
    [
        ({"epochs": 20, "warmup": 10}, {"epochs": 5}, 2, "--epochs 5 over the file's 20: its warmup 10 scaled to 2"),
        ({"warmup": 4}, {"epochs": 10}, 2, "--epochs 10 over the file's 20: its warmup 4 scaled to 2"),
        ({"epochs": 20, "warmup": 10}, {"epochs": 1}, 0, "--epochs 1 over the file's 20: its warmup 10 scaled to 0"),
        ({"epochs": 20, "warmup": 9}, {"epochs": 40}, 18, "--epochs 40 over the file's 20: its warmup 9 scaled to 18"),
        ({"epochs": 20, "warmup": 10}, {"epochs": 20}, 10, None),
        ({"epochs": 20, "warmup": 10}, {}, 10, None),
        ({"epochs": 20, "warmup": 10}, {"epochs": 5, "warmup": 3}, 10, None),
        ({"epochs": 20}, {"epochs": 5}, None, None),
        ({"epochs": 0, "warmup": 1}, {"epochs": 5}, 1, None),
        ({"epochs": 20, "warmup": "x"}, {"epochs": 5}, "x", None),
        ({"epochs": 20, "warmup": 10}, {"epochs": 0}, 10, None),
        ({"epochs": 20, "warmup": 10}, {"epochs": True}, 10, None),
    ],
)  # fmt: skip
def test_the_files_warmup_scales_with_epochs_given_over_it(data, overrides, warmup, note):
    from roli.config import _scale_warmup

    data = dict(data)
    assert _scale_warmup(data, dict(overrides)) == note
    assert data.get("warmup") == warmup


def test_set_options_parse_key_by_key_and_say_what_is_wrong():
    from roli._cli import BadValue
    from roli.config import parse_set_options

    assert parse_set_options(
        ["model=a=b", "alp-lr=0.5", "model_args.drop_path_rate=0.1", "alp.epochs=3", "alp.epochs=3", "ft.lr=1"]
    ) == {  # fmt: skip
        "model": "a=b",
        "alp_lr": 0.5,
        "model_args": {"drop_path_rate": 0.1},
        "alp": {"epochs": 3},
        "ft": {"lr": 1},
    }
    stages = ", ".join(("optimizer", "lr", "weight_decay", "epochs", "warmup", "attack"))
    for items, said in (
        (["lr"], "expected KEY=VALUE or KEY.SUBKEY=VALUE; got 'lr'"),
        (["=3"], "expected KEY=VALUE or KEY.SUBKEY=VALUE; got '=3'"),
        (["alp.=3"], "expected KEY=VALUE or KEY.SUBKEY=VALUE; got 'alp.=3'"),
        (["frob=1"], "frob is not a config option (roli train --print-config lists them)"),
        (["lr.x=1"], "lr is not a mapping; only model_args, alp, ft, ranli take KEY.SUBKEY"),
        (["alp.momentum=0.9"], f"alp.momentum: a stage's keys are {stages}"),
        (["alp=3", "alp.epochs=2"], "alp is set whole and by key; give one of the two"),
        (["alp.epochs=2", "alp={lr: 1}"], "alp is set twice, to {'epochs': 2} and {'lr': 1}"),
        (["alp.lr=1", "alp.lr=2"], "alp.lr is set twice, to 1 and 2"),
        (["seed=1", "seed=2"], "seed is set twice, to 1 and 2"),
    ):
        with pytest.raises(BadValue) as e:
            parse_set_options(items)
        assert str(e.value) == f"--set: {said}"


def test_from_file_names_unknown_options_merges_stage_flags_and_keeps_its_note(tmp_path):
    from roli._cli import BadValue

    path = tmp_path / "c.yaml"
    path.write_text("method: roli\nepochs: 20\nwarmup: 10\nalp-lr: 0.5\nalp: {epochs: 3, weight_decay: 0.1}\n"
                    "ft: {lr: 0.01, epochs: 4}\nranli: {lr: 0.02}\n")  # fmt: skip
    cfg = TrainConfig.from_file(path, epochs=5, alp={"weight_decay": 0.2}, ft={"epochs": 6}, ranli={"epochs": 7})
    assert (cfg.alp_lr, cfg.alp) == (0.5, {"epochs": 3, "weight_decay": 0.2})
    assert (cfg.ft, cfg.ranli) == ({"lr": 0.01, "epochs": 6}, {"lr": 0.02, "epochs": 7})
    assert cfg.notes == ["--epochs 5 over the file's 20: its warmup 10 scaled to 2"] and cfg.warmup == 2
    assert TrainConfig.from_file(path).notes == []
    path.write_text("method: lp\nfrob: 1\nalp-frob: 2\n_record: 3\n")
    with pytest.raises(BadValue) as e:
        TrainConfig.from_file(path)
    assert str(e.value) == f"config: unknown options in {path}: alp-frob, frob"
    with pytest.raises(BadValue) as e:
        TrainConfig.from_file(tmp_path / "absent.yaml")
    assert str(e.value) == f"config: file not found: {tmp_path / 'absent.yaml'}"


def test_model_spec_refusals_word_for_word():
    from roli._cli import BadValue
    from roli.specs import ModelSpec

    for kwargs, said in (
        ({"head_init": "xavier"}, "head-init: 'xavier' is not one of reference, torch, zero"),
        ({"interpolation": "nearest"}, "interpolation: 'nearest' is not bilinear or bicubic"),
        ({"mean": "a,b", "std": [1]}, "mean: expected comma-separated numbers, one per channel; got 'a,b'"),
        ({"mean": [0.5], "std": "x"}, "std: expected comma-separated numbers, one per channel; got 'x'"),
        ({"mean": [0.5], "std": [float("inf")]}, "std: expected finite numbers, one per channel; got [inf]"),
        ({"mean": [0.5]}, "mean: goes with std; give both or neither"),
        ({"std": [0.5]}, "std: goes with mean; give both or neither"),
        ({"mean": [0.5, 0.5], "std": [1]}, "mean, std: 2 and 1 channels differ"),
        ({"mean": [0.5], "std": [0.0]}, "std: must be > 0 per channel; got [0.0]"),
        ({"input_size": 0}, "input-size: must be an integer >= 1; got 0"),
        ({"checkpoint": " "}, "checkpoint: ' ' is not a path; give --checkpoint FILE, or leave it out"),
    ):
        with pytest.raises(BadValue) as e:
            ModelSpec("vit_tiny_patch16_224", **kwargs)
        assert str(e.value) == said
    assert ModelSpec("x", mean="0.5, 0.25", std=[1, 2]).mean == [0.5, 0.25]
    assert ModelSpec("x", input_size=1).input_size == 1
    for args, said in (
        ({"input_size": 8}, "input_size is preprocessing, not a constructor argument: use --input-size instead"),
        ({"interpolation": "bicubic"}, "interpolation is preprocessing, not a constructor argument: use "
         "--interpolation instead"),
    ):  # fmt: skip
        with pytest.raises(BadValue) as e:
            ModelSpec("vit_tiny_patch16_224", args)
        assert str(e.value) == f"model-arg: {said}"
