"""A newcomer's first hour: `import roli` then timm, the `roli` command, --device auto, the refusals before
anything is written, the shipped configs by name, where outputs go, the public API and the README's own
loop example, run as written."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import roli
from roli import cli
from roli.train import main as train

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
QUICK = ["--dataset", "digits", "--classes", "0-4", "--eps", "0.1", "--step-size", "0.05", "--steps", "1",
         "--val-steps", "1", "--epochs", "1", "--warmup", "0"]  # fmt: skip


def _run(args, cwd=None, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=cwd, env=env, **kw)


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def tree(path: Path) -> dict[str, str]:
    """Every file under path with the hash of its content."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*"))
            if p.is_file()}  # fmt: skip


# 1. timm and torchvision after `import roli`


def test_timm_and_torchvision_import_after_import_roli():
    bare = _run([sys.executable, "-c", "import torchvision"])
    if bare.returncode == 0:
        pytest.skip("torchvision imports here on its own: the workaround has nothing to fix")
    assert "torchvision::nms does not exist" in bare.stderr  # the one error the workaround is for
    code = ("import roli, timm, torchvision, torchvision.transforms as T\n"
            "m = timm.create_model('resnet18', num_classes=3).eval()\n"
            "import torch\nprint(tuple(m(torch.rand(1, 3, 32, 32)).shape), T.Resize.__name__)")  # fmt: skip
    out = _run([sys.executable, "-c", code])
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["(1,", "3)", "Resize"]
    nms = _run([sys.executable, "-c", "import roli, torch, torchvision\ntorchvision.ops.nms(torch.rand(2, 4), "
                "torch.rand(2), 0.5)"])  # fmt: skip
    assert nms.returncode != 0  # the declared operator has no kernel: a call still fails loudly


def test_the_hook_leaves_other_imports_and_errors_alone():
    from roli import _compat

    finder = next(f for f in sys.meta_path if isinstance(f, _compat._TorchvisionFinder))
    assert finder.find_spec("json", None) is None and finder.find_spec("torchvision.ops", None) is None

    class Boom:
        def create_module(self, spec):
            return None

        def exec_module(self, module):
            raise RuntimeError("some other failure")

    with pytest.raises(RuntimeError, match="some other failure"):  # only the exact nms error is retried
        _compat._RetryingLoader(Boom()).exec_module(object())


# 2. the console command


def test_console_command_dispatches_to_the_same_programs(capsys):
    assert cli.main([]) == 0
    usage = capsys.readouterr().out
    assert all(f"  {name} " in usage for name in cli.COMMANDS)
    assert cli.main(["nope"]) == 2
    assert one_line(capsys.readouterr().err).startswith("roli: error: 'nope' is not a command")
    assert cli.main(["zoo", "ares_swin_b"]) == 0
    assert "ARES_Swin_base_patch4_window7_224_AT.pth" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # every program parses its options, info too
        cli.main(["info", "--foo"])
    assert e.value.code == 2
    assert one_line(capsys.readouterr().err) == "roli info: error: unrecognized arguments: --foo"


def test_installed_roli_script_runs():
    script = shutil.which("roli", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("no roli console script next to this Python (not pip-installed)")
    out = _run([script, "train", "--list-configs"], cwd="/")
    assert out.returncode == 0 and "cifar10/roli_lora" in out.stdout.splitlines(), out.stderr
    out = _run([sys.executable, "-m", "roli", "evaluate", "--stage", "alp"], cwd="/")
    assert out.returncode == 2 and one_line(out.stderr) == "roli evaluate: error: --stage goes with --run"


# 3. --device auto


@pytest.mark.parametrize("cuda", [False, True])
def test_device_auto_picks_cuda_where_available(monkeypatch, cuda):
    from roli.config import TrainConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert TrainConfig().device == ("cuda" if cuda else "cpu")
    assert TrainConfig(device="auto").device == ("cuda" if cuda else "cpu")
    assert TrainConfig(device="cpu").device == "cpu"  # asked for: kept


def test_train_logs_the_device_and_where_outputs_go(tmp_path, capsys):
    run = tmp_path / "r"
    assert train(["--method", "pretrain", *QUICK, "--run-dir", str(run)]) == 0
    captured = capsys.readouterr()
    assert f"run directory: {run}; device: cpu" in captured.err
    assert f"outputs: {run} (results.json" in captured.out.splitlines()[-1]
    assert json.loads((run / "config.json").read_text())["device"] == "cpu"  # recorded resolved


# 4. and 5. refusals before anything is written


@pytest.mark.parametrize("method", ["lp", "alp", "ft", "roli"])
def test_transfer_from_a_random_backbone_is_refused_unless_meant(tmp_path, capsys, method):
    run = tmp_path / "r"
    assert train(["--method", method, *QUICK, "--run-dir", str(run)]) == 2
    line = one_line(capsys.readouterr().err)
    assert f"--method {method} would transfer from a random backbone" in line and "--random-backbone" in line
    assert not run.exists()


def test_random_backbone_flag_runs_and_conflicts_are_refused(tmp_path, capsys, checkpoint):
    assert train(["--method", "alp", *QUICK, "--random-backbone", "--run-dir", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "config.json").read_text())["random_backbone"] is True
    capsys.readouterr()
    bad = [(["--random-backbone", "--checkpoint", str(checkpoint)], "random-backbone: cannot go with --checkpoint"),
           (["--pretrained"], "pretrained: timm's own weights exist for timm names only")]  # fmt: skip
    for extra, message in bad:
        run = tmp_path / "b"
        assert train(["--method", "alp", *QUICK, "--model", "roli.models.small:small_cnn", *extra, "--run-dir",
                      str(run)]) == 2  # fmt: skip
        assert message in one_line(capsys.readouterr().err) and not run.exists()
    # pretrain trains the backbone itself: no flag needed
    assert train(["--method", "pretrain", *QUICK, "--run-dir", str(tmp_path / "p")]) == 0


def test_a_vit_at_another_size_is_refused_naming_img_size(tmp_path, capsys):
    run = tmp_path / "vit"
    argv = ["--method", "ft", "--peft", "lora", "--init", "random", "--model", "vit_tiny_patch16_224", "--model-arg",
            "depth=1", "--input-size", "32", "--random-backbone", *QUICK, "--run-dir", str(run)]  # fmt: skip
    assert train(argv) == 2
    line = one_line(capsys.readouterr().err)
    assert "takes 224x224 images and gets 32x32" in line and "--model-arg img_size=32" in line
    assert not run.exists()
    # the fix the line names works
    assert train([*argv[:-2], "--model-arg", "img_size=32", "--model-arg", "patch_size=8", "--run-dir",
                  str(run)]) == 0  # fmt: skip


def test_a_model_that_fails_on_the_data_is_refused_before_writing(tmp_path, capsys):
    run = tmp_path / "r"  # digits are greyscale: a 3-channel normalisation inside the model cannot take them
    assert train(["--method", "alp", *QUICK, "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2", "--random-backbone",
                  "--run-dir", str(run)]) == 2  # fmt: skip
    line = one_line(capsys.readouterr().err)
    assert line.startswith("python -m roli.train: error: model: roli.models.small:small_cnn fails on one 1x8x8 image")
    assert not run.exists()


def test_warmup_longer_than_the_run_names_the_fix(tmp_path, capsys):
    assert train(["--method", "pretrain", *QUICK, "--epochs", "4", "--warmup", "10", "--run-dir", str(tmp_path)]) == 2
    assert one_line(capsys.readouterr().err).endswith(
        "warmup: 10 warmup epochs is more than the run's 4 epochs; pass --warmup N with N < 4 (e.g. --warmup 1)"
    )
    # a single epoch with warmup would run at lr 0 only: refused, naming a warmup that trains
    assert train(["--method", "pretrain", *QUICK, "--warmup", "1", "--run-dir", str(tmp_path / "a")]) == 2
    assert one_line(capsys.readouterr().err).endswith(
        "trains nothing (the warmup's epoch 0 runs at lr 0): pass --warmup 0"
    )
    assert train(["--method", "pretrain", *QUICK, "--epochs", "1", "--warmup", "3", "--run-dir", str(tmp_path)]) == 2
    assert one_line(capsys.readouterr().err).endswith("(e.g. --warmup 0)")


def test_epochs_over_a_config_scale_its_warmup(capsys):
    """README's own override (--config cifar10/roli_lora ... --epochs 5): the file's warmup 10 of 20 becomes 2 of 5,
    said on stderr and in config.json; --warmup given keeps its value."""
    import json

    assert train(["--config", "cifar10/roli_lora", "--epochs", "5", "--print-config"]) == 0
    out = capsys.readouterr()
    shown = json.loads(out.out)
    assert shown["warmup"] == 2 and shown["_resolved"]["ft"]["warmup"] == 2
    assert shown["_notes"] == ["--epochs 5 over the file's 20: its warmup 10 scaled to 2"]
    assert "its warmup 10 scaled to 2" in out.err
    assert train(["--config", "cifar10/roli_lora", "--epochs", "1", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["warmup"] == 0  # one epoch: no warmup, it trains
    assert train(["--config", "cifar10/roli_lora", "--epochs", "5", "--warmup", "3", "--print-config"]) == 0
    assert json.loads(capsys.readouterr().out)["warmup"] == 3


# 6. configs by name


def test_shipped_configs_by_name_from_any_directory(tmp_path):
    from roli.config import SHIPPED, find_config, shipped_configs

    names = shipped_configs()
    assert len(names) == 55 and "cub200/roli_lora" in names  # 5 datasets x (alp + 5 roli + 5 ranli)
    assert find_config("cifar10/roli_full") == SHIPPED / "cifar10" / "roli_full.yaml"
    assert find_config("cifar10/roli_full.yaml") == SHIPPED / "cifar10" / "roli_full.yaml"
    mine = tmp_path / "cifar10" / "roli_full.yaml"  # a user's own file of that name wins
    mine.parent.mkdir()
    mine.write_text("method: alp\n")
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        assert find_config("cifar10/roli_full.yaml") == Path("cifar10/roli_full.yaml")
    finally:
        os.chdir(cwd)
    out = _run([sys.executable, "-m", "roli.train", "--config", "cub200/roli_lora", "--print-config"], cwd=tmp_path)
    cfg = json.loads(out.stdout)
    assert out.returncode == 0 and cfg["peft"] == "lora" and cfg["model"] == "ares_swin_b" and cfg["epochs"] == 60
    out = _run([sys.executable, "-m", "roli.train", "--config", "cifar10/roli_lorax"], cwd=tmp_path)
    line = one_line(out.stderr)
    assert out.returncode == 2 and "is neither a file nor a shipped setting (cifar10 has: alp, ranli_adapter" in line


def test_list_configs(capsys):
    assert train(["--list-configs"]) == 0
    captured = capsys.readouterr()
    out = captured.out.splitlines()  # names only on stdout: $(roli train --list-configs) is a list of configs
    assert out[:2] == ["caltech256/alp", "caltech256/ranli_adapter"] and len(out) == 55
    assert captured.err.startswith("55 shipped settings")


# 7. outputs


def test_demo_directory_lists_its_runs_and_report_reads_evaluate(tmp_path, capsys):
    from roli.evaluate import main as evaluate
    from roli.report import main as report

    run = tmp_path / "demo" / "alp"
    assert train(["--method", "alp", *QUICK, "--random-backbone", "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert evaluate(["--run", str(tmp_path / "demo")]) == 2
    assert one_line(capsys.readouterr().err).endswith(f"holds 1 runs, evaluate one of them: --run {run}")
    before = tree(run)
    assert evaluate(["--run", str(run), "--autoattack", "standard", "--n-ex", "40"]) == 0
    out = capsys.readouterr()
    assert "evaluate: AutoAttack-standard on 40 images" in out.err
    for name in ("apgd-ce", "apgd-t", "fab-t", "square"):  # a line after each attack: it takes minutes
        assert re.search(rf"evaluate: batch 1/1: AutoAttack {name}: \d+/40 still robust \(\d+ s\)", out.err), out.err
    assert re.search(r"val PGD \d+\.\d\d%", out.out)  # percentages, two decimals
    assert re.search(r"\(40 examples, [\d.]+ s, cpu\)", out.out)  # --device auto's choice, said
    written = sorted((run / "alp" / "evaluations").glob("*.json"))
    after = {k: v for k, v in tree(run).items() if "evaluations" not in k and k != ".roli-manifest.jsonl"}
    assert len(written) == 1 and after == {k: v for k, v in before.items() if k != ".roli-manifest.jsonl"}
    recorded = [json.loads(line) for line in (run / ".roli-manifest.jsonl").read_text().splitlines()]
    assert {e.get("file") for e in recorded} >= {written[0].relative_to(run).as_posix()}  # the one new file
    # --n-ex 40 is not the whole test split: report does not take it for the run's AutoAttack figure
    assert report([str(run), "--out", str(tmp_path / "rep")]) == 0
    header, row = (line.split(",") for line in (tmp_path / "rep" / "report.csv").read_text().splitlines()[:2])
    assert dict(zip(header, row, strict=True))["AutoAttack"] == ""
    assert evaluate(["--run", str(run), "--autoattack", "standard", "--attack", "none"]) == 0
    aa = json.loads(sorted((run / "alp" / "evaluations").glob("*.json"))[-1].read_text())["attacks"]
    (aa_value,) = [v for k, v in aa.items() if k.startswith("AutoAttack")]
    capsys.readouterr()
    assert report([str(run), "--out", str(tmp_path / "rep")]) == 0
    header, row = (line.split(",") for line in (tmp_path / "rep" / "report.csv").read_text().splitlines()[:2])
    assert float(dict(zip(header, row, strict=True))["AutoAttack"]) == pytest.approx(aa_value)
    # an evaluation made on changed data (evaluate --allow-changed-data records what changed) is marked
    newest = sorted((run / "alp" / "evaluations").glob("*.json"))[-1]
    record = json.loads(newest.read_text())
    newest.write_text(json.dumps({**record, "config": {**record["config"], "changed_since_run": ["the test split"]}}))
    assert report([str(run), "--out", str(tmp_path / "rep")]) == 0
    row = next(csv.DictReader(open(tmp_path / "rep" / "report.csv")))
    assert row["notes"] == "AutoAttack on changed data: the test split" and float(row["AutoAttack"]) == aa_value
    # a best.pt replaced since (an unfinished stage evaluated, then trained on): the evaluation is not its figure
    state = torch.load(run / "alp" / "best.pt", weights_only=True)
    state["state_dict"]["head.bias"] += 1
    torch.save(state, run / "alp" / "best.pt")
    capsys.readouterr()
    assert report([str(run), "--out", str(tmp_path / "rep")]) == 0
    assert "it evaluated another best.pt (roli evaluate --run again)" in capsys.readouterr().err
    assert next(csv.DictReader(open(tmp_path / "rep" / "report.csv")))["AutoAttack"] == ""


def test_report_plot_names_methods_as_the_table(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from roli.report import plot

    labels = []
    real = Axes.annotate
    monkeypatch.setattr(Axes, "annotate", lambda self, text, *a, **k: labels.append(text) or real(self, text, *a, **k))
    rows = [{"run": "c10", "stage": s, "kind": k, "method": "full", "test clean": 0.8, "test PGD": 0.4,
             "AutoAttack": None} for s, k in (("RoLI-full", "RoLI"), ("RanLI-full", "RanLI"))]  # fmt: skip
    keys = []
    real_text = Figure.text
    monkeypatch.setattr(
        Figure, "text", lambda self, x, y, s, *a, **k: keys.append(s) or real_text(self, x, y, s, *a, **k)
    )
    assert plot(rows, tmp_path / "p.png")
    assert labels == ["1", "2"]  # numbered points (names beside the plot never overlap)
    assert keys == ["1  c10: RoLI-full\n2  c10: RanLI-full"]


def test_help_texts_are_whole_and_show_defaults(capsys):
    from roli import zoo

    with pytest.raises(SystemExit):
        zoo.main(["--help"])
    out = capsys.readouterr().out
    assert "python -m roli.zoo ares_swin_b  # one entry in full" in out
    with pytest.raises(SystemExit):
        train(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--eps EPS budget, e.g. 8/255 (default: 8/255)" in out and "--seed SEED default: 0" in out


# 8. the public API and the README's loop


def test_public_api_names():
    from roli import attacks, data, models, training

    expected = {"create_classifier": models, "load_pretrained": models, "apply_peft": models, "PGD": attacks,
                "robust_accuracy": attacks, "eps_sweep": attacks, "run_autoattack": attacks, "load_dataset": data,
                "adversarial_linear_probe": training, "fit": training, "TrainConfig": training}  # fmt: skip
    for name, module in expected.items():
        assert getattr(roli, name) is getattr(module, name) and name in roli.__all__
    assert roli.run is training.run
    with pytest.raises(AttributeError):
        roli.nothing_here  # noqa: B018


def test_accuracy_helpers_share_one_calling_convention(digits_model):
    model, x, y = digits_model
    x, y = x[:96], y[:96]
    clean, robust = roli.robust_accuracy(model, (x, y), 0.1, steps=5)
    sweep = roli.eps_sweep(model, (x, y), [0.0, 0.1], steps=5)
    assert sweep[0.0] == pytest.approx(clean)
    assert abs(sweep[0.1] - robust) <= 6 / 96  # different random starts, same budget and steps
    batches = [(x[:50], y[:50]), (x[50:], y[50:])]
    split = roli.eps_sweep(model, batches, [0.0], steps=5)
    assert split[0.0] == pytest.approx(clean)
    for helper in (roli.robust_accuracy, roli.eps_sweep):
        with pytest.raises(TypeError, match=r"data is a \(x, y\) pair"):
            helper(model, x, y)


def readme_loop() -> str:
    return readme_block("## roli inside your own training loop", "python")


def readme_block(after: str, lang: str = "bash", index: int = 0) -> str:
    """The `index`-th code block of `lang` after the line `after` in README.md."""
    section = README.read_text().split(after, 1)[1]
    return section.split(f"```{lang}\n")[index + 1].split("```", 1)[0]


def run_block(block: str, cwd: Path) -> subprocess.CompletedProcess:
    """A README shell block as written, with this interpreter's `roli` on PATH."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", block], capture_output=True, text=True, timeout=900, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def readme_backbone(tmp_path_factory) -> Path:
    """robust_backbone.pt made by the README's own command (adversarial pretraining on digits 0-4)."""
    where = tmp_path_factory.mktemp("readme")
    block = readme_block("## roli inside your own training loop")
    assert "robust_backbone.pt" in block
    out = run_block(block, where)
    assert out.returncode == 0, out.stderr[-3000:]
    return where / "robust_backbone.pt"


def test_readme_loop_example_runs_as_written(tmp_path, readme_backbone):
    code = readme_loop()
    assert 15 <= len(code.splitlines()) <= 35
    shutil.copy(readme_backbone, tmp_path / "robust_backbone.pt")  # the file the example names
    out = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    m = re.search(r"test: clean (\d+\.\d\d)%, PGD-10 (\d+\.\d\d)%", out.stdout)
    assert m, out.stdout
    clean, robust = float(m[1]), float(m[2])
    assert 0 < robust < clean and clean > 80, out.stdout  # a robust backbone transfers: the loop learned


def test_readme_loop_runs_on_an_image_folder(tmp_path):
    """The loop with its comment's alternative, an ImageFolder (RGB files), and a backbone made for it by the
    README's command with --dataset imagefolder:ROOT (small images, so it runs in seconds)."""
    from test_first_hour import _image_folder

    root = _image_folder(tmp_path / "pets", per_class=20)
    block = readme_block("## roli inside your own training loop").replace(
        "--dataset digits", f"--dataset imagefolder:{root} --resize 12 --crop-size 12 --workers 0"
    )
    out = run_block(block.replace("--epochs 15", "--epochs 3"), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    code = readme_loop()
    assert 'roli.load_dataset("digits")' in code
    code = code.replace(
        'roli.load_dataset("digits")', f'roli.load_dataset("imagefolder:{root}", resize=12, crop_size=12)'
    )
    out = _run([sys.executable, "-c", code], cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    m = re.search(r"test: clean (\d+\.\d\d)%, PGD-10 (\d+\.\d\d)%", out.stdout)
    assert m and 0 <= float(m[2]) <= float(m[1]) <= 100, out.stdout


@pytest.mark.slow
def test_readme_try_without_weights_recipe_runs_as_written(tmp_path):
    block = readme_block("Try the recipe without any weights file")
    assert "--random-backbone" in block and "cifar10/roli_lora" in block
    out = run_block(block, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads((tmp_path / "runs" / "try-lora" / "results.json").read_text())
    assert set(results) == {"alp", "RoLI-lora", "RanLI-lora"}
    log = (tmp_path / "runs" / "try-lora" / "train.log").read_text()
    assert "its architecture swin_base_patch4_window7_224 with random weights" in log


# 9. the README itself


def test_readme_is_short_with_the_quickstart_near_the_top():
    lines = README.read_text().splitlines()
    assert len(lines) <= 400, len(lines)
    heads = [i for i, line in enumerate(lines) if line.startswith("## ")]
    quick = next(i for i in heads if "Quickstart" in lines[i])
    assert quick < 20 and any("<!-- ci:main -->" in line for line in lines[:80])
    for needed in ("roli zoo", "roli train --config", "roli evaluate --run", "roli report", "imagefolder:"):
        assert needed in "\n".join(lines[:80]), needed
