"""python -m roli.report: one table (Markdown, CSV) of every stage of every run, and the Figure-1 style plot."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import pytest

from roli import report as rep
from roli._cli import BadValue
from roli.report import main as report
from roli.train import main as train

COMMON = ["--dataset", "digits", "--classes", "0-4", "--eps", "0.1", "--step-size", "0.05", "--steps", "1",
          "--val-steps", "2", "--epochs", "2", "--warmup", "0", "--lr", "0.01", "--random-backbone"]  # fmt: skip


def test_report_of_two_runs(tmp_path, capsys):
    assert train([*COMMON, "--method", "roli", "--compare-ranli", "--alp-lr", "0.05", "--run-dir",
                  str(tmp_path / "a")]) == 0  # fmt: skip
    assert train([*COMMON, "--method", "alp", "--run-dir", str(tmp_path / "b")]) == 0
    capsys.readouterr()
    assert report([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    rows = list(csv.DictReader((tmp_path / "rep" / "report.csv").open()))
    assert [(r["run"], r["kind"]) for r in rows] == [("a", "ALP"), ("a", "RoLI"), ("a", "RanLI"), ("b", "ALP")]
    assert all(r["epochs"] == "2" and float(r["wall s"]) > 0 and float(r["images/s"]) > 0 for r in rows)
    runs = {name: json.loads((tmp_path / name / "results.json").read_text()) for name in ("a", "b")}
    for r in rows:  # each row's figures are its stage's in results.json, column by column
        test = runs[r["run"]][r["stage"]]["test"]
        assert (float(r["test clean"]), float(r["test PGD"]), float(r["test PGD (ref. scoring)"])) == (
            test["clean"], test["pgd2"], test["pgd2_reference"])  # fmt: skip
    assert md.count("\n") == 2 + len(rows) and "| a | RoLI-full | RoLI | full |" in md
    assert (tmp_path / "rep" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report([str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a finished run" in err


# The report's logic on run directories written here by hand (no training): every expected figure is a literal.


CFG = {"peft": "lora", "norm": "linf", "eps": "8/255", "init": "alp"}


def write_run(run: Path, results: dict, cfg: dict = CFG, metrics: dict | None = None) -> Path:
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results))
    (run / "config.json").write_text(json.dumps(cfg))
    for stage, lines in (metrics or {}).items():
        (run / stage).mkdir(exist_ok=True)
        (run / stage / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


RESULTS = {
    "alp": {"dir": "alp", "test": {"clean": 0.5, "pgd10": 0.25, "pgd10_reference": 0.24, "n": 100, "of": 1000},
            "val": {"epoch": 3}},
    "RoLI-lora": {"test": {"clean": 0.8, "pgd10_reference": 0.39, "pgd10": 0.4, "autoattack": 0.35, "n": 1000,
                           "of": 1000}, "val": {"epoch": 7}},
    "RanLI-lora": {"test": {"clean": 0.7, "pgd10": 0.3, "n": True}},
    "lp": {"test": {"clean": 1, "n": 50}},
    "broken": [1, 2],
}  # fmt: skip
METRICS = {"alp": ['{"seconds": 10, "images_per_s": 100}', "", '{"seconds": 30, "images_per_s": 200}',
                   '{"seconds": -1}', "not json", '{"seconds": true}', '{"images_per_s": NaN}', "[1]"]}  # fmt: skip


def test_each_stage_is_one_row_with_its_figures(tmp_path, capsys):
    run = write_run(tmp_path / "a", RESULTS, metrics=METRICS)
    rows = rep.rows_of(run, "mine")
    blank = {c: None for c in rep.COLUMNS} | {"run": "mine"}
    assert rows == [
        blank | {"stage": "alp", "kind": "ALP", "method": "alp", "test clean": 0.5, "test PGD": 0.25,
                 "test PGD (ref. scoring)": 0.24, "test images": "100 of 1000 (partial)", "best epoch": 3, "epochs": 2,
                 "wall s": 40.0, "images/s": 175.0},  # (10*100 + 30*200) / 40
        blank | {"stage": "RoLI-lora", "kind": "RoLI", "method": "lora", "test clean": 0.8, "test PGD": 0.4,
                 "test PGD (ref. scoring)": 0.39, "AutoAttack": 0.35, "test images": "1000", "best epoch": 7},
        blank | {"stage": "RanLI-lora", "kind": "RanLI", "method": "lora", "test clean": 0.7, "test PGD": 0.3},
        blank | {"stage": "lp", "kind": "LP", "method": "lp", "test clean": 1, "test images": "50"},
    ]  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    metrics = run / "alp" / "metrics.jsonl"
    assert err == [f"report: skipped line {i} of {metrics}: not an epoch record of roli" for i in (4, 5, 6, 7, 8)] + [
        f"report: skipped 'broken' in {run / 'results.json'}: not a stage record"]  # fmt: skip
    assert rep.rows_of(run)[0]["run"] == "a"


@pytest.mark.parametrize(
    "label, folder, cfg, kind",
    [("RoLI-full", "ft", {}, "RoLI"), ("x", "roli-ft", {}, "RoLI"), ("x", "ranli-ft", {}, "RanLI"),
     ("full", "ft", {"init": "random"}, "RanLI"), ("full", "ft", {"init": "alp"}, "FT"), ("alp", "alp", {}, "ALP"),
     ("lp", "lp", {}, "LP"), ("pretrain", "pretrain", {}, "pretrain"), ("x", "other", {}, "FT")],
)  # fmt: skip
def test_each_stage_has_its_kind(label, folder, cfg, kind):
    assert rep._kind(label, folder, cfg) == kind


def test_cells_and_the_markdown_table():
    assert [rep._cell(v) for v in (None, 0.5, 1.0, 0.12345, 1, 2.5, "x")] == ["-", "50.00%", "100.00%", "12.35%", "1",
                                                                             "2.5", "x"]  # fmt: skip
    row = {c: None for c in rep.COLUMNS} | {"run": "a", "stage": "alp", "test clean": 0.5, "epochs": 2,
                                            "wall s": 0.5, "notes": "n"}  # fmt: skip
    assert rep.markdown([row]).splitlines() == [
        "| run | stage | kind | method | test clean | test PGD | test PGD (ref. scoring) | AutoAttack | test images "
        "| best epoch | epochs | wall s | images/s | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| a | alp | - | - | 50.00% | - | - | - | - | - | 2 | 0.5 | - | n |",
    ]


def evaluation(stage: Path, name: str, aa=0.3, **config) -> dict:
    best = stage / "best.pt"
    stage.mkdir(exist_ok=True)
    if not best.exists():
        best.write_bytes(b"the stage's best head")
    record = {"config": {"split": "test", "n_ex": None, "norm": "linf", "eps": "8/255"} | config,
              "attacks": {"PGD-10": 0.4, "AutoAttack (standard)": aa},
              "checkpoint": {"sha256": hashlib.sha256(best.read_bytes()).hexdigest()}}  # fmt: skip
    (stage / "evaluations").mkdir(exist_ok=True)
    (stage / "evaluations" / name).write_text(json.dumps(record))
    return record


def test_autoattack_comes_from_the_newest_matching_evaluation_of_the_present_best(tmp_path, capsys):
    stage = tmp_path / "alp"
    stage.mkdir()
    assert rep.evaluated_autoattack(stage, CFG) == (None, None)
    evaluation(stage, "1-old.json", aa=0.31)
    for i, other in enumerate([{"split": "val"}, {"n_ex": 100}, {"norm": "l2"}, {"eps": "4/255"}, {"eps": "nonsense"}]):
        evaluation(stage, f"2-{i}.json", aa=0.9, **other)  # newer, but of another protocol: not the run's AutoAttack
    record = evaluation(stage, "2-x.json", aa=0.9)
    record["attacks"] = {"PGD-10": 0.5}  # no AutoAttack in it
    (stage / "evaluations" / "2-x.json").write_text(json.dumps(record))
    assert rep.evaluated_autoattack(stage, CFG) == (0.31, None)
    assert rep.evaluated_autoattack(stage, CFG | {"eps": "0.0313725490196"}) == (0.31, None)  # 8/255 written out
    evaluation(stage, "3-changed.json", aa=0.32, changed_since_run=["the test split's labels", "the class names"])
    assert rep.evaluated_autoattack(stage, CFG) == (
        0.32, "AutoAttack on changed data: the test split's labels; the class names")  # fmt: skip
    capsys.readouterr()
    (stage / "evaluations" / "4-damaged.json").write_text("{")
    record = evaluation(stage, "5-other-best.json", aa=0.5)
    record["checkpoint"]["sha256"] = "0" * 64
    (stage / "evaluations" / "5-other-best.json").write_text(json.dumps(record))
    record.pop("checkpoint")
    (stage / "evaluations" / "6-unnamed.json").write_text(json.dumps(record))
    assert rep.evaluated_autoattack(stage, CFG)[0] == 0.32
    ev = stage / "evaluations"
    assert capsys.readouterr().err.splitlines() == [
        f"report: skipped {ev / '6-unnamed.json'}: it does not name the best.pt it evaluated (roli evaluate --run "
        "again)",
        f"report: skipped {ev / '5-other-best.json'}: it evaluated another best.pt (roli evaluate --run again)",
        f"report: skipped {ev / '4-damaged.json'}: not an evaluation of roli evaluate --run",
    ]
    evaluation(stage, "7-bad.json", aa=1.5)
    with pytest.raises(BadValue, match="AutoAttack is 1.5, not an accuracy in"):
        rep.evaluated_autoattack(stage, CFG)
    (stage / "best.pt").unlink()  # no best.pt: nothing evaluated is the present one
    assert rep.evaluated_autoattack(stage, CFG) == (None, None)


def test_a_report_row_takes_autoattack_from_an_evaluation(tmp_path):
    run = write_run(tmp_path / "a", {"alp": {"dir": "alp", "test": {"clean": 0.5}}})
    evaluation(run / "alp", "1.json", aa=0.3, changed_since_run=["x"])
    assert [(r["AutoAttack"], r["notes"]) for r in rep.rows_of(run)] == [(0.3, "AutoAttack on changed data: x")]


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan"), True, "0.5", [0.5]])
def test_figures_that_are_not_accuracies_are_refused(value):
    with pytest.raises(BadValue) as e:
        rep._accuracy(value, "here")
    assert str(e.value) == f"here is {value!r}, not an accuracy in [0, 1]: the file was edited or is damaged"


def test_images_says_how_many_test_images(tmp_path):
    assert [rep._images(t) for t in ({"n": 10}, {"n": 10, "of": 10}, {"n": 5, "of": 10}, {"n": 5, "of": True}, {},
                                     {"n": 5.0})] == ["10", "10", "5 of 10 (partial)", "5", None, None]  # fmt: skip


def test_out_is_never_a_run_nor_over_someone_elses_report(tmp_path, capsys):
    run = write_run(tmp_path / "a", {"alp": {"test": {"clean": 0.5}}})
    (run / ".roli-run").write_text("{}")
    for out, why in ((run / "rep", f"--out: {run / 'rep'} lies inside the run directory {run}; give a folder outside "
                                   "any run"),
                     (tmp_path / "a", f"--out: {tmp_path / 'a'} lies inside the run directory {run}; give a folder "
                                      "outside any run")):  # fmt: skip
        assert rep.main([str(run), "--out", str(out)]) == 2
        assert capsys.readouterr().err.strip() == f"{rep.prog('report')}: error: {why}"
    (run / ".roli-run").unlink()
    with pytest.raises(BadValue, match=f"--out: {run} is the run {run}; give a folder outside any run"):
        rep.check_out(run, [tmp_path / "b", run])
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.csv").write_text("run,stage,kind,method,x\n")
    rep.check_out(out, [run])  # roli's own: replaced
    (out / "report.png").write_bytes(b"png")
    rep.check_out(out, [run])
    (out / "report.md").write_text("| run | stage | kind | meth")  # cut short: not roli's
    with pytest.raises(BadValue) as e:
        rep.check_out(out, [run])
    assert str(e.value) == (f"--out: {out / 'report.md'} exists and is not a roli report; roli replaces only its own "
                            "reports: give another --out")  # fmt: skip
    (out / "report.md").unlink()
    (out / "report.md").symlink_to(out / "report.csv")
    with pytest.raises(BadValue, match="report.md exists and is not a roli report"):
        rep.check_out(out, [run])
    (out / "report.md").unlink()
    (out / "report.csv").unlink()
    with pytest.raises(BadValue) as e:
        rep.check_out(out, [run])
    assert (
        str(e.value) == f"--out: {out / 'report.png'} exists beside no roli report.csv: not roli's; give another --out"
    )
    (out / "report.png").unlink()
    (out / "report.png").symlink_to(tmp_path / "nothing")
    (out / "report.csv").write_text("run,stage,kind,method,x\n")
    with pytest.raises(BadValue, match="report.png exists beside no roli report.csv"):
        rep.check_out(out, [run])


@pytest.mark.parametrize("label", ["noequals", "=name", "DIR="])
def test_labels_must_name_a_run_and_a_name(tmp_path, capsys, label):
    run = write_run(tmp_path / "a", {"alp": {"test": {"clean": 0.5}}})
    assert rep.main([str(run), "--out", str(tmp_path / "rep"), "--label", label.replace("DIR", str(run))]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(f"--label: expected RUN_DIR=NAME; got {label.replace('DIR', str(run))!r}")
    )
    assert not (tmp_path / "rep").exists()


def test_a_label_names_its_run_however_the_path_is_written(tmp_path, capsys):
    run = write_run(tmp_path / "lr=0.1", {"alp": {"test": {"clean": 0.5}}})  # an '=' in the path: the last one splits
    label = f"--label={tmp_path}/./lr=0.1=cifar10/alp (shared by 2 configs)"
    assert rep.main([str(run) + "/", "--out", str(tmp_path / "rep"), label]) == 0
    assert [r["run"] for r in csv.DictReader(open(tmp_path / "rep" / "report.csv"))] == [
        "cifar10/alp (shared by 2 configs)"
    ]


def test_out_must_be_a_writable_folder(tmp_path, capsys, monkeypatch):
    run = write_run(tmp_path / "a", {"alp": {"test": {"clean": 0.5}}})
    (tmp_path / "f").write_text("x")
    for out, why in ((tmp_path / "f", f"--out: {tmp_path / 'f'} is a file; give a directory"),
                     (tmp_path / "f" / "sub", f"--out: cannot create {tmp_path / 'f' / 'sub'}: {tmp_path / 'f'} is a "
                                              "file; give a writable directory")):  # fmt: skip
        assert rep.main([str(run), "--out", str(out)]) == 2
        assert capsys.readouterr().err.strip().endswith(why)
    monkeypatch.setattr(rep.os, "access", lambda path, mode: mode != os.W_OK | os.X_OK)
    assert rep.main([str(run), "--out", str(tmp_path / "new" / "sub")]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            f"--out: cannot create {tmp_path / 'new' / 'sub'}: {tmp_path} is read-only; give a writable directory"
        )
    )
