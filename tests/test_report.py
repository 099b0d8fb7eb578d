"""python -m roli.report: one table (Markdown, CSV) of every stage of every run, and the Figure-1 style plot."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
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
    "broken": [1, 2],
    "RoLI-lora": {"test": {"clean": 0.8, "pgd10_reference": 0.39, "pgd10": 0.4, "autoattack": 0.35, "n": 1000,
                           "of": 1000}, "val": {"epoch": 7}},
    "odd val": {"test": {"clean": 0.1}, "val": [3]},
    "RanLI-lora": {"test": {"clean": 0.7, "pgd10": 0.3, "n": True}},
    "mine": {"dir": "ranli-ft", "test": {"clean": 0.6}},  # results.json names the folder
    "full": {"test": {"clean": 0.9}},
    "untested": {"val": {"epoch": 1}},
    "lp": {"test": {"clean": 0, "n": 50}},
}  # fmt: skip
METRICS = {"alp": ['{"seconds": 10.26, "images_per_s": 100}', "", '{"seconds": 30, "images_per_s": 200}',
                   '{"images_per_s": 50}', '{"seconds": 5}', '{"seconds": 0, "images_per_s": 0}', '{"seconds": -1}',
                   "not json", '{"seconds": true}', '{"images_per_s": NaN}', '{"seconds": Infinity}',
                   "[1]"]}  # fmt: skip


def test_each_stage_is_one_row_with_its_figures(tmp_path, capsys):
    run = write_run(tmp_path / "a", RESULTS, metrics=METRICS)
    with open(run / "alp" / "metrics.jsonl", "ab") as f:
        f.write(b'{"seconds": 1\xff\xfe}\n')  # not UTF-8: skipped, not a crash
    rows = rep.rows_of(run, "mine")
    blank = {c: None for c in rep.COLUMNS} | {"run": "mine"}
    assert rows == [
        blank | {"stage": "alp", "kind": "ALP", "method": "alp", "test clean": 0.5, "test PGD": 0.25,
                 "test PGD (ref. scoring)": 0.24, "test images": "100 of 1000 (partial)", "best epoch": 3, "epochs": 5,
                 "wall s": 45.3, "images/s": 155.2},  # 45.26 s; (10.26*100 + 30*200) / 45.26
        blank | {"stage": "RoLI-lora", "kind": "RoLI", "method": "lora", "test clean": 0.8, "test PGD": 0.4,
                 "test PGD (ref. scoring)": 0.39, "AutoAttack": 0.35, "test images": "1000", "best epoch": 7},
        blank | {"stage": "RanLI-lora", "kind": "RanLI", "method": "lora", "test clean": 0.7, "test PGD": 0.3},
        blank | {"stage": "mine", "kind": "RanLI", "method": "lora", "test clean": 0.6},
        blank | {"stage": "full", "kind": "FT", "method": "lora", "test clean": 0.9},
        blank | {"stage": "untested", "kind": "FT", "method": "lora", "best epoch": 1},
        blank | {"stage": "lp", "kind": "LP", "method": "lp", "test clean": 0, "test images": "50"},
    ]  # fmt: skip
    err = capsys.readouterr().err.splitlines()
    metrics, results = run / "alp" / "metrics.jsonl", run / "results.json"
    assert err == [f"report: skipped line {i} of {metrics}: not an epoch record of roli" for i in range(7, 14)] + [
        f"report: skipped 'broken' in {results}: not a stage record",
        f"report: skipped 'odd val' in {results}: not a stage record"]  # fmt: skip
    assert rep.rows_of(run)[0]["run"] == "a"


@pytest.mark.parametrize(
    "key, word",
    [("clean", "clean"), ("pgd10", "PGD"), ("pgd10_reference", "PGD reference scoring"), ("autoattack", "AutoAttack")],
)
def test_a_figure_that_is_no_accuracy_is_named_in_the_refusal(tmp_path, key, word):
    run = write_run(tmp_path / "a", {"RoLI-lora": {"test": {"clean": 0.5, key: 1.5}}})
    with pytest.raises(BadValue) as e:
        rep.rows_of(run)
    assert str(e.value) == (f"{run / 'results.json'}: RoLI-lora test {word} is 1.5, not an accuracy in [0, 1]: the "
                            "file was edited or is damaged")  # fmt: skip


def test_a_run_needs_both_files_each_an_object(tmp_path):
    run = tmp_path / "a"
    run.mkdir()
    (run / "results.json").write_text("{}")
    for text, why in ((None, f"{run} has no results.json and config.json: not a finished run of python -m roli.train"),
                      ("{", f"{run}: cannot read its results (Expecting property name enclosed in double quotes: "
                            "line 1 column 2 (char 1))"),
                      ("[]", f"{run}: results.json and config.json must each hold a JSON object")):  # fmt: skip
        if text is not None:
            (run / "config.json").write_text(text)
        with pytest.raises(BadValue) as e:
            rep.rows_of(run)
        assert str(e.value) == why
    (run / "config.json").write_text("{}")
    (run / "results.json").unlink()
    with pytest.raises(BadValue, match="has no results.json and config.json"):
        rep.rows_of(run)


@pytest.mark.parametrize(
    "label, folder, cfg, kind",
    [("RoLI-full", "ft", {}, "RoLI"), ("x", "roli-ft", {}, "RoLI"), ("x", "ranli-ft", {}, "RanLI"),
     ("full", "ft", {"init": "random"}, "RanLI"), ("full", "ft", {"init": "alp"}, "FT"), ("alp", "alp", {}, "ALP"),
     ("lp", "lp", {}, "LP"), ("pretrain", "pretrain", {}, "pretrain"), ("x", "other", {}, "FT")],
)  # fmt: skip
def test_each_stage_has_its_kind(label, folder, cfg, kind):
    assert rep._kind(label, folder, cfg) == kind


def test_cells_and_the_markdown_table():
    assert [rep._cell(v) for v in (None, 0.5, 1.0, 0.12345, 1, 1.5, 2.5, "x")] == [
        "-", "50.00%", "100.00%", "12.35%", "1", "1.5", "2.5", "x"]  # fmt: skip
    row = {c: None for c in rep.COLUMNS} | {"run": "a", "stage": "alp", "test clean": 0.5, "epochs": 2,
                                            "wall s": 0.5, "notes": "n", "AutoAttack": 0.35}  # fmt: skip
    assert rep.markdown([row]).splitlines() == [
        "| run | stage | kind | method | test clean | test PGD | test PGD (ref. scoring) | AutoAttack | test images "
        "| best epoch | epochs | wall s | images/s | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| a | alp | - | - | 50.00% | - | - | 35.00% | - | - | 2 | 0.5 | - | n |",
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
    record["checkpoint"] = "abc"  # not an object: names no best.pt
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


@pytest.mark.parametrize("value", [1.5, -0.1, float("nan"), float("inf"), True, "0.5", [0.5]])
def test_figures_that_are_not_accuracies_are_refused(value):
    for fine in (0, 0.0, 1, 1.0, 0.5, None):
        rep._accuracy(fine, "here")
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


def test_main_writes_the_table_the_csv_and_the_plot_into_out(tmp_path, capsys, monkeypatch):
    stages = {"alp": {"test": {"clean": 0.5, "pgd10": 0.25}},
              "RoLI-lora": {"test": {"clean": 0.8, "pgd10": 0.4, "autoattack": 0.35}}}  # fmt: skip
    run = write_run(tmp_path / "a", stages)
    monkeypatch.chdir(tmp_path)
    assert rep.main([str(run)]) == 0  # --out: here
    out = capsys.readouterr().out.splitlines()
    md = (tmp_path / "report.md").read_text()
    assert md == "\n".join(out[:-1]) + "\n" and len(md.splitlines()) == 4
    assert (
        md.splitlines()[3] == "| a | RoLI-lora | RoLI | lora | 80.00% | 40.00% | - | 35.00% | - | - | - | - | - | - |"
    )
    assert out[-1] == "written: report.md, report.csv, report.png"
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "report.csv", newline="") as f:
        text = f.read()
    assert text.splitlines()[0] == (
        "run,stage,kind,method,test clean,test PGD,test PGD (ref. scoring),AutoAttack,"
        "test images,best epoch,epochs,wall s,images/s,notes"
    )
    assert "\r\n" in text and "\r\r\n" not in text  # csv's own line ends, not doubled
    assert list(csv.DictReader(open(tmp_path / "report.csv")))[1]["AutoAttack"] == "0.35"
    nested = tmp_path / "reports" / "x" / "y"
    for _ in range(2):  # new nested folders, then over its own report
        assert rep.main([str(run), "--out", str(nested)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"written: {nested / 'report.md'}, {nested / 'report.csv'}, {nested / 'report.png'}")  # fmt: skip
    monkeypatch.setattr(rep, "plot", lambda rows, path: False)  # no matplotlib
    assert rep.main([str(run), "--out", str(nested)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"written: {nested / 'report.md'}, {nested / 'report.csv'} (no matplotlib: no plot)")  # fmt: skip


def test_the_plot_puts_each_stage_at_its_clean_and_robust_accuracy(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.axes
    import matplotlib.figure

    points, notes, texts = [], [], []
    scatter, annotate, text = matplotlib.axes.Axes.scatter, matplotlib.axes.Axes.annotate, matplotlib.figure.Figure.text
    monkeypatch.setattr(
        matplotlib.axes.Axes, "scatter", lambda self, *a, **k: points.append((a, k)) or scatter(self, *a, **k)
    )
    monkeypatch.setattr(
        matplotlib.axes.Axes, "annotate", lambda self, *a, **k: notes.append(a) or annotate(self, *a, **k)
    )
    monkeypatch.setattr(matplotlib.figure.Figure, "text", lambda self, *a, **k: texts.append(a) or text(self, *a, **k))
    row = {c: None for c in rep.COLUMNS} | {"run": "a"}
    rows = [row | {"stage": "RoLI-lora", "kind": "RoLI", "test clean": 0.8, "test PGD": 0.4, "AutoAttack": 0.35},
            row | {"stage": "RanLI-lora", "kind": "RanLI", "test clean": 0.7, "test PGD": 0.3},
            row | {"stage": "RoLI-bias", "kind": "RoLI", "test clean": 0.6, "test PGD": 0.2},
            row | {"stage": "lp", "kind": "LP", "test clean": 0.9},  # no robust figure: not drawn
            row | {"stage": "alp", "kind": "ALP", "test clean": 0.5, "test PGD": 0.25},
            row | {"stage": "lp2", "kind": "LP", "test clean": 0.4, "test PGD": 0.15},
            row | {"stage": "full", "kind": "FT", "test clean": 0.3, "test PGD": 0.1},
            row | {"stage": "pretrain", "kind": "pretrain", "test clean": 0.2, "test PGD": 0.0},
            row | {"stage": "x", "kind": "other", "test clean": 0.1, "test PGD": 0.05}]  # fmt: skip
    assert rep.plot(rows, tmp_path / "p.png") is True
    got = [(round(a[0], 9), round(a[1], 9), k["c"], k["marker"], k["label"]) for a, k in points]
    assert got == ([(80.0, 35.0, "tab:red", "o", "RoLI"), (70.0, 30.0, "tab:blue", "s", "RanLI"),
                                 (60.0, 20.0, "tab:red", "o", None), (50.0, 25.0, "tab:green", "^", "ALP"),
                                 (40.0, 15.0, "gray", "v", "LP"), (30.0, 10.0, "tab:purple", "D", "FT"),
                                 (20.0, 0.0, "black", "x", "pretrain"), (10.0, 5.0, "gray", ".", "other")])  # fmt: skip
    assert [(n[0], n[1]) for n in notes][::7] == [("1", (80.0, 35.0)), ("8", (10.0, 5.0))]
    assert texts[-1][2] == ("1  a: RoLI-lora\n2  a: RanLI-lora\n3  a: RoLI-bias\n4  a: alp\n5  a: lp2\n6  a: full\n"
                            "7  a: pretrain\n8  a: x")  # fmt: skip
    png = (tmp_path / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[16:24] == (1170).to_bytes(4, "big") + (546).to_bytes(4, "big")
    many = [row | {"stage": f"s{i}", "kind": "FT", "test clean": 0.5, "test PGD": 0.25} for i in range(45)]
    texts.clear()
    rep.plot(many, tmp_path / "p.png")
    key = texts[-1][2].splitlines()
    assert len(key) == 40 and key[38] == "39  a: s38" and key[39] == "... and 6 more (report.md)"
    texts.clear()
    rep.plot(many[:39] + [many[39] | {"run": "r" * 80}], tmp_path / "p.png")  # 40 fit; a long name is cut at 60
    key = texts[-1][2].splitlines()
    assert len(key) == 40 and key[39] == "40  " + "r" * 56
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed: no plot, no file
    (tmp_path / "p.png").unlink()
    assert rep.plot(rows, tmp_path / "p.png") is False and not (tmp_path / "p.png").exists()


def test_check_out_accepts_rolis_own_reports_only(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("| run | stage | kind | method | test clean |\n")
    (out / "report.csv").write_text("run,stage,kind,method,test clean\n")
    rep.check_out(out, [])
    (out / "report.csv").write_text("a,b\n1,2\n")
    with pytest.raises(BadValue, match="report.csv exists and is not a roli report"):
        rep.check_out(out, [])
    (out / "report.csv").unlink()
    (out / "report.md").write_bytes(b"\xff\xfe| run | stage")  # not UTF-8: not roli's, and no crash
    with pytest.raises(BadValue, match="report.md exists and is not a roli report"):
        rep.check_out(out, [])
    (out / "report.md").unlink()
    (out / "report.md").mkdir()
    with pytest.raises(BadValue, match="report.md exists and is not a roli report"):
        rep.check_out(out, [])
