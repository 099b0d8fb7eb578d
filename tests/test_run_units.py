"""roli.training.run without training: the stages each method runs (through a stand-in of the stages), the
finetuning stage's PEFT role and its record of what trains, the final table, the log's handlers, and the
refusals of _validate that no other test reaches. Every expected value is a literal or counted here."""

from __future__ import annotations

import io
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from test_run_safety import one_line

import roli.training.run  # noqa: F401  (the module; roli.training.run is also the name of the function)
from roli import _dist as D
from roli._cli import BadValue
from roli.config import TrainConfig
from roli.models import create_classifier, save_checkpoint
from roli.train import main as train

R = sys.modules["roli.training.run"]

VIT = {"img_size": 8, "patch_size": 4, "depth": 1, "embed_dim": 48, "num_heads": 2}


def test_the_final_table_as_written():
    results = {
        "alp": {"val": {"train_attack": "PGD-3", "val_clean": 0.5, "val_robust": 0.25},
                "test": {"clean": 0.123456, "pgd3": 0.1, "n": 40, "of": 40}},
        "RoLI-lora": {"val": {"val_clean": 0.875},
                      "test": {"clean": 1.0, "pgd3": 0.0, "pgd3_reference": 0.0625, "autoattack": 0.03125,
                               "n": 10, "of": 40}},
        "RanLI-lora": {"val": {}, "test": {"clean": 0.5, "pgd3": 0.25, "n": 5, "of": 40}},
    }  # fmt: skip
    assert R.render(results, 3, True) == (
        "| stage | train attack | val clean | val PGD-3 | test clean | test PGD-3 | test PGD-3 (ref. scoring) "
        "| AutoAttack |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| alp | PGD-3 | 50.00% | 25.00% | 12.35% | 10.00% | - | - |\n"
        "| RoLI-lora | - | 87.50% | - | 100.00% | 0.00% | 6.25% | 3.12% |\n"
        "| RanLI-lora | - | - | - | 50.00% | 25.00% | - | - |\n"
        "(partial: the test figures are of the first 10 of 40 test images, --n-ex)"
    )
    whole = {"lp": {"val": {"val_clean": 0.5}, "test": {"clean": 0.75, "pgd7": 0.5}}}
    assert R.render(whole, 7, False) == (
        "| stage | train attack | val clean | val PGD-7 | test clean | test PGD-7 | test PGD-7 (ref. scoring) |\n"
        "|---|---|---|---|---|---|---|\n"
        "| lp | - | 50.00% | - | 75.00% | 50.00% | - |"
    )


def test_the_finetuning_role_is_ranli_only_from_a_random_head():
    assert R._role("ft", "random") == "ranli"
    assert [R._role(m, i) for m, i in (("ft", "alp"), ("ft", "lp"), ("ft", "/x/best.pt"), ("roli", "alp"))] == [
        "roli"
    ] * 4


class Stand:
    """The stages of a run, stand-in: records each call and what trains in the model it gets; no training."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.calls, self.trackers, self.models = cfg, [], None, []

    def _seen(self, what, model, folder: Path, resume=None):
        self.models.append(model)
        live = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        self.calls.append((what, folder.name, resume, live))
        return {"val_robust": 0.5 + len(self.calls) / 100}

    def alp(self, model, folder, resume):
        return self._seen("alp", model, folder, resume)

    def linear_probe(self, model, folder):
        return self._seen("lp", model, folder)

    def full(self, kind, model, folder, resume):
        return self._seen(f"full:{kind}", model, folder, resume)

    def test(self, model, aa_dir: Path):
        assert model is self.models[-1]  # the stage's own model is tested
        self.calls.append(("test", aa_dir.relative_to(aa_dir.parents[1]).as_posix()))
        return {"clean": 0.25 * len(self.calls), "n": 3, "of": 3}


def _fresh(model: str = "roli.models.small:small_cnn", **kwargs):
    """fresh() as _validate makes it, counted; each model is frozen, so a stage that trains only what its method
    set shows it."""
    made = []

    def fresh(quiet: bool = False):
        torch.manual_seed(0)
        m = create_classifier(model, 5, in_chans=1, **kwargs)
        for p in m.parameters():
            p.requires_grad_(False)
        made.append(m)
        return m

    return fresh, made


def _stages(tmp_path, **options):
    tmp_path.mkdir(exist_ok=True)
    cfg = TrainConfig(run_dir=str(tmp_path), **options)
    stand = Stand(cfg)
    fresh, made = _fresh()
    results = R.run_stages(stand, tmp_path, fresh, resume=True)
    assert json.loads((tmp_path / "results.json").read_text()) == json.loads(json.dumps(results))
    return stand, results, made


# small_cnn's parameters: three conv -> BatchNorm pairs (convs without bias) and the head
BIASES = ["backbone.features.1.bias", "backbone.features.4.bias", "backbone.features.7.bias", "head.bias"]
CNN = sorted([*BIASES, *(f"backbone.features.{i}.weight" for i in range(9) if i % 3 != 2), "head.weight"])


@pytest.mark.parametrize(
    "options, calls, labels",
    [
        ({"method": "pretrain"}, [("full:pretrain", "pretrain", True, "all")], ["pretrain"]),
        ({"method": "lp"}, [("lp", "lp", None, "none")], ["lp"]),
        ({"method": "alp"}, [("alp", "alp", True, "none")], ["alp"]),
        ({"method": "ft", "init": "lp"}, [("lp", "lp", None, "none"), ("full:ft", "ft", True, "all")],
         ["lp", "ft (full, init lp)"]),
        ({"method": "ft", "init": "alp", "peft": "bias"},
         [("alp", "alp", True, "none"), ("full:ft", "ft", True, "bias")], ["alp", "ft (bias, init alp)"]),
        ({"method": "ft", "init": "random", "stage_name": "RanLI-full"}, [("full:ft", "ranli-ft", True, "all")],
         ["RanLI-full"]),
        ({"method": "roli", "compare_ranli": True, "peft": "bias"},
         [("alp", "alp", True, "none"), ("full:ft", "roli-ft", True, "bias"), ("full:ranli", "ranli-ft", True, "bias")],
         ["alp", "RoLI-bias", "RanLI-bias"]),
    ],
)  # fmt: skip
def test_each_method_runs_its_stages_in_order_into_their_folders(tmp_path, options, calls, labels):
    stand, results, made = _stages(tmp_path, **options)
    live = {"all": CNN, "none": [], "bias": sorted([*BIASES, "head.weight"])}
    trained = [c for c in stand.calls if c[0] != "test"]
    assert [c[:3] for c in trained] == [c[:3] for c in calls]
    assert [c[3] for c in trained] == [live[c[3]] for c in calls]  # the stand-in's models were frozen
    tests = [c[1] for c in stand.calls if c[0] == "test"]
    assert tests == [f"autoattack/{c[1]}" for c in calls]  # each stage tested as it finishes
    assert list(results) == labels
    assert [r["dir"] for r in results.values()] == [c[1] for c in calls]
    for i, r in enumerate(results.values()):
        assert r["val"] == {"val_robust": 0.5 + (2 * i + 1) / 100}
        assert r["test"] == {"clean": 0.25 * (2 * i + 2), "n": 3, "of": 3}
        assert ("trainable" in r) == r["dir"].endswith("ft")
    # one fresh model for the method's stages, another for --compare-ranli's random head
    assert len(made) == 1 + options.get("compare_ranli", False)
    assert stand.models[-1] is made[-1]


def test_a_head_given_by_path_is_loaded_before_finetuning(tmp_path):
    torch.manual_seed(3)
    head = create_classifier("roli.models.small:small_cnn", 5, in_chans=1)
    save_checkpoint(head, tmp_path / "head.pt")
    run = tmp_path / "run"
    stand, results, made = _stages(run, method="ft", init=str(tmp_path / "head.pt"))
    assert list(results) == ["ft (full, init head.pt)"]
    assert torch.equal(made[0].head.weight, head.head.weight) and torch.equal(
        made[0].backbone.features[0].weight, head.backbone.features[0].weight
    )


def test_a_finetuning_stage_records_and_logs_what_can_train(tmp_path, caplog):
    """The reference's Adapter init (every Adapter weight zero): its parameters are counted as inert, in
    results.json and in the log line that names the stage as the reference's row."""
    cfg = TrainConfig(run_dir=str(tmp_path), method="roli", model="vit_tiny_patch16_224", model_args=VIT,
                      peft="adapter", peft_init="reference", compare_ranli=True)  # fmt: skip
    stand = Stand(cfg)
    fresh, made = _fresh("vit_tiny_patch16_224", **VIT)
    with caplog.at_level(logging.INFO, logger="roli.train"):
        results = R.run_stages(stand, tmp_path, fresh, resume=False)
    # one block of width 48, reduction 8: down 48*6 + 6, up 6*48 + 48; head 48*5 + 5. Zero on both sides of the
    # branch (no gradient reaches them): down's weight and bias and up's weight, 288 + 6 + 288.
    expected = {"trainable": 630 + 245, "receiving_gradient": 48 + 245, "inert": 582, "inert_tensors": 3,
                "peft_init": "reference"}  # fmt: skip
    for label, model in zip(("RoLI-adapter", "RanLI-adapter"), made, strict=True):
        assert results[label]["trainable"] == expected
        params = dict(model.named_parameters())
        assert sum(p.numel() for p in params.values() if p.requires_grad) == 875
        assert not any(p.any() for n, p in params.items() if ".down." in n or n.endswith(".up.weight"))
    lines = [r.getMessage() for r in caplog.records if r.name == "roli.train"]
    assert len(lines) == 2
    assert lines[0].startswith("RoLI-adapter, peft init reference: ")
    assert lines[0].endswith(" (as the reference's RoLI-adapter)")
    assert lines[1].startswith("RanLI-adapter, peft init reference: ")
    assert lines[1].endswith(" (as the reference's RanLI-adapter)")


def test_standard_inits_are_not_named_as_the_references_rows(tmp_path, caplog):
    cfg = TrainConfig(run_dir=str(tmp_path), method="roli", model="vit_tiny_patch16_224", model_args=VIT,
                      peft="adapter")  # fmt: skip
    fresh, made = _fresh("vit_tiny_patch16_224", **VIT)
    with caplog.at_level(logging.INFO, logger="roli.train"):
        results = R.run_stages(Stand(cfg), tmp_path, fresh, resume=False)
    trainable = sum(p.numel() for p in made[0].parameters() if p.requires_grad)
    assert trainable == 875  # as in the reference init's case: the same parameters, none of them inert
    assert results["RoLI-adapter"]["trainable"] == {"trainable": 875, "receiving_gradient": 875, "inert": 0,
                                                    "inert_tensors": 0, "peft_init": "standard"}  # fmt: skip
    (line,) = [r.getMessage() for r in caplog.records if r.name == "roli.train"]
    assert line == "RoLI-adapter, peft init standard: 875 trainable parameters, all of them can receive a gradient"


def test_each_tested_stage_reaches_the_trackers(tmp_path):
    seen = []

    class Trackers:
        def test(self, name, metrics):
            seen.append((name, metrics["clean"]))

    stand = Stand(TrainConfig(run_dir=str(tmp_path), method="roli"))
    stand.trackers = Trackers()
    R.run_stages(stand, tmp_path, _fresh()[0], resume=False)
    assert seen == [("alp", 0.5), ("RoLI-full", 1.0)]


def test_the_log_goes_to_the_current_stderr_and_one_file(tmp_path, monkeypatch):
    root = logging.getLogger("roli")
    monkeypatch.setattr(root, "handlers", [])
    monkeypatch.setattr(root, "level", logging.NOTSET)
    R._log_to(tmp_path / "a.log")
    R._log_to(tmp_path / "b.log")  # a second run in the same process: one console, the new file only
    assert root.level == logging.INFO
    assert [type(h).__name__ for h in root.handlers] == ["_Stderr", "FileHandler"]
    assert Path(root.handlers[1].baseFilename) == tmp_path / "b.log"
    first, later = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    logging.getLogger("roli.train").info("one %d", 1)
    monkeypatch.setattr(sys, "stderr", later)  # redirected after the handler was made: followed
    logging.getLogger("roli.train").warning("two")
    assert (first.getvalue(), later.getvalue()) == ("one 1\n", "two\n")
    text = (tmp_path / "b.log").read_text().splitlines()
    assert [line.split(" ", 2)[2] for line in text] == ["INFO one 1", "WARNING two"]
    assert (tmp_path / "a.log").read_text() == ""
    for h in root.handlers:
        h.close()
    monkeypatch.setattr(D, "is_main", lambda: False)
    monkeypatch.setattr(root, "handlers", [])
    R._log_to(tmp_path / "c.log")  # another rank: warnings only, and no file of its own
    assert root.level == logging.WARNING and root.handlers == [] and not (tmp_path / "c.log").exists()


def test_a_batch_that_torchrun_cannot_split_is_refused_before_writing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(D, "active", lambda: True)
    monkeypatch.setattr(D, "world", lambda: 3)
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), method="alp", random_backbone=True, batch_size=64)
    with pytest.raises(BadValue, match=r"^batch-size: 64 is not divisible by the 3 torchrun processes$"):
        R._validate(cfg, tmp_path / "run", False, False, None)
    assert not (tmp_path / "run").exists()
    monkeypatch.setattr(D, "world", lambda: 2)  # 32 images per process: taken
    splits = R._validate(cfg, tmp_path / "run", False, False, None)[0]
    assert splits[3] == 10 and not (tmp_path / "run").exists()


def test_autoattack_needs_four_classes_and_four_are_enough(tmp_path):
    cfg = TrainConfig(run_dir=str(tmp_path / "run"), method="alp", random_backbone=True, classes="0-3",
                      autoattack="standard")  # fmt: skip
    assert R._validate(cfg, tmp_path / "run", False, False, None)[0][3] == 4


def test_autoattack_on_fewer_than_four_classes_is_one_line(tmp_path, capsys):
    argv = ["--method", "alp", "--classes", "0-2", "--autoattack", "standard", "--random-backbone"]
    assert train([*argv, "--run-dir", str(tmp_path / "run")]) == 2
    one_line(capsys, "autoattack: AutoAttack standard's DLR loss needs at least 4 classes; this task has 3 (drop "
                     "--autoattack: PGD still runs)")  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_an_unreadable_image_refuses_the_run_and_names_the_file(tmp_path, capsys):
    from PIL import Image

    for split in ("train", "test"):
        for c in range(2):
            (tmp_path / "img" / split / f"c{c}").mkdir(parents=True)
            for i in range(12):
                Image.new("RGB", (8, 8), (20 * i, 100 * c, 7)).save(tmp_path / "img" / split / f"c{c}" / f"{i}.png")
    (tmp_path / "img" / "test" / "c1" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    argv = ["--method", "alp", "--dataset", f"imagefolder:{tmp_path / 'img'}", "--resize", "8", "--crop-size", "8",
            "--random-backbone", "--workers", "0", "--run-dir", str(tmp_path / "run")]  # fmt: skip
    assert train(argv) == 2
    err = one_line(capsys, "dataset: ")
    assert "2.png" in err and err.endswith("; remove or replace the file(s)"), err
    assert not (tmp_path / "run").exists()


def test_an_init_file_is_bound_to_the_run_and_the_stage_keeps_its_name(tmp_path):
    import hashlib

    torch.manual_seed(5)
    head = create_classifier("roli.models.small:small_cnn", 5, in_chans=1)
    save_checkpoint(head, tmp_path / "head.pt")
    quick = ["--classes", "0-4", "--eps", "0.1", "--step-size", "0.05", "--steps", "1", "--val-steps", "1",
             "--epochs", "1", "--warmup", "0", "--random-backbone", "--n-ex", "20"]  # fmt: skip
    for init, run in ((str(tmp_path / "head.pt"), tmp_path / "a"), ("random", tmp_path / "b")):
        assert train(["--method", "ft", "--init", init, *quick, "--run-dir", str(run)]) == 0
    fp = json.loads((tmp_path / "a" / "fingerprint.json").read_text())
    assert fp["inputs"] == {"--init": hashlib.sha256((tmp_path / "head.pt").read_bytes()).hexdigest()}
    assert "inputs" not in json.loads((tmp_path / "b" / "fingerprint.json").read_text())


@pytest.mark.parametrize(
    "argv, flag, what, method",
    [
        (["--method", "alp", "--peft", "lora"], "--peft", "configures the finetuning stage of --method ft and roli",
         "--method alp"),
        (["--method", "lp", "--lora-rank", "4"], "--lora-rank",
         "configures the finetuning stage of --method ft and roli", "--method lp"),
        (["--method", "alp", "--set", "peft_init=reference"], "--peft-init",
         "configures the finetuning stage of --method ft and roli", "--method alp"),
        (["--method", "pretrain", "--init", "random"], "--init", "is the head that --method ft finetunes from",
         "--method pretrain"),
        (["--method", "lp", "--alp-lr", "0.1"], "--alp-lr", "configures the ALP stage", "--method lp"),
        (["--method", "ft", "--init", "lp", "--alp-weight-decay", "0.1"], "--alp-weight-decay",
         "configures the ALP stage", "--method ft --init lp"),
        (["--method", "ft", "--init", "random", "--set", "alp.epochs=3"], "--alp-epochs", "configures the ALP stage",
         "--method ft --init random"),
        (["--method", "roli", "--ranli-lr", "0.1"], "--ranli-lr",
         "configures the random-head stage (--compare-ranli)", "--method roli"),
        (["--method", "ft", "--init", "alp", "--ranli-weight-decay", "0"], "--ranli-weight-decay",
         "configures the random-head stage (--compare-ranli)", "--method ft --init alp"),
    ],
)  # fmt: skip
def test_a_flag_no_stage_of_the_method_reads_is_refused(tmp_path, capsys, argv, flag, what, method):
    run = tmp_path / "r"
    assert train([*argv, "--random-backbone", "--run-dir", str(run)]) == 2
    one_line(capsys, f"python -m roli.train: error: {flag[2:]}: {flag} {what}; {method} has no such stage and would "
                     "ignore it: drop it")  # fmt: skip
    assert not run.exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--method", "roli", "--peft", "lora", "--lora-rank", "4", "--alp-lr", "0.1", "--compare-ranli",
          "--ranli-lr", "0.2", "--set", "ranli.weight_decay=0"],
         {"lora_rank": 4, "alp.lr": 0.1, "ranli.lr": 0.2, "ranli.weight_decay": 0.0}),
        (["--method", "ft", "--init", "random", "--peft", "bias", "--ranli-lr", "0.3"],
         {"peft": "bias", "ranli.lr": 0.3}),
        (["--method", "ft", "--init", "lp", "--peft-init", "reference"], {"peft_init": "reference"}),
        (["--method", "alp", "--alp-lr", "0.1", "--alp-epochs", "3"], {"alp.lr": 0.1, "alp.epochs": 3}),
    ],
)  # fmt: skip
def test_flags_a_stage_reads_are_taken(capsys, argv, expected):
    assert train([*argv, "--random-backbone", "--print-config"]) == 0
    record = json.loads(capsys.readouterr().out)
    for key, value in expected.items():
        stage, _, name = key.rpartition(".")
        assert (record["_resolved"][stage] if stage else record)[name] == value, key


def test_a_config_files_peft_options_are_not_flags(tmp_path, capsys):
    """A config file sets the PEFT method for its finetuning; running only its ALP part (--method alp) is meant."""
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"method": "roli", "peft": "lora", "lora_rank": 4, "dataset": "digits"}))
    assert train(["--config", str(config), "--method", "alp", "--random-backbone", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "alp"
    assert train(["--config", str(config), "--method", "alp", "--lora-rank", "8", "--random-backbone"]) == 2
    one_line(capsys, "lora-rank: --lora-rank configures the finetuning stage of --method ft and roli; --method alp "
                     "has no such stage and would ignore it: drop it")  # fmt: skip


def test_labels_json_names_the_classes_of_a_subset_and_earlier_fingerprints_still_match(tmp_path, capsys):
    """--classes 3,1 of the digits: class 0 is the digit 3 (labels.json said "0", the whole dataset's names). A
    run whose fingerprint an earlier roli wrote with those names is still the same data to evaluate --run."""
    from roli._io import save_json
    from roli.evaluate import main as evaluate
    from roli.rundir import _digest

    run = tmp_path / "run"
    argv = ["--method", "lp", "--classes", "3,1", "--random-backbone", "--n-ex", "10", "--run-dir", str(run)]
    assert train(argv) == 0
    assert json.loads((run / "labels.json").read_text()) == {
        "classes": ["3", "1"],
        "note": "class i is the i-th entry (the dataset's label)",
    }
    fp = json.loads((run / "fingerprint.json").read_text())
    assert fp["classes"] == _digest(["3", "1"]) and fp["classes_before_subset"] == _digest([str(i) for i in range(10)])
    earlier = {k: v for k, v in fp.items() if k != "classes_before_subset"} | {"classes": fp["classes_before_subset"]}
    save_json(earlier, run / "fingerprint.json")  # as a roli before this one wrote it (recorded in the manifest)
    capsys.readouterr()
    assert evaluate(["--run", str(run), "--attack", "none", "--out", str(tmp_path / "r.json")]) == 0
    save_json(earlier | {"classes": _digest(["1", "3"])}, run / "fingerprint.json")  # other names: a change
    assert evaluate(["--run", str(run), "--attack", "none"]) == 2
    assert "the class names (labels.json) changed since the run started" in one_line(capsys, "error")


def test_the_python_api_starts_fresh_and_refuses_a_full_folder(tmp_path, capsys):
    """roli.run(cfg) as a script calls it: a new run (not a resume), printed as the CLI prints it; a second call
    into the same folder is refused (no overwrite unless asked), and config.json records the validation split."""
    import roli

    cfg = TrainConfig(run_dir=str(tmp_path / "run"), method="lp", random_backbone=True, classes="0-4", n_ex=10)
    results = roli.run(cfg)
    out = capsys.readouterr().out
    assert results == json.loads((tmp_path / "run" / "results.json").read_text())
    assert out.startswith("| stage | train attack |") and f"outputs: {tmp_path / 'run'} (results.json" in out
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    assert record["_data"] == {"validation": "10% of train, stratified by class, seed 0"}
    with pytest.raises(BadValue, match="is not empty; pass --resume"):
        roli.run(cfg)
    assert roli.run(cfg, overwrite=True, announce=False)["lp"]["test"] == results["lp"]["test"]
    assert capsys.readouterr().out == ""


def test_a_reference_init_with_nothing_inert_is_not_named_a_reference_row(tmp_path, caplog):
    """ViT's LoRA under the reference's init: A random, B zero in both roles (nothing is zero on both sides)."""
    cfg = TrainConfig(run_dir=str(tmp_path), method="roli", model="vit_tiny_patch16_224", model_args=VIT,
                      peft="lora", peft_init="reference")  # fmt: skip
    fresh, made = _fresh("vit_tiny_patch16_224", **VIT)
    with caplog.at_level(logging.INFO, logger="roli.train"):
        results = R.run_stages(Stand(cfg), tmp_path, fresh, resume=False)
    assert results["RoLI-lora"]["trainable"]["inert"] == 0
    (line,) = [r.getMessage() for r in caplog.records if r.name == "roli.train"]
    assert line.startswith("RoLI-lora, peft init reference: ") and line.endswith("can receive a gradient"), line


def test_the_runs_log_and_csv_tracking(tmp_path):
    import csv

    quick = ["--method", "alp", "--random-backbone", "--classes", "0-4", "--n-ex", "10", "--epochs", "2", "--warmup",
             "0", "--steps", "1", "--val-steps", "1"]  # fmt: skip
    run, plain = tmp_path / "tracked", tmp_path / "plain"
    assert train([*quick, "--log", "csv", "--run-dir", str(run)]) == 0
    assert train([*quick, "--run-dir", str(plain)]) == 0
    lines = [line.split(" ", 3)[3] for line in (run / "train.log").read_text().splitlines()]
    assert lines[:2] == [f"run directory: {run}; device: cpu", "tracking: csv"]
    assert not [line for line in (plain / "train.log").read_text().splitlines() if "tracking:" in line]
    assert not (plain / "alp" / "metrics.csv").exists()
    jsonl = [json.loads(line) for line in (run / "alp" / "metrics.jsonl").read_text().splitlines()]
    with open(run / "alp" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [r["epoch"] for r in jsonl] == [0, 1]
    assert [float(r["val_robust"]) for r in rows] == [r["val_robust"] for r in jsonl]


@pytest.mark.parametrize("options", [{"method": "roli", "compare_ranli": True}, {"method": "ft", "init": "random"}])
def test_swin_lora_under_the_reference_init_is_head_only_for_roli_and_trains_for_ranli(tmp_path, options):
    """The reference's Swin LoRA: RoLI sets A = B = 0 (no gradient reaches either: the head alone trains), RanLI
    keeps A random. Each finetuning stage must get its own role's init: the RanLI stage is not inert."""
    from conftest import TINY_SWIN

    model = "swin_tiny_patch4_window7_224"
    cfg = TrainConfig(run_dir=str(tmp_path), model=model, model_args=TINY_SWIN, peft="lora", peft_init="reference",
                      **options)  # fmt: skip
    fresh, made = _fresh(model, **TINY_SWIN)
    results = R.run_stages(Stand(cfg), tmp_path, fresh, resume=False)
    inert = {label: r["trainable"]["inert"] for label, r in results.items() if "trainable" in r}
    loras = {label: [p for n, p in m.named_parameters() if "lora_" in n] for label, m in zip(inert, made, strict=True)}
    for label, count in inert.items():
        ranli = label.startswith("RanLI") or options["method"] == "ft"
        lora_a_zero = all(not p.any() for p in loras[label])
        assert (count == 0) == ranli and lora_a_zero != ranli, (label, count)
    assert sorted(inert) == (["RanLI-lora", "RoLI-lora"] if options["method"] == "roli" else ["ft (lora, init random)"])


def test_a_run_with_autoattack_prints_its_column(tmp_path, capsys):
    """digits 0-3 under a budget of the whole pixel range (APGD-CE breaks every image at once: fast): the final
    table has the AutoAttack column."""
    argv = ["--method", "alp", "--classes", "0-3", "--random-backbone", "--autoattack", "standard", "--eps", "1",
            "--step-size", "0.5", "--steps", "1", "--val-steps", "1", "--epochs", "1", "--warmup", "0", "--n-ex", "8",
            "--run-dir", str(tmp_path / "run")]  # fmt: skip
    assert train(argv) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| stage |"))
    assert header.endswith("| test PGD-1 (ref. scoring) | AutoAttack |")
    assert json.loads((tmp_path / "run" / "results.json").read_text())["alp"]["test"]["autoattack"] == 0.0


def _stand_in_pretraining(calls, started=None, release=None):
    def stand_in(cfg, announce=True):
        calls.append(cfg.run_dir)
        best = Path(cfg.run_dir) / "pretrain" / "best.pt"
        best.parent.mkdir(parents=True)
        torch.save({"state_dict": {"backbone.w": torch.randn(3), "head.weight": torch.randn(2, 3)}}, best)
        if started is not None:
            started.set()
            assert release.wait(60)
        return {}

    return stand_in


def test_two_first_demos_at_once_train_the_source_backbone_once(tmp_path, monkeypatch, capsys):
    import threading
    import time

    import roli.training.demo  # noqa: F401

    demo = sys.modules["roli.training.demo"]
    monkeypatch.setenv("ROLI_CACHE_DIR", str(tmp_path))
    calls, started, release, out = [], threading.Event(), threading.Event(), {}
    monkeypatch.setattr(demo, "run", _stand_in_pretraining(calls, started, release))
    first = threading.Thread(target=lambda: out.setdefault("first", demo.source_backbone(epochs=2)))
    first.start()
    try:
        assert started.wait(60)
        second = threading.Thread(target=lambda: out.setdefault("second", demo.source_backbone(epochs=2)))
        second.start()
        time.sleep(1.0)  # the second has started: it waits, neither training nor clearing the first's folder
        assert len(calls) == 1 and (Path(calls[0]) / "pretrain" / "best.pt").is_file()
        assert "second" not in out
    finally:
        release.set()
        first.join(60)
    second.join(60)
    assert out["first"] == out["second"] and len(calls) == 1
    assert list(torch.load(out["first"], weights_only=True)) == ["backbone.w"]
    printed = capsys.readouterr()
    assert printed.out.count("1/3 adversarially pretraining") == 1 and "cached at" in printed.out
    assert f"another process is training the robust source backbone in {out['first'].parent}: waiting for it ..." in (
        printed.err
    )
    assert sorted(p.name for p in out["first"].parent.iterdir()) == [".lock", "backbone.pt"]


def test_a_damaged_cached_source_backbone_is_trained_again(tmp_path, monkeypatch, capsys):
    import roli.training.demo  # noqa: F401

    demo = sys.modules["roli.training.demo"]
    monkeypatch.setenv("ROLI_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(demo, "run", _stand_in_pretraining(calls))
    weights = demo.source_backbone(epochs=2)
    assert demo.source_backbone(epochs=2) == weights and len(calls) == 1  # cached
    weights.write_bytes(weights.read_bytes()[:40])  # cut short (a full disk, a copy)
    capsys.readouterr()
    assert demo.source_backbone(epochs=2) == weights and len(calls) == 2
    assert "the cached source backbone is unreadable (" in capsys.readouterr().out
    assert list(torch.load(weights, weights_only=True)) == ["backbone.w"]


def test_the_demo_makes_its_folder_first_and_refuses_in_one_line(tmp_path, monkeypatch, capsys):
    import roli.training.demo  # noqa: F401

    demo = sys.modules["roli.training.demo"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ROLI_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(demo, "run", lambda *a, **k: pytest.fail("trained before its folder was made"))
    monkeypatch.setattr(demo.time, "strftime", lambda fmt: "20260101-000000")
    (tmp_path / "afile").write_text("x")
    monkeypatch.setenv("ROLI_CACHE_DIR", str(tmp_path / "afile"))
    assert train([]) == 2
    assert one_line(capsys, "") == (
        f"python -m roli.train: error: demo: roli's cache folder {tmp_path / 'afile' / 'demo'} lies under "
        f"{tmp_path / 'afile'}, which is a file: point ROLI_CACHE_DIR at a folder"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # no demo folder made
    monkeypatch.setenv("ROLI_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "runs").write_text("a user's file")
    assert train([]) == 2
    assert one_line(capsys, "") == (
        "python -m roli.train: error: demo: cannot create runs/roli-demo-20260101-000000: runs is a file, not a "
        "folder; run it from another directory"
    )
    assert (tmp_path / "runs").read_text() == "a user's file" and not (tmp_path / "cache").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "runs"]


def test_two_demos_in_the_same_second_get_two_folders(tmp_path, monkeypatch):
    import roli.training.demo  # noqa: F401

    demo = sys.modules["roli.training.demo"]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo.time, "strftime", lambda fmt: "20260101-000000")
    made = [demo.demo_dir() for _ in range(3)]
    assert made == [Path("runs/roli-demo-20260101-000000"), Path("runs/roli-demo-20260101-000000-2"),
                    Path("runs/roli-demo-20260101-000000-3")]  # fmt: skip
    assert all(p.is_dir() and not any(p.iterdir()) for p in made)
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    import re

    assert re.fullmatch(r"runs/roli-demo-20\d{6}-\d{6}", demo.demo_dir().as_posix())  # the time it was made
    with pytest.raises(BadValue, match=r"^demo: cannot create x{300} \(File name too long\); give another folder$"):
        demo.demo_dir("x" * 300)
    monkeypatch.setattr(demo.time, "strftime", lambda fmt: "20260101-000000")
    real, raced = Path.exists, []

    def exists_then_raced(self, *a, **k):  # another demonstration makes the folder just after this one looked
        got = real(self, *a, **k)
        if self.name == "roli-demo-20260101-000000-4" and not raced:
            raced.append(self.mkdir())
        return got

    monkeypatch.setattr(Path, "exists", exists_then_raced)
    assert demo.demo_dir() == Path("runs/roli-demo-20260101-000000-5") and raced == [None]
    monkeypatch.setattr(Path, "exists", real)
    (tmp_path / "given").mkdir()
    assert demo.demo_dir(str(tmp_path / "given")) == tmp_path / "given"  # an empty folder is taken
    assert demo.demo_dir(str(tmp_path / "new" / "demo")).is_dir()
    (tmp_path / "given" / "mine.txt").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    for bad in ("given", "given/mine.txt", "link"):
        with pytest.raises(BadValue, match=rf"^demo: {tmp_path / bad} exists and is not an empty folder; give a new"):
            demo.demo_dir(str(tmp_path / bad))
    assert not (tmp_path / "elsewhere").exists()


def test_an_interrupted_demo_says_so_in_one_line(monkeypatch, capsys):
    import signal

    import roli.training.demo  # noqa: F401
    from roli.training.loop import Interrupted, NonFiniteLoss

    demo = sys.modules["roli.training.demo"]

    def interrupted(*a, **k):
        raise Interrupted(signal.SIGTERM, Path("runs/x/lp"))

    monkeypatch.setattr(demo, "run_demo", interrupted)
    assert train([]) == 128 + signal.SIGTERM
    assert one_line(capsys, "") == (
        "python -m roli.train: the demonstration was interrupted by SIGTERM; run `python -m roli.train` again to "
        "start it over"
    )

    def diverged(*a, **k):
        raise NonFiniteLoss("the loss is nan at epoch 3")

    monkeypatch.setattr(demo, "run_demo", diverged)
    assert train([]) == 1
    assert one_line(capsys, "") == "python -m roli.train: error: the loss is nan at epoch 3"


def test_constructor_arguments_that_roli_sets_or_that_load_unrecorded_weights_are_refused(tmp_path, capsys):
    from roli.specs import ModelSpec

    said = {
        "num_classes": "is set by roli (the backbone is built without a classifier; the head's classes come from the "
        "data): drop it",
        "in_chans": "is set by roli (from the data's channels): drop it",
        "pretrained": "would load timm's weights without the run recording them: drop it and use --pretrained",
        "pretrained_cfg": "would choose weights for timm to load without the run recording them: drop it and use "
        "--checkpoint FILE or --pretrained",
        "pretrained_cfg_overlay": "would choose weights for timm to load without the run recording them: drop it and "
        "use --checkpoint FILE or --pretrained",
        "checkpoint_path": "would make timm load a file without the run recording it: drop it and use --checkpoint "
        "FILE",
        "features_only": "would make timm return feature maps, not a backbone a head goes on: drop it",
    }
    for name in ("vit_tiny_patch16_224", "ares_vit_b", "hf-hub:timm/vit_tiny_patch16_224.augreg_in21k"):
        for key, why in said.items():
            with pytest.raises(BadValue) as e:
                ModelSpec(name, {"img_size": 8, key: "x"})
            assert str(e.value) == f"model-arg: {key} {why}"
    for key in ("pretrained", "checkpoint_path", "features_only", "pretrained_cfg"):  # a user's function's own
        assert ModelSpec("mypackage.models:net", {key: True}).args == {key: True}
    for key in ("num_classes", "in_chans"):
        with pytest.raises(BadValue, match=f"^model-arg: {key} is set by roli"):
            ModelSpec("mypackage.models:net", {key: 3})
    with pytest.raises(
        BadValue, match=r"^model-arg: mean, std is preprocessing, not a constructor argument: use --mean"
    ):
        ModelSpec("vit_tiny_patch16_224", {"std": 1, "mean": 0})
    config = tmp_path / "c.yaml"
    config.write_text(f"model: vit_tiny_patch16_224\nmodel_args: {{img_size: 8, checkpoint_path: {tmp_path}/w.pt}}\n")
    run = ["--config", str(config), "--dataset", "digits", "--method", "lp", "--random-backbone", "--epochs", "1",
           "--warmup", "0", "--run-dir", str(tmp_path / "run")]  # fmt: skip
    assert train(run) == 2
    assert one_line(capsys, "") == f"python -m roli.train: error: model-arg: checkpoint_path {said['checkpoint_path']}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_a_feature_cache_under_a_file_is_refused_before_anything_is_written(tmp_path, monkeypatch, capsys):
    (tmp_path / "afile").write_text("a user's file")
    monkeypatch.setenv("ROLI_CACHE_DIR", str(tmp_path / "afile"))
    lp = ["--method", "lp", "--dataset", "digits", "--model", "roli.models.small:small_cnn", "--random-backbone",
          "--epochs", "1", "--warmup", "0", "--run-dir", str(tmp_path / "run")]  # fmt: skip
    assert train(lp) == 2
    assert one_line(capsys, "") == (
        f"python -m roli.train: error: roli's cache folder {tmp_path / 'afile' / 'features'} lies under "
        f"{tmp_path / 'afile'}, which is a file: point ROLI_CACHE_DIR at a folder"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]
