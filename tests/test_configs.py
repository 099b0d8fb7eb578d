"""The shipped settings (configs/<dataset>/<name>.yaml): every file validates, carries the reference's
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
from test_data import _png, _write_cifar

from roli._compat import import_timm
from roli.training.config import TrainConfig
from roli.training.run import run

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
FILES = sorted(CONFIGS.glob("*/*.yaml"))
DATASETS = ("cifar10", "cifar100", "caltech256", "cub200", "stanford_dogs")
NAMES = ["alp"] + [f"{k}_{p}" for p in ("full", "lora", "adapter", "bias", "vpt") for k in ("roli", "ranli")]
TINY_SWIN = {"drop_path_rate": 0.5, "embed_dim": 8, "depths": [1, 1], "num_heads": [1, 2], "img_size": 32,
             "window_size": 4}  # fmt: skip


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
    assert (r["ft"]["optimizer"], r["ft"]["lr"]) == ("adamw", 2.5e-5)
    assert (r["ranli"]["optimizer"], r["ranli"]["lr"]) == ("adamw", 1.25e-4)
    cub = TrainConfig.from_file(CONFIGS / "cub200" / "alp.yaml").resolved()["alp"]
    assert (cub["lr"], cub["weight_decay"], cub["epochs"]) == (0.25, 0.001, 60)
    dogs = TrainConfig.from_file(CONFIGS / "stanford_dogs" / "ranli_lora.yaml").resolved()
    assert dogs == {"ranli": {"optimizer": "adamw", "lr": 0.00125, "weight_decay": 0.0001, "epochs": 40, "warmup": 10,
                               "attack": "pgd"}}  # fmt: skip
    # a flag changes one key of a stage's mapping, not the others
    over = TrainConfig.from_file(CONFIGS / "cifar10" / "roli_full.yaml", alp={"lr": 0.5}).resolved()["alp"]
    assert (over["lr"], over["weight_decay"], over["optimizer"]) == (0.5, 0.01, "sgd")


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


@pytest.fixture(scope="module")
def tiny_ares(tmp_path_factory) -> str:
    """A tiny Swin's weights in the ARES file layout (a timm state dict with its 1000-class head)."""
    timm = import_timm()
    net = timm.create_model("swin_base_patch4_window7_224", num_classes=1000, **TINY_SWIN)
    path = tmp_path_factory.mktemp("weights") / "ARES_Swin_base_patch4_window7_224_AT.pth"
    torch.save(net.state_dict(), path)
    return str(path)


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
    _run_config(path, tmp_path, tiny_ares)


def test_print_config_touches_nothing(tmp_path):
    r = subprocess.run([sys.executable, "-m", "roli.train", "--config", str(CONFIGS / "cub200" / "roli_lora.yaml"),
                        "--dataset", "json:/nonexistent", "--run-dir", str(tmp_path / "run"), "--print-config"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["dataset"] == "json:/nonexistent" and shown["_resolved"]["ft"]["lr"] == 0.00125
    assert not (tmp_path / "run").exists()
