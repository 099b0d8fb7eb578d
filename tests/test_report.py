"""python -m roli.report: one table (Markdown, CSV) of every stage of every run, and the Figure-1 style plot."""

from __future__ import annotations

import csv
import json

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
