"""roli grid: the plan (each distinct ALP stage once), runs equal to their configs run alone, resume, a failed
run reported while the others go on, bad input in one line, and the SLURM path through submitit (a stand-in
sbatch records what would be submitted; submitit's local executor runs it)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from roli.grid import alp_key, data_of, load_configs, main, parse_sets, plan
from roli.train import main as train

BASE = """model: vit_tiny_patch16_224
model_args: {img_size: 8, patch_size: 4, depth: 1, embed_dim: 48, num_heads: 2}
dataset: digits
classes: 0-4
eps: 0.1
step_size: 0.025
steps: 1
val_steps: 2
epochs: 2
warmup: 1
random_backbone: true
"""


def configs(folder: Path, **extra) -> dict[str, Path]:
    """roli_<peft> (ALP + finetuning) for lora and bias, roli_lora with RanLI beside it, ranli_lora."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, text in {
        "roli_lora": "method: roli\npeft: lora\n",
        "roli_bias": "method: roli\npeft: bias\ncompare_ranli: true\n",
        "ranli_lora": "method: ft\ninit: random\npeft: lora\nlr: 0.001\n",
        **extra,
    }.items():
        out[name] = folder / f"{name}.yaml"
        out[name].write_text(with_base(text))
    return out


def with_base(text: str) -> str:
    """BASE with the options of `text` in place of its own (a config file gives each option once)."""
    given = {line.split(":", 1)[0] for line in text.splitlines() if line.strip()}
    return "".join(line + "\n" for line in BASE.splitlines() if line.split(":", 1)[0] not in given) + text


def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def losses(stage: Path) -> list[float]:
    return [json.loads(line)["train_loss"] for line in (stage / "metrics.jsonl").read_text().splitlines()]


def test_the_plan_trains_each_distinct_alp_once(tmp_path, checkpoint):
    files = configs(
        tmp_path, roli_adapter="method: roli\npeft: adapter\n", roli_eps="method: roli\npeft: lora\neps: 0.05\n"
    )
    jobs = plan(load_configs([str(f) for f in files.values()], {}, False), tmp_path / "out")
    alps = [j for j in jobs if j.name.startswith("alp/")]
    assert len(alps) == 2  # lora, bias and adapter share one ALP; another budget is another ALP
    shared = next(j for j in alps if len(j.sources) == 3)
    assert sorted(shared.sources) == ["roli_adapter", "roli_bias", "roli_lora"]
    lora = next(j for j in jobs if j.name == "roli_lora")
    assert lora.cfg.method == "ft" and lora.deps == [shared.name] and lora.cfg.stage_name == "RoLI-lora"
    assert lora.cfg.init == str(tmp_path / "out" / shared.name / "alp" / "best.pt")
    ranli = next(j for j in jobs if j.name == "roli_bias-ranli")  # --compare-ranli: a run of its own
    assert ranli.cfg.init == "random" and ranli.cfg.stage_name == "RanLI-bias" and ranli.deps == []
    assert [j.name for j in jobs].index(shared.name) < [j.name for j in jobs].index("roli_lora")
    # the backbone's content, not its path, keys the ALP stage
    (copy := tmp_path / "copy.pt").write_bytes(Path(checkpoint).read_bytes())
    cfg = load_configs([str(files["roli_lora"])], {"random_backbone": False, "model": "roli.models.small:small_cnn",
                                                    "model_args": {}}, False)[0][1]  # fmt: skip
    data = data_of(cfg.data_spec)
    import dataclasses

    key = alp_key(dataclasses.replace(cfg, checkpoint=str(checkpoint)), data)
    assert alp_key(dataclasses.replace(cfg, checkpoint=str(copy)), data) == key
    copy.write_bytes(Path(checkpoint).read_bytes()[:-8] + b"\0" * 8)
    assert alp_key(dataclasses.replace(cfg, checkpoint=str(copy)), data) != key
    assert alp_key(dataclasses.replace(cfg, checkpoint=str(checkpoint), lr=1.0, peft="bias"), data) == key  # FT's
    assert alp_key(dataclasses.replace(cfg, checkpoint=str(checkpoint), alp={"lr": 1.0}), data) != key  # ALP's


def test_grid_runs_equal_their_configs_alone_and_resume(tmp_path, capsys):
    files = configs(tmp_path / "c")
    out = tmp_path / "grid"
    assert main([str(files[n]) for n in ("roli_lora", "roli_bias", "ranli_lora")] + ["--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "1 ALP stage(s) shared by 2 RoLI config(s)" in text and "5/5 runs finished" in text
    alp_dir = next((out / "alp").iterdir())
    for name in ("roli_lora", "roli_bias"):  # each config run alone, as a user would
        solo = tmp_path / f"solo-{name}"
        assert train(["--config", str(files[name]), "--run-dir", str(solo)]) == 0
        alone = results(solo)
        peft = name.split("_")[1]
        assert alone["alp"]["test"] == results(alp_dir)["alp"]["test"]
        assert alone[f"RoLI-{peft}"]["test"] == results(out / name)[f"RoLI-{peft}"]["test"]
        assert alone[f"RoLI-{peft}"]["val"] == results(out / name)[f"RoLI-{peft}"]["val"]
        assert losses(solo / "roli-ft") == losses(out / name / "roli-ft")  # every epoch, to the last bit
        assert losses(solo / "alp") == losses(alp_dir / "alp")
    assert losses(solo / "ranli-ft") == losses(out / "roli_bias-ranli" / "ranli-ft")
    cfg = json.loads((out / "roli_lora" / "config.json").read_text())
    assert cfg["init"] == str(alp_dir / "alp" / "best.pt") and cfg["stage_name"] == "RoLI-lora"
    report = (out / "report" / "report.csv").read_text()
    assert "roli_lora,RoLI-lora,RoLI,lora" in report and "roli_bias-ranli,RanLI-bias,RanLI,bias" in report
    # the same command again: nothing trains; an interrupted run resumes
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("best.pt")}
    assert main([str(files[n]) for n in ("roli_lora", "roli_bias", "ranli_lora")] + ["--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in out.rglob("best.pt")} == stamps
    before = results(out / "roli_bias")
    (out / "roli_bias" / "roli-ft" / "done.json").unlink()
    (out / "roli_bias" / "results.json").unlink()
    assert main([str(files[n]) for n in ("roli_lora", "roli_bias", "ranli_lora")] + ["--out", str(out)]) == 0
    log = (out / "roli_bias" / "train.log").read_text()
    assert "resumed ft from" in log  # continued from its last.pt, not trained again
    assert (out / "roli_bias" / "roli-ft" / "best.pt").stat().st_mtime_ns == stamps[
        out / "roli_bias" / "roli-ft" / "best.pt"
    ]
    assert results(out / "roli_bias")["RoLI-bias"]["test"] == before["RoLI-bias"]["test"]


def test_a_failed_run_is_reported_and_the_others_go_on(tmp_path, capsys):
    files = configs(tmp_path / "c", roli_bad="method: roli\npeft: lora\nrandom_backbone: false\n"
                                              "checkpoint: /nonexistent/robust.pt\n")  # fmt: skip
    out = tmp_path / "grid"
    assert main([str(files["roli_bad"]), str(files["ranli_lora"]), "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert "failed (exit 2)" in text and "roli_bad: skipped (alp/" in text and "ranli_lora: finished" in text
    assert "checkpoint" in (out / "logs").joinpath(next(p.name for p in (out / "logs").iterdir()
                                                        if p.name.startswith("alp"))).read_text()  # fmt: skip
    assert results(out / "ranli_lora")["ft (lora, init random)"]["test"]["n"] == 193


@pytest.mark.parametrize(
    "argv, pattern",
    [
        (["cifar10/roli_lorax"], "cifar10/roli_lorax is neither a file nor a shipped setting"),
        (["cifar10/roli_lora", "--set", "eps=0.1", "--set", "eps=0.2"], "--set: eps is set twice, to 0.1 and 0.2"),
        (["cifar10/roli_lora", "--set", "run_dir=x"], "--set: run_dir is the grid's to choose"),
        (["cifar10/roli_lora", "cifar10/roli_lora"], "cifar10/roli_lora is given twice"),
        (["cifar10/roli_lora", "--set", "epochs=0"], "epochs: must be an integer >= 1"),
    ],
)
def test_bad_grids_are_one_line_before_anything_starts(tmp_path, capsys, argv, pattern):
    out = tmp_path / "grid"
    assert main([*argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and pattern in err[0] and "Traceback" not in err[0], err
    assert not out.exists()


def test_parse_sets_reads_values_as_yaml():
    assert parse_sets(["epochs=3", "dataset=cifar10:~/d", "fold-bn=false", "alp={lr: 0.1}"]) == {
        "epochs": 3, "dataset": "cifar10:~/d", "fold_bn": False, "alp": {"lr": 0.1}}  # fmt: skip


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch) -> Path:
    """A stand-in sbatch (records each script, answers "Submitted batch job N") and srun on PATH."""
    pytest.importorskip("submitit")
    bin_dir, record = tmp_path / "bin", tmp_path / "submitted"
    bin_dir.mkdir()
    record.mkdir()
    sbatch = 'n=$(ls "$SBATCH_RECORD" | wc -l); id=$((1000 + n))\ncp "${@: -1}" "$SBATCH_RECORD/$id.sh"\n'
    (bin_dir / "sbatch").write_text(f'#!/bin/bash\n{sbatch}echo "Submitted batch job $id"\n')
    (bin_dir / "srun").write_text("#!/bin/bash\nexit 1\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SBATCH_RECORD", str(record))
    return record


def test_slurm_jobs_depend_on_their_alp_job(tmp_path, capsys, fake_slurm):
    files = configs(tmp_path / "c")
    out = tmp_path / "grid"
    argv = [str(files["roli_lora"]), str(files["roli_bias"]), "--out", str(out), "--launcher", "slurm",
            "--slurm-partition", "gpu", "--slurm-time", "120", "--gpus-per-run", "2"]  # fmt: skip
    assert main(argv) == 0
    scripts = {p.stem: p.read_text() for p in fake_slurm.iterdir()}
    assert sorted(scripts) == ["1000", "1001", "1002", "1003"]  # ALP, RoLI-lora, RoLI-bias, RanLI-bias
    assert "--dependency" not in scripts["1000"] and "#SBATCH --job-name=roli-alp-" in scripts["1000"]
    for job in ("1001", "1002"):
        assert "#SBATCH --dependency=afterok:1000" in scripts[job]
    assert all("#SBATCH --partition=gpu" in s and "#SBATCH --time=120" in s and "#SBATCH --gpus-per-node=2" in s
               for s in scripts.values())  # fmt: skip
    with open(out / "slurm" / "1001_submitted.pkl", "rb") as f:
        command = pickle.load(f).function.command
    assert command[-4:] == ["-m", "roli.train", "--config", str(out / "jobs" / "roli_lora.json")]
    assert "--nproc_per_node=2" in command
    assert not (out / "roli_lora").exists()  # nothing ran here


@pytest.mark.slow
def test_submitit_local_executor_runs_the_grid(tmp_path, capsys):
    pytest.importorskip("submitit")
    files = configs(tmp_path / "c")
    out = tmp_path / "grid"
    assert main([str(files["roli_lora"]), str(files["ranli_lora"]), "--out", str(out), "--launcher",
                 "submitit-local"]) == 0  # fmt: skip
    assert results(out / "roli_lora")["RoLI-lora"]["test"]["n"] == 193
    assert "3/3 runs finished" in capsys.readouterr().out
    shutil.rmtree(out / "slurm")


@pytest.mark.parametrize("fresh", [False, True], ids=["forked", "fresh-processes"])
def test_local_runs_get_one_gpu_each_and_the_same_figures_forked_or_fresh(tmp_path, monkeypatch, fresh):
    """Two runs at once on two (pretend) GPUs: each run's own process sees only its GPU (the line it writes
    from its environment), and a forked run computes what a new interpreter does."""
    import roli.grid as grid

    files = configs(tmp_path / "c")
    monkeypatch.setattr(grid, "visible_gpus", lambda: ["5", "7"])
    out = tmp_path / "grid"
    argv = [str(files["ranli_lora"]), str(files["roli_lora"]), "--out", str(out)]
    assert main(argv + (["--fresh-processes"] if fresh else [])) == 0
    logs = {p.name: p.read_text() for p in (out / "logs").iterdir()}
    seen = sorted(line.rsplit("=", 1)[1].rstrip(")") for text in logs.values() for line in text.splitlines()
                  if line.startswith("grid: ") and "CUDA_VISIBLE_DEVICES=" in line)  # fmt: skip
    assert len(seen) == 3 and set(seen) <= {"5", "7"} and len(set(seen)) == 2  # alp, then two at once
    assert all(("python" in t.splitlines()[0]) == fresh for t in logs.values())
    if fresh:  # the same figures as the forked runs of the other case, to the last bit
        solo = tmp_path / "solo"
        assert train(["--config", str(files["ranli_lora"]), "--run-dir", str(solo)]) == 0
        assert losses(out / "ranli_lora" / "ft") == losses(solo / "ft")
    assert results(out / "ranli_lora")["ft (lora, init random)"]["test"]["n"] == 193


def test_grid_out_is_its_own_locked_folder_and_an_edited_config_is_not_stale(tmp_path, capsys):
    """--out: never a folder a grid did not make; one grid at a time; a run whose config changed since it was
    trained is refused (naming --rerun-changed), then trained again with it: no stale figures."""
    from roli.rundir import RunLock

    files = configs(tmp_path / "c")
    mine = tmp_path / "paper"
    mine.mkdir()
    (mine / "report").mkdir()
    (mine / "grid.json").write_text("my own")
    assert main([str(files["ranli_lora"]), "--out", str(mine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a grid's folder" in err[0], err
    assert sorted(p.name for p in mine.iterdir()) == ["grid.json", "report"]
    out = tmp_path / "grid"
    assert main([str(files["ranli_lora"]), "--out", str(out)]) == 0
    assert (out / ".roli-grid").is_file()
    first = results(out / "ranli_lora")["ft (lora, init random)"]["test"]
    with RunLock(out, "roli grid", what="grid folder"):  # a grid still running on this --out
        capsys.readouterr()
        assert main([str(files["ranli_lora"]), "--out", str(out)]) == 2
        assert f"grid folder {out} is in use (pid" in capsys.readouterr().err
    files["ranli_lora"].write_text(files["ranli_lora"].read_text().replace("lr: 0.001", "lr: 0.05"))
    stamp = (out / "ranli_lora" / "results.json").read_bytes()
    assert main([str(files["ranli_lora"]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was trained with other settings (lr)" in err[0] and "--rerun-changed" in err[0], err
    assert (out / "ranli_lora" / "results.json").read_bytes() == stamp
    assert main([str(files["ranli_lora"]), "--out", str(out), "--rerun-changed"]) == 0
    assert json.loads((out / "ranli_lora" / "config.json").read_text())["lr"] == 0.05
    again = results(out / "ranli_lora")["ft (lora, init random)"]["test"]
    assert again != first  # trained again at the new rate, and the report shows it
    assert f"{again['clean'] * 100:.2f}" in (out / "report" / "report.md").read_text()


# run_slurm against a stand-in submitit (what each job asks SLURM for, exactly), and a forked run's body


class FakeSubmitit:
    """submitit's surface that run_slurm uses: executors recording their parameters, jobs numbered from 7."""

    def __init__(self):
        self.executors, self.waited = [], []
        fake = self

        class Executor:
            def __init__(self, folder):
                self.folder, self.params = folder, {}
                fake.executors.append(self)

            def update_parameters(self, **params):
                self.params |= params

            def submit(self, fn):
                self.command = fn.command
                me = self

                class Job:
                    job_id = 7 + len(fake.executors) - 1

                    def result(self):
                        fake.waited.append(me.command)

                return Job()

        self.SlurmExecutor = self.LocalExecutor = Executor

        class CommandFunction:
            def __init__(self, command):
                self.command = command

        self.helpers = type("helpers", (), {"CommandFunction": CommandFunction})


def slurm_args(**kw):
    import types

    return types.SimpleNamespace(**{"launcher": "slurm", "gpus_per_run": 1, "slurm_cpus": 8, "slurm_time": None,
                                    "slurm_partition": None, "trust_code": False} | kw)  # fmt: skip


def test_run_slurm_asks_for_each_jobs_resources_and_dependencies(tmp_path, capsys, monkeypatch):
    import sys

    from roli.grid import run_slurm

    fake = FakeSubmitit()
    monkeypatch.setitem(sys.modules, "submitit", fake)
    files = configs(tmp_path / "c")
    out = tmp_path / "grid"
    jobs = plan(load_configs([str(files["roli_lora"]), str(files["ranli_lora"])], {}, False), out)
    alp = jobs[0].name
    status = run_slurm(jobs, out, slurm_args(gpus_per_run=2, slurm_cpus=4, slurm_partition="gpu"))
    assert [e.folder for e in fake.executors] == [out / "slurm"] * 3
    common = {"gpus_per_node": 2, "ntasks_per_node": 1, "cpus_per_task": 4, "time": 1440, "partition": "gpu"}
    assert [e.params for e in fake.executors] == [
        {"job_name": f"roli-{alp.replace('/', '-')}", **common},
        {"job_name": "roli-roli_lora", **common, "additional_parameters": {"dependency": "afterok:7"}},
        {"job_name": "roli-ranli_lora", **common},
    ]
    assert fake.executors[1].command[-4:] == ["-m", "roli.train", "--config", str(out / "jobs" / "roli_lora.json")]
    assert {n: {k: v for k, v in s.items() if k != "job"} for n, s in status.items()} == {
        alp: {"status": "submitted", "job_id": "7"},
        "roli_lora": {"status": "submitted", "job_id": "8"},
        "ranli_lora": {"status": "submitted", "job_id": "9"},
    }
    assert capsys.readouterr().out.splitlines() == [f"grid: {alp}: submitted as job 7",
                                                    f"grid: roli_lora: submitted as job 8 (after {alp})",
                                                    "grid: ranli_lora: submitted as job 9"]  # fmt: skip
    assert fake.waited == []  # SLURM orders them itself

    done = jobs[0].run_dir  # the ALP run finished before: not submitted, and nothing waits for it
    (done / "alp").mkdir(parents=True)
    for rel in (".roli-run", "results.json", "alp/done.json"):
        (done / rel).write_text("{}")
    fake.executors.clear()
    status = run_slurm(jobs, out, slurm_args(slurm_time=30, trust_code=True))
    assert status[alp] == {"status": "done before"}
    assert [e.params for e in fake.executors] == [
        {"job_name": "roli-roli_lora", "gpus_per_node": 1, "ntasks_per_node": 1, "cpus_per_task": 8, "time": 30},
        {"job_name": "roli-ranli_lora", "gpus_per_node": 1, "ntasks_per_node": 1, "cpus_per_task": 8, "time": 30},
    ]
    assert fake.executors[0].command[-1] == "--trust-code"
    jobs[0].rerun = True  # --rerun-changed: trained again although done
    fake.executors.clear()
    run_slurm(jobs, out, slurm_args())
    assert len(fake.executors) == 3


def test_submitit_local_waits_for_a_shared_alp_before_its_finetuning(tmp_path, capsys, monkeypatch):
    import sys

    from roli.grid import run_slurm

    fake = FakeSubmitit()
    monkeypatch.setitem(sys.modules, "submitit", fake)
    files = configs(tmp_path / "c")
    jobs = plan(load_configs([str(files["roli_lora"]), str(files["ranli_lora"])], {}, False), tmp_path / "grid")
    run_slurm(jobs, tmp_path / "grid", slurm_args(launcher="submitit-local"))
    assert [e.params for e in fake.executors] == [{"timeout_min": 1440}] * 3
    assert fake.waited == [fake.executors[0].command]  # the ALP job only: the others have no dependents
    fake.executors.clear()
    run_slurm(jobs, tmp_path / "grid", slurm_args(launcher="submitit-local", slurm_time=5))
    assert [e.params for e in fake.executors] == [{"timeout_min": 5}] * 3
    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed
    with pytest.raises(ValueError) as e:
        run_slurm(jobs, tmp_path / "grid", slurm_args())
    assert str(e.value) == "--launcher slurm needs submitit: pip install submitit"


def _child(log: str) -> None:
    import sys

    from roli.grid import _train_in_child

    sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__  # fd 1 and 2, as in a forkserver's child (not pytest's)
    _train_in_child(["--epochs", "nonsense"], log, {"CUDA_VISIBLE_DEVICES": "3"}, "roli")


def test_a_forked_run_writes_its_header_and_errors_into_its_log(tmp_path):
    import multiprocessing

    log = tmp_path / "run.log"
    old = os.umask(0o022)
    try:
        proc = multiprocessing.get_context("fork").Process(target=_child, args=(str(log),))
        proc.start()
        proc.join(60)
    finally:
        os.umask(old)
    lines = log.read_text().splitlines()
    assert proc.exitcode == 2 and log.stat().st_mode & 0o777 == 0o644
    assert lines[0] == "grid: roli train --epochs nonsense (CUDA_VISIBLE_DEVICES=3)"
    assert lines[-1].startswith("roli train: error: argument --epochs")  # stderr too, named as the user typed it


# run_local with stand-in processes (which job runs when, on which GPUs, what is logged), and the small helpers


class FakePopen:
    """A finished `roli train` process: exit code from `codes` by the run's name; records argv and env."""

    started: list = []
    codes: dict = {}

    def __init__(self, argv, stdout, stderr, env):
        self.argv, self.env = argv, env
        flag = "--resume" if "--resume" in argv else "--config"
        self.name = Path(argv[argv.index(flag) + 1]).stem
        self.returncode, self.polls = None, 0
        self.alongside = sum(p.returncode is None for p in FakePopen.started)  # runs still going when it starts
        FakePopen.started.append(self)

    def poll(self):
        self.polls += 1  # running for one look, then done
        if self.polls > 1:
            self.returncode = FakePopen.codes.get(self.name, 0)
        return self.returncode


def finished(run: Path, stages=("alp",), seconds=(2.5, 1.5)) -> None:
    """A run directory as a finished run leaves it (marker, results.json, each stage's done.json and metrics)."""
    run.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        (run / stage).mkdir(parents=True, exist_ok=True)
        (run / stage / "done.json").write_text("{}")
        (run / stage / "metrics.jsonl").write_text("".join(json.dumps({"seconds": s}) + "\n" for s in seconds))
    (run / ".roli-run").write_text("{}")
    (run / "results.json").write_text("{}")


def local_jobs(tmp_path):
    files = configs(tmp_path / "c")
    out = tmp_path / "grid"
    return plan(load_configs([str(files[n]) for n in ("roli_lora", "roli_bias", "ranli_lora")], {}, False), out), out


def test_run_local_starts_jobs_after_their_dependencies_on_free_gpus(tmp_path, monkeypatch):
    from roli import grid

    monkeypatch.setattr(grid.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(grid.time, "sleep", lambda s: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    FakePopen.started, FakePopen.codes = [], {}
    jobs, out = local_jobs(tmp_path)
    alp = jobs[0].name
    lines = []
    status = grid.run_local(jobs, out, None, 2, False, log=lines.append)
    assert [(p.name, p.env["CUDA_VISIBLE_DEVICES"]) for p in FakePopen.started] == [
        (alp.replace("/", "__"), "4,5"),
        ("roli_bias-ranli", "6,7"),
        ("roli_lora", "4,5"),
        ("roli_bias", "6,7"),
        ("ranli_lora", "4,5"),
    ]  # fmt: skip  two slots of two GPUs; finetuning after its ALP
    assert FakePopen.started[0].argv[:6] == [grid.sys.executable, "-m", "torch.distributed.run", "--standalone",
                                             "--nproc_per_node=2", "-m"]  # fmt: skip
    assert {n: s["status"] for n, s in status.items()} == dict.fromkeys(
        [alp, "roli_bias-ranli", "roli_lora", "roli_bias", "ranli_lora"], "finished"
    )
    assert all(s["code"] == 0 and s["seconds"] >= 0 for s in status.values())
    assert lines[:2] == [f"grid: {alp}: started on GPU 4,5", "grid: roli_bias-ranli: started on GPU 6,7"]
    assert lines[2].startswith(f"grid: {alp}: finished in ") and lines[2].endswith(" s")
    log = (out / "logs" / f"{alp.replace('/', '__')}.log").read_text()
    assert log.splitlines()[0] == f"grid: {' '.join(FakePopen.started[0].argv)} (CUDA_VISIBLE_DEVICES=4,5)"
    assert max(p.alongside for p in FakePopen.started) == 1
    FakePopen.started = []
    grid.run_local(jobs, tmp_path / "again", 2, 1, False, log=lines.append, fresh=True)  # --jobs 2, 4 GPUs
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in FakePopen.started] == ["4", "5", "6", "7", "4"]
    assert max(p.alongside for p in FakePopen.started) == 1 and FakePopen.started[0].argv[1:3] == ["-m", "roli.train"]


def test_run_local_skips_what_depends_on_a_failed_run_and_keeps_finished_ones(tmp_path, monkeypatch):
    from roli import grid

    monkeypatch.setattr(grid.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(grid.time, "sleep", lambda s: None)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    jobs, out = local_jobs(tmp_path)
    alp = jobs[0].name
    FakePopen.started, FakePopen.codes = [], {alp.replace("/", "__"): 3}
    finished(out / "ranli_lora", stages=("ft",))
    lines = []
    status = grid.run_local(jobs, out, 1, 1, True, log=lines.append, fresh=True)
    assert [p.name for p in FakePopen.started] == [alp.replace("/", "__"), "roli_bias-ranli"]  # one at a time
    assert [p.argv[-1] for p in FakePopen.started] == ["--trust-code"] * 2
    assert [p.env["CUDA_VISIBLE_DEVICES"] for p in FakePopen.started] == ["", ""]  # the user's empty list, kept
    assert status["ranli_lora"] == {"status": "done before", "seconds": 4.0}
    assert status[alp] == {"status": "failed", "seconds": status[alp]["seconds"], "code": 3}
    for name in ("roli_lora", "roli_bias"):
        assert status[name] == {"status": "skipped", "why": f"{alp} failed", "seconds": 0.0}
    where = out / "logs" / f"{alp.replace('/', '__')}.log"
    assert f"grid: {alp}: failed (exit 3); see {where}" in lines
    assert f"grid: roli_lora: skipped ({alp} failed)" in lines and f"grid: {alp}: started" in lines


def test_a_jobs_state_and_its_train_arguments(tmp_path):
    from roli.grid import command, state_of, train_args

    jobs, out = local_jobs(tmp_path)
    byname = {j.name: j for j in jobs}
    alp, lora, ranli = jobs[0], byname["roli_lora"], byname["roli_bias-ranli"]
    assert [state_of(j) for j in (alp, lora, ranli)] == ["new"] * 3
    spec = out / "jobs" / f"{alp.name.replace('/', '__')}.json"
    assert train_args(alp, out, False) == ["--config", str(spec)]
    (alp.run_dir / "alp").mkdir(parents=True)
    (alp.run_dir / ".roli-run").write_text("{}")
    assert state_of(alp) == "partial" and train_args(alp, out, True) == ["--resume", str(alp.run_dir), "--trust-code"]
    finished(alp.run_dir)
    assert state_of(alp) == "done"
    alp.rerun = True
    assert train_args(alp, out, False) == ["--config", str(spec), "--overwrite"]
    finished(lora.run_dir, stages=("alp",))  # a RoLI finetuning run: its stage is roli-ft
    assert state_of(lora) == "partial"
    finished(lora.run_dir, stages=("roli-ft",))
    assert state_of(lora) == "done"
    finished(ranli.run_dir, stages=("roli-ft",))
    assert state_of(ranli) == "partial"
    finished(ranli.run_dir, stages=("ranli-ft",))
    assert state_of(ranli) == "done"
    (ranli.run_dir / "results.json").unlink()
    assert state_of(ranli) == "partial"
    assert command(lora, out, 1, False) == [grid_sys().executable, "-m", "roli.train", "--config",
                                            str(out / "jobs" / "roli_lora.json")]  # fmt: skip


def grid_sys():
    from roli import grid

    return grid.sys


def test_summarize_reports_finished_runs_and_the_time_saved(tmp_path, capsys, monkeypatch):
    from roli import grid

    jobs, out = local_jobs(tmp_path)
    byname = {j.name: j for j in jobs}
    alp = jobs[0]
    finished(alp.run_dir, seconds=(10.04, 20.0))  # shared by 3 configs: two trainings saved
    alp.sources.append("another")
    finished(byname["roli_lora"].run_dir, stages=("roli-ft",), seconds=(5.0,))
    reported = []
    monkeypatch.setattr("roli.report.main", lambda argv: reported.append(argv) or 0)
    status = {alp.name: {"status": "finished", "seconds": 31.0, "code": 0, "job": object()},
              "roli_bias": {"status": "failed", "seconds": 1.0, "code": 2},
              "ranli_lora": {"status": "skipped", "why": "x", "seconds": 0.0}}  # fmt: skip
    assert grid.summarize(jobs, status, out, 12.34) == 1
    assert capsys.readouterr().out.splitlines() == [
        "grid: 2/5 runs finished, 12 s wall; training time 35 s, 60 s saved by training each shared ALP stage once; "
        "failed: roli_bias, ranli_lora"]  # fmt: skip
    assert reported == [
        [
            str(alp.run_dir),
            str(byname["roli_lora"].run_dir),
            f"--label={alp.run_dir}=alp (shared by 3 configs)",
            f"--label={byname['roli_lora'].run_dir}=roli_lora",
            "--out",
            str(out / "report"),
        ]
    ]
    record = json.loads((out / "grid.json").read_text())
    assert record["status"][alp.name] == {"status": "finished", "seconds": 31.0, "code": 0}  # the job object left out
    assert (record["wall_seconds"], record["training_seconds"], record["saved_seconds"]) == (12.3, 35.0, 60.1)
    assert record["runs"]["roli_lora"] == {"dir": str(byname["roli_lora"].run_dir), "state": "done",
                                           "deps": [alp.name], "configs": ["roli_lora"]}  # fmt: skip
    assert grid.summarize(jobs, {}, out, 1) == 0
    assert capsys.readouterr().out.splitlines()[-1].endswith("60 s saved by training each shared ALP stage once")


def test_labels_of_shared_alp_stages(tmp_path):
    from roli.grid import Job, label

    job = Job("alp/abc", None, sources=["cifar10/roli_lora", "cifar10/roli_bias", "pets/roli_lora"])
    assert label(job) == "cifar10+pets/alp (shared by 3 configs)"
    assert label(Job("alp/abc", None, sources=["my_run"])) == "alp"
    assert label(Job("alp/abc", None, sources=["a/x"])) == "a/alp"
    assert label(Job("cifar10/roli_lora", None)) == "cifar10/roli_lora"


def test_seconds_of_a_run_skip_damaged_lines(tmp_path):
    from roli.grid import Job, _seconds

    job = Job("x", type("Cfg", (), {"run_dir": str(tmp_path)})())
    (tmp_path / "alp").mkdir()
    (tmp_path / "alp" / "metrics.jsonl").write_text('{"seconds": 1.5}\nnot json\n[1]\n{"other": 1}\n{"seconds": 2}\n')
    (tmp_path / "ft").mkdir()
    (tmp_path / "ft" / "metrics.jsonl").write_text('{"seconds": "0.5"}\n')
    assert _seconds(job) == 4.0


def test_a_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    files = configs(tmp_path / "c")
    out = tmp_path / "grid"
    assert (
        main([str(files[n]) for n in ("roli_lora", "roli_bias", "ranli_lora")] + ["--out", str(out), "--dry-run"]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    alp = lines[1].split(":")[0].strip()
    assert lines == [
        f"grid: 5 runs in {out}; 1 ALP stage(s) shared by 2 RoLI config(s)",
        f"  {alp}: alp -> {out / alp} [new]",
        f"  roli_lora: ft -> {out / 'roli_lora'} [new] (after {alp})",
        f"  roli_bias: ft -> {out / 'roli_bias'} [new] (after {alp})",
        f"  roli_bias-ranli: ft -> {out / 'roli_bias-ranli'} [new]",
        f"  ranli_lora: ft -> {out / 'ranli_lora'} [new]",
    ]
    assert alp.startswith("alp/") and not out.exists()


def refused(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0].split(": error: ", 1)[1]


def test_grid_options_are_checked_before_anything_is_written(tmp_path, capsys, monkeypatch):
    files = configs(tmp_path / "c")
    run = [str(files["ranli_lora"]), "--out", str(tmp_path / "grid")]
    for extra in (["--jobs", "0"], ["--gpus-per-run", "0"]):
        assert refused(capsys, run + extra) == "--jobs and --gpus-per-run must be >= 1"
    (tmp_path / "afile").write_text("x")
    assert refused(capsys, [str(files["ranli_lora"]), "--out", str(tmp_path / "afile")]) == (
        f"--out: {tmp_path / 'afile'} is a file; give a directory")  # fmt: skip
    assert refused(capsys, run + ["--launcher", "slurm", "--slurm-time", "0"]) == (
        "--slurm-time: 0 is not a number of minutes >= 1")  # fmt: skip
    assert (
        refused(capsys, run + ["--launcher", "slurm", "--slurm-cpus", "0"]) == "--slurm-cpus: 0 is not a CPU count >= 1"
    )
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert refused(capsys, run + ["--launcher", "submitit-local"]) == (
        "--launcher submitit-local needs submitit: pip install submitit (or --launcher local)")  # fmt: skip
    assert main(run + ["--dry-run"]) == 0  # local needs none of it
    assert not (tmp_path / "grid").exists()


def test_changed_runs_names_the_keys_and_what_comes_after(tmp_path):
    from roli.grid import changed_runs

    jobs, out = local_jobs(tmp_path)
    byname = {j.name: j for j in jobs}
    alp, lora = jobs[0], byname["roli_lora"]
    assert changed_runs(jobs) == []
    for job, edits in ((alp, {"eps": 0.2, "steps": 3, "device": "cuda"}), (byname["ranli_lora"], {})):
        job.run_dir.mkdir(parents=True)
        (job.run_dir / ".roli-run").write_text("{}")
        (job.run_dir / "config.json").write_text(json.dumps(job.cfg.to_dict() | edits))
    lora.run_dir.mkdir(parents=True)
    (lora.run_dir / ".roli-run").write_text("{}")  # started, no config.json yet: not compared
    assert [(j.name, keys) for j, keys in changed_runs(jobs)] == [(alp.name, ["eps", "steps"])]  # device: execution
    (lora.run_dir / "config.json").write_text(json.dumps(lora.cfg.to_dict()))
    assert [(j.name, keys) for j, keys in changed_runs(jobs)] == [(alp.name, ["eps", "steps"]),
                                                                  ("roli_lora", [f"after {alp.name}"])]  # fmt: skip
    (byname["ranli_lora"].run_dir / "config.json").write_text("{ damaged")
    assert ("ranli_lora" in [j.name for j, _ in changed_runs(jobs)]) is True  # unreadable: every setting differs


def test_out_is_new_empty_or_a_grids_own(tmp_path, capsys):
    from roli.grid import check_out, open_out

    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError) as e:
        check_out(tmp_path / "dangling")
    assert str(e.value) == (f"--out: {tmp_path / 'dangling'} is a symlink to {tmp_path / 'nowhere'}, which does not "
                            "exist; create that folder or give another --out")  # fmt: skip
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's")
    with pytest.raises(ValueError) as e:
        check_out(mine)
    assert str(e.value) == (f"--out: {mine} holds files and is not a grid's folder (it has no .roli-grid); roli "
                            "writes a grid only into a new folder or its own: choose another --out")  # fmt: skip
    for record in ('{"runs": {}, "status": {}}', "[1]", "{"):  # not an earlier grid's record
        (mine / "grid.json").write_text(record)
        with pytest.raises(ValueError, match="is not a grid's folder"):
            check_out(mine)
    (mine / "grid.json").write_text('{"runs": {}, "status": {}, "wall_seconds": 1}')  # an earlier roli's grid
    check_out(mine)
    open_out(mine).release()
    assert json.loads((mine / ".roli-grid").read_text())["created_by"] == "roli grid"  # made this roli's
    (mine / "link").symlink_to(tmp_path)
    with pytest.raises(ValueError, match="holds a symlink roli did not make"):
        check_out(mine)
    (tmp_path / "empty").mkdir()
    open_out(tmp_path / "empty").release()
    assert (tmp_path / "empty" / ".roli-grid").is_file()
    with open(tmp_path / "empty" / ".roli-manifest.jsonl", "a") as f:
        f.write(json.dumps({"tmp": ".grid.json.k1.tmp"}) + "\n")
    (tmp_path / "empty" / ".grid.json.k1.tmp").write_text("a killed write")
    (tmp_path / "empty" / ".notes.k2.tmp").write_text("a user's")
    open_out(tmp_path / "empty").release()
    assert sorted(p.name for p in (tmp_path / "empty").iterdir() if p.name.endswith(".tmp")) == [".notes.k2.tmp"]


def test_grid_helpers_word_for_word(tmp_path, capsys, monkeypatch):
    from roli import grid

    files = configs(tmp_path / "c")
    run = [str(files["ranli_lora"]), "--out", str(tmp_path / "grid"), "--dry-run"]
    assert main(run + ["--launcher", "slurm", "--slurm-time", "1", "--slurm-cpus", "1"]) == 0  # the least accepted
    assert grid._header(["roli", "train", "--config", "x.json"], {}) == "grid: roli train --config x.json"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
    assert grid.visible_gpus() == ["0", "1"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, ,5")
    assert grid.visible_gpus() == ["3", "5"]
    jobs, out = local_jobs(tmp_path)
    grid.write_specs(jobs, out)
    for job in jobs:
        spec = out / "jobs" / (job.name.replace("/", "__") + ".json")
        assert json.loads(spec.read_text()) == json.loads(json.dumps(job.cfg.to_dict()))
    assert grid.label(grid.Job("alp/k", None, sources=["a/b/x", "a/b/y"])) == "a/b/alp (shared by 2 configs)"
    lock = grid.open_out(tmp_path / "new")
    assert json.loads((tmp_path / "new" / ".roli-grid").read_text()) == {
        "created_by": "roli grid", "note": "roli grid writes into and reruns only folders holding this"}  # fmt: skip
    assert (tmp_path / "new" / ".roli-lock").read_text() == f"pid {os.getpid()}: roli grid"
    lock.release()
    (tmp_path / "new" / "report").mkdir()  # no longer empty: taken under its lock
    lock = grid.open_out(tmp_path / "new")
    assert (tmp_path / "new" / ".roli-lock").read_text() == f"pid {os.getpid()}: roli grid"
    with pytest.raises(ValueError) as e:
        grid.open_out(tmp_path / "new")
    assert str(e.value) == (f"grid folder {tmp_path / 'new'} is in use (pid {os.getpid()}: roli grid); wait for it "
                            "to finish, or use another --out")  # fmt: skip
    lock.release()


def test_run_local_slots_without_gpus_and_chained_skips(tmp_path, monkeypatch):
    from roli import grid

    monkeypatch.setattr(grid.subprocess, "Popen", FakePopen)
    monkeypatch.setattr(grid.time, "sleep", lambda s: None)
    jobs, out = local_jobs(tmp_path)
    for gpus, n_jobs, at_once in (("", None, 0), ("", 2, 1), ("0", None, 0), ("0,1", 1, 0)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", gpus)
        FakePopen.started, FakePopen.codes = [], {}
        grid.run_local(jobs, out, n_jobs, 1, False, log=lambda line: None, fresh=True)  # again into the same out
        assert len(FakePopen.started) == 5 and max(p.alongside for p in FakePopen.started) == at_once, (gpus, n_jobs)
    byname = {j.name: j for j in jobs}
    byname["roli_bias"].deps = ["roli_lora"]  # a chain: ALP -> roli_lora -> roli_bias
    FakePopen.started, FakePopen.codes = [], {jobs[0].name.replace("/", "__"): 1}
    status = grid.run_local(jobs, out, 1, 1, False, log=lambda line: None, fresh=True)
    assert status["roli_bias"] == {"status": "skipped", "why": "roli_lora failed", "seconds": 0.0}
    assert sorted(p.name for p in FakePopen.started) == [jobs[0].name.replace("/", "__"), "ranli_lora",
                                                         "roli_bias-ranli"]  # fmt: skip


@pytest.mark.parametrize(
    "method, init, stage_name, ranli, stages",
    [("pretrain", "alp", None, False, ["pretrain"]), ("lp", "alp", None, False, ["lp"]),
     ("alp", "alp", None, False, ["alp"]), ("roli", "alp", None, False, ["alp", "roli-ft"]),
     ("roli", "alp", None, True, ["alp", "roli-ft", "ranli-ft"]), ("ft", "lp", None, False, ["lp", "ft"]),
     ("ft", "alp", None, False, ["alp", "ft"]), ("ft", "random", None, False, ["ft"]),
     ("ft", "/x/best.pt", "RoLI-lora", False, ["roli-ft"]), ("ft", "random", "RanLI-lora", False, ["ranli-ft"])],
)  # fmt: skip
def test_a_run_is_done_when_each_of_its_stages_is(tmp_path, method, init, stage_name, ranli, stages):
    import types

    from roli.grid import Job, state_of

    cfg = types.SimpleNamespace(method=method, init=init, stage_name=stage_name, compare_ranli=ranli,
                                run_dir=str(tmp_path / "run"))  # fmt: skip
    job = Job("x", cfg)
    for missing in stages:  # every stage but one done: unfinished
        finished(tmp_path / "run", stages=[s for s in stages if s != missing])
        assert state_of(job) == "partial", missing
        for s in stages:
            (tmp_path / "run" / s / "done.json").unlink(missing_ok=True)
    finished(tmp_path / "run", stages=stages)
    assert state_of(job) == "done"


def test_the_plan_of_an_alp_config_and_of_clashing_names(tmp_path):
    from roli.grid import data_of

    files = configs(tmp_path / "c", alp_only="method: alp\n", plain="method: ft\ninit: random\npeft: bias\n")
    jobs = plan(load_configs([str(files[n]) for n in ("alp_only", "roli_lora", "plain")], {}, False), tmp_path / "o")
    assert [(j.name.split("/")[0], j.sources, j.deps) for j in jobs] == [
        ("alp", ["alp_only", "roli_lora"], []),
        ("roli_lora", ["roli_lora"], [jobs[0].name]),
        ("plain", ["plain"], []),
    ]  # fmt: skip  the ALP config is the shared stage itself: no run of its own
    assert len(jobs[0].name.split("/")[1]) == 12
    ranli = plan(load_configs([str(files["roli_bias"])], {}, False), tmp_path / "o")[-1]
    assert (ranli.name, ranli.sources) == ("roli_bias-ranli", ["roli_bias"])
    clash = configs(tmp_path / "d", **{"roli_bias-ranli": "method: ft\ninit: random\npeft: lora\n"})
    with pytest.raises(ValueError) as e:
        plan(load_configs([str(clash["roli_bias"]), str(clash["roli_bias-ranli"])], {}, False), tmp_path / "o")
    assert str(e.value) == (f"roli_bias-ranli and roli_bias-ranli would share the run directory "
                            f"{tmp_path / 'o' / 'roli_bias-ranli'}; give the configs different names")  # fmt: skip
    cfg = load_configs([str(files["plain"])], {}, False)[0][1]
    assert sorted(data_of(cfg.data_spec)) == ["classes", "num_classes", "test", "train", "val"]
    with pytest.raises(ValueError, match=r"^--set: method is the grid's to choose"):
        parse_sets(["method=ft"])
    bad = configs(tmp_path / "e", bad="method: roli\ninit: random\npeft: lora\n")["bad"]
    with pytest.raises(ValueError, match=r"^init: --method roli finetunes from the ALP head; got --init random"):
        load_configs([str(bad)], {}, False)  # the config's own check (TrainConfig), before the grid's plan


class TrainingPopen(FakePopen):
    """A `roli train` process that leaves its run finished (marker, stages, config.json as its spec) when it exits
    0: what main goes on with, without training."""

    def poll(self):
        code = super().poll()
        if code == 0 and "--config" in self.argv:
            spec = json.loads(Path(self.argv[self.argv.index("--config") + 1]).read_text())
            run = Path(spec["run_dir"])
            name = spec.get("stage_name") or ""
            stage = "alp" if spec["method"] == "alp" else {"RoLI": "roli-ft", "RanLI": "ranli-ft"}.get(name[:4], "ft")
            finished(run, stages=(stage,))
            (run / "config.json").write_text(json.dumps(spec))
        return code


def test_main_launches_reports_and_refuses_changed_runs(tmp_path, monkeypatch, capsys):
    from roli import grid

    monkeypatch.setattr(grid.subprocess, "Popen", TrainingPopen)
    monkeypatch.setattr(grid.time, "sleep", lambda s: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    FakePopen.started, FakePopen.codes = [], {"ranli_lora": 3}
    files = configs(tmp_path / "c")
    out = tmp_path / "grid"
    argv = [str(files[n]) for n in ("roli_lora", "ranli_lora")] + ["--out", str(out), "--fresh-processes"]
    assert main(argv) == 1  # one run failed
    text = capsys.readouterr().out
    assert "grid: 2/3 runs finished, " in text and text.rstrip().endswith("; failed: ranli_lora")
    names = [p.name for p in FakePopen.started]  # the spec files' names: alp__<key>, then the two after it
    assert len(names) == 3 and names[0].startswith("alp__") and sorted(names[1:]) == ["ranli_lora", "roli_lora"]
    record = json.loads((out / "grid.json").read_text())
    assert 0 <= record["wall_seconds"] < 600  # this call's own seconds
    failed = record["status"]["ranli_lora"]
    assert (failed["status"], failed["code"], sorted(failed)) == ("failed", 3, ["code", "seconds", "status"])
    assert {n: r["state"] for n, r in record["runs"].items()} == {
        next(n for n in record["runs"] if n.startswith("alp/")): "done",
        "roli_lora": "done",
        "ranli_lora": "new",
    }
    # the failed one again: it alone trains (the others are done)
    FakePopen.started, FakePopen.codes = [], {}
    assert main(argv) == 0
    assert [p.name for p in FakePopen.started] == ["ranli_lora"]
    assert "grid: 3/3 runs finished, " in capsys.readouterr().out
    # a config changed in five settings since its run: refused, naming four and "..."
    text = files["ranli_lora"].read_text()
    for old, new in (("eps: 0.1", "eps: 0.2"), ("steps: 1", "steps: 2"), ("val_steps: 2", "val_steps: 3"),
                     ("epochs: 2", "epochs: 3"), ("lr: 0.001", "lr: 0.002")):  # fmt: skip
        text = text.replace(old, new)
    files["ranli_lora"].write_text(text)
    assert main([*argv, "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"python -m roli.grid: error: ranli_lora: {out / 'ranli_lora'} was trained with other settings (epochs, eps, "
        "lr, steps ...) than its config now gives; pass --rerun-changed to train it again (its outputs are replaced), "
        "or restore the config"
    )
    assert main([*argv, "--dry-run", "--rerun-changed"]) == 0
    assert f"  ranli_lora: ft -> {out / 'ranli_lora'} [changed: trained again]" in capsys.readouterr().out.splitlines()
    with pytest.raises(SystemExit):
        main([*argv, "--jobs", "x"])
    capsys.readouterr()
    for bad in (["--jobs", "0"], ["--gpus-per-run", "0"]):
        assert main([*argv, *bad]) == 2
        assert capsys.readouterr().err.strip() == "python -m roli.grid: error: --jobs and --gpus-per-run must be >= 1"
    (tmp_path / "file").write_text("x")
    assert main([str(files["ranli_lora"]), "--out", str(tmp_path / "file")]) == 2
    assert capsys.readouterr().err.strip().endswith(f"--out: {tmp_path / 'file'} is a file; give a directory")


def test_main_passes_trust_code_on_and_keeps_one_grid_per_folder(tmp_path, monkeypatch, capsys):
    """--trust-code reaches every run; a model typed with --set names code the user typed, so it is trusted too;
    four changed settings are named without "..."; --jobs 1 is a number of jobs; a grid folder in use is one line."""
    from roli import grid
    from roli.rundir import RunLock

    monkeypatch.setattr(grid.subprocess, "Popen", TrainingPopen)
    monkeypatch.setattr(grid.time, "sleep", lambda s: None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    (tmp_path / "usernet.py").write_text("from roli.models.small import small_cnn as make\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    files = configs(tmp_path / "c")
    out = tmp_path / "grid"
    argv = [str(files["ranli_lora"]), "--out", str(out), "--fresh-processes", "--jobs", "1"]
    for i, (extra, trusted) in enumerate(
        (([], False), (["--trust-code"], True), (["--set", "model=usernet:make"], True))
    ):
        FakePopen.started, FakePopen.codes = [], {}
        assert main([*argv, *extra, "--out", str(tmp_path / f"grid{i}")]) == 0
        (proc,) = FakePopen.started
        assert ("--trust-code" in proc.argv) == trusted, (extra, proc.argv)
    assert main(argv) == 0
    coded = tmp_path / "c" / "coded.yaml"  # a config file naming code: refused, unless --trust-code
    coded.write_text(files["ranli_lora"].read_text().replace("model: vit_tiny_patch16_224", "model: usernet:make"))
    capsys.readouterr()
    assert main([str(coded), "--out", str(tmp_path / "coded"), "--dry-run"]) == 2
    assert "would import and run that code" in capsys.readouterr().err
    assert main([str(coded), "--out", str(tmp_path / "coded"), "--dry-run", "--trust-code"]) == 0
    capsys.readouterr()
    text = files["ranli_lora"].read_text()
    for old, new in (("eps: 0.1", "eps: 0.2"), ("steps: 1", "steps: 2"), ("epochs: 2", "epochs: 3"),
                     ("lr: 0.001", "lr: 0.002")):  # fmt: skip
        text = text.replace(old, new)
    files["ranli_lora"].write_text(text)
    assert main([*argv, "--dry-run"]) == 2
    assert "(epochs, eps, lr, steps) than its config now gives" in capsys.readouterr().err
    with RunLock(out, "roli grid", what="grid folder"):  # another grid working in this folder
        assert main([*argv, "--rerun-changed"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"python -m roli.grid: error: grid folder {out} is in use (pid ")
