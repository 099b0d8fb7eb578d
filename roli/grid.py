"""`roli grid CONFIG... --out DIR`: many runs as one command, each distinct ALP stage trained once.

    roli grid cifar10/roli_lora cifar10/roli_full cifar10/ranli_lora --out grids/c10 \\
        --set checkpoint=ARES_Swin_base_patch4_window7_224_AT.pth --set dataset=cifar10:~/data/cifar10
    roli grid cub200/roli_lora cub200/roli_bias --out grids/cub --launcher slurm --slurm-partition gpu

Each CONFIG (a shipped setting's name or a YAML/JSON file; `--set KEY=VALUE` applies to every one) becomes
the run DIR/<dataset>/<name>. A `roli` config (ALP, then finetuning from the ALP head) is split in two: its ALP
stage, keyed by everything that decides it (the backbone's weights, the data and classes, the budget and
attack, ALP's optimiser, lr, decay, epochs and warmup, the head init, the seed, the precision), is trained
once under DIR/alp/<key>/ for all the configs that share it; its finetuning runs as `--method ft --init
DIR/alp/<key>/alp/best.pt` named RoLI-<peft> (config.json records which ALP), and `--compare-ranli` becomes
its own RanLI run. A run's figures equal those of its config run alone (tested).

Launchers: local (default): as many runs at once as --jobs (default: one per visible GPU, each run given its
GPUs in CUDA_VISIBLE_DEVICES, through torchrun with --gpus-per-run > 1; one at a time without a GPU). A local
run is a process forked from a server that has roli, torch and timm imported (a new interpreter spends
seconds importing them; `--fresh-processes` starts each run as `python -m roli.train` instead). slurm:
one job per run through submitit, the finetuning jobs depending on their ALP job (afterok). Rerunning the same
command skips finished runs and resumes interrupted ones; a failed run is reported and the others go on. At
the end: `roli report` over the grid (DIR/report) and a line of time spent and time saved by the dedup.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from roli import _cli
from roli._cli import BadValue, OneLineParser, prog
from roli._io import GRID_MARKER, remove_stale_temporaries, save_json
from roli.config import SHIPPED, TrainConfig, check_code_from_file, find_config, names_code, parse_set_options
from roli.rundir import RunLock, check_links, check_not_dangling, create_whole, settings, without_added_defaults
from roli.specs import DataSpec, PeftSpec

# TrainConfig fields that do not change what the ALP stage of a run computes (finetuning with its PEFT options,
# RanLI, execution).
NOT_ALP = {
    "method",
    "run_dir",
    "peft",
    "init",
    "stage_name",
    "lr",
    "optimizer",
    "weight_decay",
    "ft",
    "ranli",
    "ranli_lr",
    "alp_lr",
    "compare_ranli",
    "epochs",
    "warmup",
    "attack",
    "alp",
    "workers",
    "device",
    "compile",
    "cuda_graph",
    "channels_last",
    "download",
    "log",
    "data_hash",
} | {f.name for f in PeftSpec.options()}


@dataclass
class Job:
    """One `roli train` run of the grid."""

    name: str  # e.g. cifar10/roli_lora, or alp/<key>
    cfg: TrainConfig
    deps: list[str] = field(default_factory=list)  # names of the jobs whose outputs it needs
    sources: list[str] = field(default_factory=list)  # the configs it serves (an ALP job: all that share it)
    rerun: bool = False  # --rerun-changed: its run exists under other settings and is trained again

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)


def parse_sets(items: list[str]) -> dict:
    sets = parse_set_options(items)
    for key in ("run_dir", "method"):
        if key in sets:
            raise BadValue(f"--set: {key} is the grid's to choose (runs go under --out; the method is the config's)")
    return sets


def check_launcher(args) -> None:
    """The launcher's options, before anything is written: SLURM's minutes and CPUs, submitit installed."""
    if args.launcher == "local":
        return
    if args.slurm_time is not None and args.slurm_time < 1:
        raise BadValue(f"--slurm-time: {args.slurm_time} is not a number of minutes >= 1")
    if args.slurm_cpus < 1:
        raise BadValue(f"--slurm-cpus: {args.slurm_cpus} is not a CPU count >= 1")
    import importlib.util

    if importlib.util.find_spec("submitit") is None:
        raise BadValue(f"--launcher {args.launcher} needs submitit: pip install submitit (or --launcher local)")


def _sha(path: str | None) -> str | None:
    if not path or not Path(path).expanduser().is_file():
        return None
    h = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def alp_config(cfg: TrainConfig, run_dir: Path) -> TrainConfig:
    """The ALP stage of a roli config as a run of its own: the stage's resolved settings, nothing of finetuning."""
    alp = cfg.settings("alp").as_mapping()
    return dataclasses.replace(
        cfg,
        method="alp",
        run_dir=str(run_dir),
        alp=alp,
        ft={},
        ranli={},
        lr=None,
        optimizer=None,
        weight_decay=None,
        alp_lr=None,
        ranli_lr=None,
        lr_batch=None,  # the mapping holds the resolved (already batch-scaled) rate
        compare_ranli=False,
        init="alp",
        stage_name=None,
    )


def alp_key(cfg: TrainConfig, data: dict) -> str:
    """What decides a roli config's ALP stage, hashed: its options but those of finetuning and execution, the
    resolved ALP settings, the backbone file's content (not its path) and the data's fingerprint."""
    options = without_added_defaults({k: v for k, v in cfg.to_dict().items() if k not in NOT_ALP})
    options["checkpoint"] = _sha(cfg.checkpoint) or cfg.checkpoint
    options["alp"] = dataclasses.asdict(cfg.settings("alp"))
    return hashlib.sha256(json.dumps([options, data], sort_keys=True, default=str).encode()).hexdigest()[:12]


def data_of(spec: DataSpec) -> dict:
    """The fingerprint of the run's splits (sizes, labels, a sample of images or the file list)."""
    from roli.rundir import data_fingerprint

    train, val, test, num_classes = spec.load()
    out = {"classes": getattr(train, "classes", None), "num_classes": num_classes}
    for name, d in (("train", train), ("val", val), ("test", test)):
        out |= data_fingerprint(name, d)
    return out


def plan(configs: list[tuple[str, TrainConfig]], out: Path) -> list[Job]:
    """The grid's jobs, dependencies first."""
    alp_jobs: dict[str, Job] = {}
    runs: list[Job] = []
    data_cache: dict[str, dict] = {}
    for name, cfg in configs:
        run_dir = out / name
        if cfg.method not in ("roli", "alp"):
            runs.append(Job(name, dataclasses.replace(cfg, run_dir=str(run_dir)), sources=[name]))
            continue
        key_data = json.dumps(
            {
                k: getattr(cfg, k)
                for k in (
                    "dataset",
                    "classes",
                    "image_root",
                    "val_percent",
                    "split_seed",
                    "resize",
                    "crop_size",
                    "data_interpolation",
                    "record_order",
                )
            },
            sort_keys=True,
        )
        if key_data not in data_cache:
            data_cache[key_data] = data_of(cfg.data_spec)
        key = alp_key(cfg, data_cache[key_data])
        alp_name = f"alp/{key}"
        if alp_name not in alp_jobs:
            alp_jobs[alp_name] = Job(alp_name, alp_config(cfg, out / "alp" / key))
        alp_jobs[alp_name].sources.append(name)
        if cfg.method == "alp":  # an ALP config is that shared stage itself: its run is DIR/alp/<key>
            continue
        head = out / "alp" / key / "alp" / "best.pt"
        ft = dataclasses.replace(
            cfg, method="ft", run_dir=str(run_dir), init=str(head), compare_ranli=False, stage_name=f"RoLI-{cfg.peft}"
        )
        runs.append(Job(name, ft, deps=[alp_name], sources=[name]))
        if cfg.compare_ranli:
            r = cfg.settings("ranli")
            ranli = dataclasses.replace(
                cfg,
                method="ft",
                run_dir=str(out / f"{name}-ranli"),
                init="random",
                compare_ranli=False,
                stage_name=f"RanLI-{cfg.peft}",
                lr=None,
                optimizer=None,
                weight_decay=None,
                ranli_lr=None,
                lr_batch=None,  # the mapping below holds the resolved (already batch-scaled) rate
                ft={},
                ranli={
                    "optimizer": r.optimizer,
                    "lr": r.lr,
                    "weight_decay": r.weight_decay,
                    "epochs": r.epochs,
                    "warmup": r.warmup,
                    "attack": r.attack,
                },
            )
            runs.append(Job(f"{name}-ranli", ranli, sources=[name]))
    jobs = [*alp_jobs.values(), *runs]
    seen: dict[Path, str] = {}
    for job in jobs:
        where = job.run_dir.resolve()
        if where in seen:
            raise BadValue(
                f"{job.name} and {seen[where]} would share the run directory {job.run_dir}; give the "
                "configs different names"
            )
        seen[where] = job.name
    return jobs


def state_of(job: Job) -> str:
    """done (every stage finished, results.json written) | partial (roli's run directory, unfinished) | new."""
    d = job.run_dir
    if not (d / ".roli-run").is_file():
        return "new"
    stages = {
        "alp": ["alp"],
        "ft": [job.cfg.stage_name and ("roli-ft" if job.cfg.stage_name.startswith("RoLI") else "ranli-ft") or "ft"],
        "pretrain": ["pretrain"],
        "lp": ["lp"],
    }.get(job.cfg.method)
    if stages is None:  # a roli run of its own
        stages = ["alp", "roli-ft"] + (["ranli-ft"] if job.cfg.compare_ranli else [])
    if job.cfg.method == "ft" and job.cfg.init in ("lp", "alp"):
        stages = [job.cfg.init, *stages]
    done = (d / "results.json").is_file() and all((d / s / "done.json").is_file() for s in stages)
    return "done" if done else "partial"


def train_args(job: Job, out: Path, trust_code: bool) -> list[str]:
    """The `roli train` arguments of a job: a new run from its config file, or --resume of an interrupted one."""
    spec = out / "jobs" / f"{job.name.replace('/', '__')}.json"
    if job.rerun:
        args = ["--config", str(spec), "--overwrite"]
    else:
        args = ["--resume", str(job.run_dir)] if state_of(job) == "partial" else ["--config", str(spec)]
    return [*args, "--trust-code"] if trust_code else args


def changed_runs(jobs: list[Job]) -> list[tuple[Job, list[str]]]:
    """The jobs whose run directory holds a run of other settings than the job's resolved config (the
    settings a run's fingerprint holds: how it executes aside), with the keys that differ. A job after one
    that changed is trained again too (its input changes)."""
    out, again = [], set()
    for job in jobs:  # dependencies first (plan's order)
        saved = job.run_dir / "config.json"
        if state_of(job) == "new" or not saved.is_file():
            continue
        try:
            before = settings(TrainConfig.from_file(saved, run_dir=str(job.run_dir)).to_dict())
        except (BadValue, ValueError, TypeError, OSError):
            before = {}
        now = settings(job.cfg.to_dict())
        keys = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        keys += [f"after {d}" for d in job.deps if d in again]
        if keys:
            out.append((job, keys))
            again.add(job.name)
    return out


def command(job: Job, out: Path, gpus_per_run: int, trust_code: bool) -> list[str]:
    """The command line of a job as a new interpreter (torchrun with gpus_per_run > 1)."""
    args = train_args(job, out, trust_code)
    if gpus_per_run > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={gpus_per_run}",
            "-m",
            "roli.train",
            *args,
        ]
    return [sys.executable, "-m", "roli.train", *args]


def write_specs(jobs: list[Job], out: Path) -> None:
    for job in jobs:
        spec = out / "jobs" / f"{job.name.replace('/', '__')}.json"
        save_json({k: v for k, v in job.cfg.to_dict().items()}, spec)


# What the forked runs find imported (the seconds a new `python -m roli.train` spends before its first step).
PRELOAD = ["roli", "roli.train", "roli.training.pipeline", "timm", "sklearn.datasets"]


def _train_in_child(argv: list[str], log_path: str, env: dict, invoked_as: str) -> None:
    """The body of a forked run: its GPUs, its log as stdout and stderr, then `roli train ARGS`."""
    from roli import _cli

    _cli.INVOKED_AS = invoked_as  # messages name the command as the user typed it
    os.environ.update(env)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    print(_header(["roli", "train", *argv], os.environ), flush=True)
    from roli.train import main as train

    sys.exit(train(argv))


def _header(argv: list[str], env) -> str:
    """The first line of a run's log: what ran, and on which GPUs."""
    gpus = env.get("CUDA_VISIBLE_DEVICES")
    return f"grid: {' '.join(argv)}" + (f" (CUDA_VISIBLE_DEVICES={gpus})" if gpus is not None else "")


class _Forked:
    """A run forked from the preloaded server, read as a Popen (poll, returncode)."""

    _context = None

    def __init__(self, argv: list[str], log_path: Path, env: dict):
        if _Forked._context is None:
            import multiprocessing

            _Forked._context = multiprocessing.get_context("forkserver")
            _Forked._context.set_forkserver_preload(PRELOAD)
        self.proc = _Forked._context.Process(
            target=_train_in_child, args=(argv, str(log_path), env, _cli.INVOKED_AS), daemon=False
        )
        self.proc.start()
        self.returncode = None

    def poll(self):
        if self.returncode is None and not self.proc.is_alive():
            self.proc.join()
            self.returncode = self.proc.exitcode
        return self.returncode


def can_preload() -> bool:
    import multiprocessing

    return "forkserver" in multiprocessing.get_all_start_methods()


def visible_gpus() -> list[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g for g in env.split(",") if g.strip() != ""]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def run_local(
    jobs: list[Job], out: Path, n_jobs: int | None, gpus_per_run: int, trust_code: bool, log=print, fresh: bool = False
) -> dict[str, dict]:
    """Run the jobs here, dependencies first, at most n_jobs at once; returns {name: {status, seconds}}.

    A run is forked from the preloaded server unless `fresh`, torchrun (gpus_per_run > 1) or a platform without
    fork asks for a new interpreter."""
    fork = not fresh and gpus_per_run == 1 and can_preload()
    gpus = visible_gpus()
    slots = max(1, len(gpus) // gpus_per_run) if gpus else 1
    n_jobs = n_jobs or slots
    free = [gpus[i * gpus_per_run : (i + 1) * gpus_per_run] for i in range(slots)] if gpus else [[]] * n_jobs
    status: dict[str, dict] = {}
    for job in jobs:
        if state_of(job) == "done" and not job.rerun:
            status[job.name] = {"status": "done before", "seconds": _seconds(job)}
    pending = [j for j in jobs if j.name not in status]
    running: dict[str, tuple] = {}
    (out / "logs").mkdir(parents=True, exist_ok=True)
    while pending or running:
        for job in list(pending):
            failed = [d for d in job.deps if status.get(d, {}).get("status") in ("failed", "skipped")]
            if failed:
                status[job.name] = {"status": "skipped", "why": f"{failed[0]} failed", "seconds": 0.0}
                log(f"grid: {job.name}: skipped ({failed[0]} failed)")
                pending.remove(job)
                continue
            if len(running) >= n_jobs or not free or any(d not in status for d in job.deps):
                continue
            devices = free.pop(0)
            gpu_env = {"CUDA_VISIBLE_DEVICES": ",".join(devices)} if gpus else {}
            log_path = out / "logs" / f"{job.name.replace('/', '__')}.log"
            if fork:
                proc, logfile = _Forked(train_args(job, out, trust_code), log_path, gpu_env), None
            else:
                env, argv = {**os.environ, **gpu_env}, command(job, out, gpus_per_run, trust_code)
                logfile = open(log_path, "ab")  # noqa: SIM115
                logfile.write((_header(argv, env) + "\n").encode())
                logfile.flush()
                proc = subprocess.Popen(argv, stdout=logfile, stderr=subprocess.STDOUT, env=env)
            running[job.name] = (proc, time.time(), devices, logfile)
            pending.remove(job)
            log(f"grid: {job.name}: started" + (f" on GPU {','.join(devices)}" if devices else ""))
        for name, (proc, t0, devices, logfile) in list(running.items()):
            if proc.poll() is None:
                continue
            if logfile:
                logfile.close()
            seconds = time.time() - t0
            ok = proc.returncode == 0
            status[name] = {"status": "finished" if ok else "failed", "seconds": seconds, "code": proc.returncode}
            where = out / "logs" / (name.replace("/", "__") + ".log")
            log(
                f"grid: {name}: "
                + (f"finished in {seconds:.0f} s" if ok else f"failed (exit {proc.returncode}); see {where}")
            )
            free.append(devices)
            del running[name]
        time.sleep(0.2)
    return status


def _seconds(job: Job) -> float:
    """Training time of a finished run, from its stages' metrics.jsonl."""
    total = 0.0
    for metrics in job.run_dir.glob("*/metrics.jsonl"):
        for line in metrics.read_text().splitlines():
            try:
                total += float(json.loads(line).get("seconds", 0))
            except (ValueError, AttributeError):
                continue
    return total


def run_slurm(jobs: list[Job], out: Path, args) -> dict[str, dict]:
    """Submit one job per run through submitit (SLURM, or submitit's local executor with --launcher
    submitit-local); a finetuning job depends on its ALP job (afterok). Returns {name: {status, job_id}}."""
    try:
        import submitit
    except ImportError:
        raise BadValue("--launcher slurm needs submitit: pip install submitit") from None
    folder = out / "slurm"
    ids: dict[str, str] = {}
    status: dict[str, dict] = {}
    for job in jobs:
        if state_of(job) == "done" and not job.rerun:
            status[job.name] = {"status": "done before"}
            continue
        if args.launcher == "submitit-local":
            ex = submitit.LocalExecutor(folder=folder)
            ex.update_parameters(timeout_min=args.slurm_time or 60 * 24)
        else:
            ex = submitit.SlurmExecutor(folder=folder)
            params = {"job_name": f"roli-{job.name.replace('/', '-')}", "gpus_per_node": args.gpus_per_run,
                      "ntasks_per_node": 1, "cpus_per_task": args.slurm_cpus,
                      "time": args.slurm_time or 60 * 24}  # fmt: skip
            if args.slurm_partition:
                params["partition"] = args.slurm_partition
            deps = [ids[d] for d in job.deps if d in ids]
            if deps:
                params["additional_parameters"] = {"dependency": "afterok:" + ":".join(deps)}
            ex.update_parameters(**params)
        submitted = ex.submit(submitit.helpers.CommandFunction(command(job, out, args.gpus_per_run, args.trust_code)))
        ids[job.name] = str(submitted.job_id)
        status[job.name] = {"status": "submitted", "job_id": ids[job.name], "job": submitted}
        print(
            f"grid: {job.name}: submitted as job {ids[job.name]}"
            + (f" (after {', '.join(job.deps)})" if job.deps else "")
        )
        if args.launcher == "submitit-local" and job.deps == [] and any(job.name in j.deps for j in jobs):
            submitted.result()  # the local executor knows no dependencies: an ALP job finishes first
    return status


def build_parser() -> OneLineParser:
    p = OneLineParser(prog=prog("grid"), description=__doc__.strip())
    p.add_argument("configs", nargs="+", metavar="CONFIG", help="shipped settings (roli train --list-configs) or files")
    p.add_argument("--out", required=True, help="the grid's directory: one run per config, alp/, logs/, report/")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an option for every run, e.g. checkpoint=FILE, dataset=cifar10:~/data",
    )
    p.add_argument(
        "--launcher",
        choices=["local", "slurm", "submitit-local"],
        default="local",
        help="local: here; slurm: jobs through submitit; submitit-local: its local executor",
    )
    p.add_argument("--jobs", type=int, help="local: runs at once (default: one per visible GPU, else 1)")
    p.add_argument("--gpus-per-run", type=int, default=1, help="GPUs of each run (torchrun when > 1)")
    p.add_argument("--slurm-partition", help="slurm: the partition")
    p.add_argument("--slurm-time", type=int, help="slurm: minutes per job (default 1440)")
    p.add_argument("--slurm-cpus", type=int, default=8, help="slurm: CPUs per job (data loading)")
    p.add_argument("--trust-code", action="store_true", help="run package.module:function models named in configs")
    p.add_argument(
        "--fresh-processes",
        action="store_true",
        help="local: start each run as a new `python -m roli.train` (default: forked from a process "
        "with roli, torch and timm imported)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan (runs, shared ALP stages) and exit")
    p.add_argument(
        "--rerun-changed",
        action="store_true",
        help="train again (replacing its outputs) a run whose config changed since it was trained; without it "
        "such a grid is refused",
    )
    return p


def load_configs(names: list[str], sets: dict, trust_code: bool) -> list[tuple[str, TrainConfig]]:
    out = []
    for text in names:
        path = find_config(text)
        shipped = path.resolve().parent.parent == SHIPPED.resolve()
        name = f"{path.parent.name}/{path.stem}" if shipped else path.stem  # cifar10/roli_lora; my_run
        cfg = TrainConfig.from_file(path, **sets)
        if "model" not in sets:
            check_code_from_file(cfg.model, str(path), trust_code)
        out.append((name, cfg))
    names_seen = [n for n, _ in out]
    dup = next((n for n in names_seen if names_seen.count(n) > 1), None)
    if dup:
        raise BadValue(f"{dup} is given twice (configs of one name would share DIR/{dup}); rename one file")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = Path(args.out).expanduser()
    t0 = time.time()
    try:
        if args.jobs is not None and args.jobs < 1 or args.gpus_per_run < 1:
            raise BadValue("--jobs and --gpus-per-run must be >= 1")
        if out.exists() and not out.is_dir():
            raise BadValue(f"--out: {out} is a file; give a directory")
        check_launcher(args)
        sets = parse_sets(args.set)
        configs = load_configs(args.configs, sets, args.trust_code)
        # every file's model spec was checked above; one typed with --set runs as typed, in the runs too
        args.trust_code = args.trust_code or names_code(sets.get("model", ""))
        check_out(out)
        jobs = plan(configs, out)
        for job, keys in changed_runs(jobs):
            if not args.rerun_changed:
                raise BadValue(
                    f"{job.name}: {job.run_dir} was trained with other settings ({', '.join(keys[:4])}"
                    f"{' ...' if len(keys) > 4 else ''}) than its config now gives; pass --rerun-changed to train it "
                    "again (its outputs are replaced), or restore the config"
                )
            job.rerun = True
    except BadValue as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    shared = [j for j in jobs if j.name.startswith("alp/")]
    print(
        f"grid: {len(jobs)} runs in {out}; {len(shared)} ALP stage(s) shared by "
        f"{sum(len(j.sources) for j in shared)} RoLI config(s)"
    )
    for job in jobs:
        after = f" (after {', '.join(job.deps)})" if job.deps else ""
        state = "changed: trained again" if job.rerun else state_of(job)
        print(f"  {job.name}: {job.cfg.method} -> {job.run_dir} [{state}]{after}")
    if args.dry_run:
        return 0
    try:
        lock = open_out(out)
    except BadValue as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    try:
        write_specs(jobs, out)
        if args.launcher == "local":
            status = run_local(jobs, out, args.jobs, args.gpus_per_run, args.trust_code, fresh=args.fresh_processes)
        else:
            try:
                status = run_slurm(jobs, out, args)
            except BadValue as e:
                print(f"{parser.prog}: error: {e}", file=sys.stderr)
                return 2
            if args.launcher == "slurm":
                print(f"grid: submitted; rerun this command when the jobs are done for the report ({out / 'slurm'})")
                return 0
            for s in status.values():
                if "job" in s:
                    s["job"].wait()
        return summarize(jobs, status, out, time.time() - t0)
    finally:
        lock.release()


def check_out(out: Path) -> None:
    """--out is new, empty, or a grid's folder (its marker); never a folder roli's grid did not make."""
    check_not_dangling(out, "--out:", "--out")
    if out.is_dir() and any(out.iterdir()) and not (out / GRID_MARKER).is_file() and not _earlier_grid(out):
        raise BadValue(
            f"--out: {out} holds files and is not a grid's folder (it has no {GRID_MARKER}); roli writes a grid "
            "only into a new folder or its own: choose another --out"
        )
    if out.is_dir():
        check_links(out)


def _earlier_grid(out: Path) -> bool:
    """A grid's folder from a roli before the marker: its grid.json is a grid's record."""
    try:
        record = json.loads((out / "grid.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"runs", "status", "wall_seconds"} <= set(record)


def open_out(out: Path) -> RunLock:
    """Take --out for this grid (a second grid on it is refused); a new one is created whole with its marker."""
    check_out(out)
    payload = {"created_by": "roli grid", "note": "roli grid writes into and reruns only folders holding this"}
    if out.is_dir() and any(out.iterdir()):
        lock = RunLock(out, "roli grid", what="grid folder").acquire()
        if not (out / GRID_MARKER).is_file():  # a grid of an earlier roli (check_out knew it by its grid.json)
            save_json(payload, out / GRID_MARKER)
        remove_stale_temporaries(out)  # those its manifest names: left by a grid killed while writing
        return lock
    return create_whole(out, GRID_MARKER, payload, "roli grid", lambda folder: None, what="grid folder")


def label(job: Job) -> str:
    """A run's name in the grid's report: its config's (cifar10/roli_lora, cifar10/roli_lora-ranli); a shared ALP
    stage by what shares it (cifar10/alp, shared by 6 configs) rather than by its key."""
    if not job.name.startswith("alp/"):
        return job.name
    prefixes = sorted({s.rpartition("/")[0] for s in job.sources if "/" in s})
    where = f"{'+'.join(prefixes)}/alp" if prefixes else "alp"
    return f"{where} (shared by {len(job.sources)} configs)" if len(job.sources) > 1 else where


def summarize(jobs: list[Job], status: dict, out: Path, wall: float) -> int:
    from roli.report import main as report

    failed = [n for n, s in status.items() if s.get("status") in ("failed", "skipped")]
    finished = [j for j in jobs if state_of(j) == "done"]
    saved = sum(_seconds(j) * (len(j.sources) - 1) for j in jobs if j.name.startswith("alp/") and state_of(j) == "done")
    spent = sum(_seconds(j) for j in finished)
    if finished:
        labels = [f"--label={j.run_dir}={label(j)}" for j in finished]
        report([*[str(j.run_dir) for j in finished], *labels, "--out", str(out / "report")])
    print(
        f"grid: {len(finished)}/{len(jobs)} runs finished, {wall:.0f} s wall; training time {spent:.0f} s, "
        f"{saved:.0f} s saved by training each shared ALP stage once"
        + (f"; failed: {', '.join(failed)}" if failed else "")
    )
    save_json(
        {
            "runs": {
                j.name: {"dir": str(j.run_dir), "state": state_of(j), "deps": j.deps, "configs": j.sources}
                for j in jobs
            },
            "status": {n: {k: v for k, v in s.items() if k != "job"} for n, s in status.items()},
            "wall_seconds": round(wall, 1),
            "training_seconds": round(spent, 1),
            "saved_seconds": round(saved, 1),
        },
        out / "grid.json",
    )
    return 1 if failed else 0


if __name__ == "__main__":
    from roli._cli import exit_with

    exit_with(main)
