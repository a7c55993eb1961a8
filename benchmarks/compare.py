"""Compare S2HPruner with DMP, its ablations and importance-based baselines (BENCHMARK.md).

    python -m benchmarks.compare --profile quick|full [--out benchmarks/results] [--resume]

Every method gets the same model, data splits, augmentation, seed and initial weights, and
ends with an exported, physically pruned model whose FLOPs are counted by
``s2hpruner.count_flops``. Budgets are matched two ways, both reported:

* ``epochs``: every method trains for the profile's epochs;
* ``compute``: an S2HPruner epoch runs two networks, so the single-network methods of
  ``compute_methods`` run again with epochs x (S2HPruner seconds per epoch / plain seconds per
  epoch of the full model), both measured by this benchmark for the same target and seed.

Each finished run is written at once (whole JSON, atomically) to ``<out>/<profile>.json``, so
``--resume`` skips runs whose (method, target, seed, budget) is already there; an interrupted
S2HPruner run also resumes from its own checkpoint. ``RESULTS.md`` (beside ``<out>``) and
``<out>/<profile>.png`` are regenerated from the JSON; ``--report-only`` does only that.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch_pruning as tp
from tqdm.auto import tqdm

from s2hpruner.app.config import METHODS, ConfigError, RunConfig
from s2hpruner.app.run import prune

from .baselines import BASELINES, BaselineOptions, pick_device, run_baseline
from .report import write_reports

ALL_METHODS = (*METHODS, *BASELINES)


@dataclass(frozen=True)
class Profile:
    """What a benchmark runs. Fields listed in ``RESULT_FIELDS`` change the numbers, so a
    resumed benchmark must use the values stored in its JSON; the others only select runs."""

    name: str
    targets: tuple[float, ...] = (0.35,)
    methods: tuple[str, ...] = ("s2h", "dmp", "l1", "l1-ft", "group-sl")
    compute_methods: tuple[str, ...] = ("l1-ft",)  # also run on the compute-matched budget
    seeds: tuple[int, ...] = (0,)
    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    epochs: float = 4.0
    batch_size: int = 256
    lr: float = 0.1
    val_size: float = 5000
    train_subset: int | None = None
    # S2HPruner family: epochs of the last phase, with the widths frozen. Absolute, whatever
    # the epochs: passed as RunConfig.freeze_epochs, which overrides the fraction
    # RunConfig.freeze (so the stored benchmarks keep their meaning)
    freeze_epochs: float = 1.0
    options: BaselineOptions = field(default_factory=BaselineOptions)
    data_root: str | None = None
    latency_repeats: int = 30
    progress: bool = True


RESULT_FIELDS = (
    "model",
    "dataset",
    "epochs",
    "batch_size",
    "lr",
    "val_size",
    "train_subset",
    "freeze_epochs",
    "options",
)

PROFILES = {
    # ~1 h on a 2-core CPU: s2h ~4.5 min/epoch, a plain epoch ~1.5-2 min
    "quick": Profile("quick", epochs=3.0),
    "full": Profile(
        "full",
        targets=(0.15, 0.35, 0.55),
        methods=ALL_METHODS,
        compute_methods=BASELINES,
        seeds=(0, 1),
        epochs=8.0,
    ),
}


@dataclass(frozen=True)
class RunSpec:
    """One planned run; ``key`` identifies it in the JSON."""

    method: str
    target: float
    seed: int
    budget: str

    @property
    def key(self) -> tuple:
        return (self.method, round(self.target, 6), self.seed, self.budget)

    @property
    def name(self) -> str:
        return f"{self.method}-{self.budget}-t{self.target:g}-s{self.seed}"


def run_key(record: dict) -> tuple:
    return (record["method"], round(record["target_flops"], 6), record["seed"], record["budget"])


def plan_runs(profile: Profile) -> list[RunSpec]:
    """Per seed and target: every method on the epochs budget, then the compute-matched runs
    (which need that seed's and target's S2HPruner and plain timings)."""
    plan = []
    for seed in profile.seeds:
        for target in profile.targets:
            plan += [RunSpec(m, target, seed, "epochs") for m in profile.methods]
            plan += [RunSpec(m, target, seed, "compute") for m in profile.compute_methods]
    return plan


def settings(profile: Profile) -> dict:
    """The fields that change results, as stored (JSON types) in the benchmark file."""
    values = {k: getattr(profile, k) for k in RESULT_FIELDS}
    values["options"] = dataclasses.asdict(profile.options)
    return json.loads(json.dumps(values))


def run_config(profile: Profile, spec: RunSpec, epochs: float, run_dir: Path) -> RunConfig:
    """One RunConfig for every method: the baselines read their recipe from it too."""
    return RunConfig(
        model=profile.model,
        dataset=profile.dataset,
        data_root=profile.data_root,
        target_flops=spec.target,
        method=spec.method,
        epochs=epochs,
        freeze_epochs=profile.freeze_epochs,  # absolute: overrides the fraction cfg.freeze
        # the sliced hard pass in the fastest memory layout, timed at every epoch's start, as
        # the benchmark has always run it (the run's default is now "model": reproducible bit
        # for bit, but it can be slower); S2HPruner's seconds per epoch set the compute budget
        hard_layout="auto",
        batch_size=profile.batch_size,
        val_size=profile.val_size,
        train_subset=profile.train_subset,
        lr=profile.lr,
        seed=spec.seed,
        out=str(run_dir),
        latency_repeats=profile.latency_repeats,
        progress=profile.progress,
    )


# ----------------------------------------------------------------------------- storage


def machine_info() -> dict:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                cpu,
            )
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(pick_device("auto")),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_pruning": getattr(tp, "__version__", "unknown"),
    }


def write_json(path: Path, data: dict) -> None:
    """The whole file, via a temporary file and a rename: a crash never leaves half a JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_results(path: Path, profile: Profile, command: str, resume: bool, overwrite: bool):
    """The stored benchmark when resuming (checked to have the same settings), else a new one."""
    if path.exists() and not overwrite:
        if not resume:
            raise SystemExit(
                f"{path} already holds a benchmark; pass --resume to continue it or "
                "--overwrite to start again"
            )
        results = json.loads(path.read_text())
        stored, current = results.get("settings", {}), settings(profile)
        diff = [k for k in current if stored.get(k) != current[k]]
        if diff:
            details = "; ".join(f"{k}: stored {stored.get(k)!r}, now {current[k]!r}" for k in diff)
            raise SystemExit(
                f"--resume: {path} was made with other settings ({details}); use the same "
                "flags, another --out, or --overwrite"
            )
        return results
    results = {
        "profile": profile.name,
        "command": command,
        "resumed_by": [],
        "machine": machine_info(),
        "settings": settings(profile),
        "compute_ratios": {},
        "runs": [],
    }
    write_json(path, results)
    return results


# ----------------------------------------------------------------------------- runs


def compute_ratio(results: dict, target: float, seed: int) -> dict | None:
    """S2HPruner seconds per epoch over plain seconds per epoch of the full model, from this
    benchmark's epochs-budget runs of the same target and seed (stored once, then reused)."""
    key = f"t{target:g}-s{seed}"
    if key in results["compute_ratios"]:
        return results["compute_ratios"][key]

    def find(method: str) -> dict | None:
        spec = RunSpec(method, target, seed, "epochs")
        return next((r for r in results["runs"] if run_key(r) == spec.key), None)

    s2h = find("s2h")
    plain = next(
        (r for r in map(find, ("l1", "l1-ft")) if r and r.get("dense_seconds_per_epoch")), None
    )
    if s2h is None or plain is None:
        return None
    ratio = {
        "ratio": s2h["train_seconds_per_epoch"] / plain["dense_seconds_per_epoch"],
        "s2h_seconds_per_epoch": s2h["train_seconds_per_epoch"],
        "plain_seconds_per_epoch": plain["dense_seconds_per_epoch"],
        "plain_method": plain["method"],
    }
    results["compute_ratios"][key] = ratio
    return ratio


def prune_record(cfg: RunConfig, resume: bool) -> dict:
    """An S2HPruner-family run through ``s2hpruner.app.run.prune``, resuming its checkpoint."""
    cfg.resume = resume and (Path(cfg.out) / "checkpoints" / "last.pt").exists()
    cfg.overwrite = True
    report = prune(cfg)
    lines = (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1]) if lines else {}
    keep = (
        "method",
        "model",
        "dataset",
        "target_flops",
        "epochs",
        "top1_hard",
        "top1_soft",
        "gap",
        "flops_ratio",
        "params_ratio",
        "predicted_flops_ratio",
        "latency_speedup_b1",
        "latency_speedup_b64",
        "train_seconds",
        "train_seconds_per_epoch",
        "flops_full",
        "flops_pruned",
        "params_full",
        "params_pruned",
    )
    record = {k: report[k] for k in keep if k in report}
    record.update(
        seed=cfg.seed,
        val_top1=last.get("val_top1_hard"),
        val_top1_soft=last.get("val_top1_soft"),
        kept_widths=report.get("kept_widths"),
    )
    return record


def execute(spec: RunSpec, profile: Profile, results: dict, out: Path, resume: bool) -> dict | None:
    """Run one planned run and return its record (None when a compute run cannot be matched)."""
    run_dir = out / "runs" / profile.name / spec.name
    epochs, extra = profile.epochs, {}
    if spec.budget == "compute":
        ratio = compute_ratio(results, spec.target, spec.seed)
        if ratio is None:
            tqdm.write(
                f"skip {spec.name}: the compute budget needs this target's and seed's s2h run "
                "and an l1 or l1-ft run (for plain seconds per epoch) on the epochs budget"
            )
            return None
        epochs = round(profile.epochs * ratio["ratio"], 2)
        extra = {"compute_ratio": ratio["ratio"]}
    cfg = run_config(profile, spec, epochs, run_dir)
    start = time.perf_counter()
    if spec.method in METHODS:
        record = prune_record(cfg, resume)
    else:
        record = run_baseline(spec.method, cfg, profile.options, run_dir)
    first = {
        "method": spec.method,
        "target_flops": spec.target,
        "seed": spec.seed,
        "epochs": epochs,
        "budget": spec.budget,
        "top1_hard": record.pop("top1_hard"),
        "top1_soft": record.pop("top1_soft", None),
        "gap": record.pop("gap", None),
        "flops_ratio": record.pop("flops_ratio"),
        "params_ratio": record.pop("params_ratio"),
        "wall_seconds": time.perf_counter() - start,
    }
    rest = {k: v for k, v in record.items() if k not in first}
    return {**first, **extra, **rest, "run_dir": str(run_dir)}


def summary_line(record: dict) -> str:
    soft = ""
    if record["top1_soft"] is not None:
        soft = f" (soft {record['top1_soft']:.2f}%, gap {record['gap']:.2f})"
    return (
        f"done {record['method']} [{record['budget']}] target {record['target_flops']:g} "
        f"seed {record['seed']} epochs {record['epochs']:g}: top-1 {record['top1_hard']:.2f}%"
        f"{soft}, FLOPs {record['flops_ratio']:.3f}, params {record['params_ratio']:.3f}, "
        f"{record['wall_seconds'] / 60:.1f} min"
    )


def run_benchmark(profile: Profile, path: Path, command: str, resume: bool, overwrite: bool):
    """Every planned run not yet in ``path``, each stored as soon as it finishes."""
    results = open_results(path, profile, command, resume, overwrite)
    had_runs = bool(results["runs"])
    plan = plan_runs(profile)
    done = {run_key(r) for r in results["runs"]}
    todo = [spec for spec in plan if spec.key not in done]
    print(f"{profile.name}: {len(plan)} runs planned, {len(plan) - len(todo)} already in {path}")
    bar = tqdm(total=len(plan), initial=len(plan) - len(todo), desc="runs", unit="run")
    for spec in todo:
        bar.set_postfix_str(spec.name)
        record = execute(spec, profile, results, path.parent, resume)
        bar.update(1)
        if record is None:
            continue
        if had_runs and command not in results["resumed_by"]:
            results["resumed_by"].append(command)
        results["runs"].append(record)
        write_json(path, results)
        tqdm.write(summary_line(record))
    bar.close()
    return results


# ----------------------------------------------------------------------------- command line


def _list(kind):
    def parse(text: str) -> tuple:
        return tuple(kind(x) for x in text.split(",") if x.strip())

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.compare",
        description="S2HPruner against DMP, ablations and torch-pruning baselines.",
    )
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--out", default="benchmarks/results", help="folder of <profile>.json/.png")
    p.add_argument("--markdown", help="RESULTS.md to write (default: <out>/../RESULTS.md)")
    p.add_argument("--resume", action="store_true", help="continue the stored benchmark")
    p.add_argument("--overwrite", action="store_true", help="start again, dropping stored runs")
    p.add_argument("--report-only", action="store_true", help="only rebuild RESULTS.md and plots")
    p.add_argument("--methods", type=_list(str), help=f"comma list of {', '.join(ALL_METHODS)}")
    p.add_argument(
        "--compute-methods", type=_list(str), help="single-network methods also run on compute"
    )
    p.add_argument("--targets", type=_list(float), help="comma list of FLOPs ratios")
    p.add_argument("--seeds", type=_list(int), help="comma list of seeds")
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--val-size", type=float, help="held-out count (>= 1) or fraction")
    p.add_argument("--train-subset", type=int, help="train on the first N training images")
    p.add_argument("--freeze-epochs", type=float,
                   help="S2HPruner family: epochs with frozen widths at the end (absolute)")
    p.add_argument("--data-root")
    p.add_argument("--latency-repeats", type=int)
    p.add_argument("--no-progress", action="store_true", help="no per-step progress bars")
    return p.parse_args(argv)


def resolve_profile(args: argparse.Namespace) -> Profile:
    """The named profile with the command-line overrides, checked before anything runs."""
    profile = PROFILES[args.profile]
    overrides = {
        k: getattr(args, k)
        for k in (
            "methods",
            "compute_methods",
            "targets",
            "seeds",
            "epochs",
            "batch_size",
            "lr",
            "val_size",
            "train_subset",
            "freeze_epochs",
            "data_root",
            "latency_repeats",
        )
        if getattr(args, k) is not None
    }
    if args.no_progress:
        overrides["progress"] = False
    profile = dataclasses.replace(profile, **overrides)
    unknown = sorted(set(profile.methods) - set(ALL_METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(ALL_METHODS)}")
    bad = sorted(set(profile.compute_methods) - set(BASELINES))
    if bad:
        raise SystemExit(f"--compute-methods takes single-network methods only, not {bad}")
    # a compute-matched run complements the same method's epochs-budget run
    profile = dataclasses.replace(
        profile, compute_methods=tuple(m for m in profile.compute_methods if m in profile.methods)
    )
    for spec in plan_runs(profile):
        if spec.method in METHODS:
            try:
                run_config(profile, spec, profile.epochs, Path("unused")).validate()
            except ConfigError as exc:
                raise SystemExit(f"{spec.name}: {exc}") from None
        elif not 0.0 < spec.target <= 1.0:
            raise SystemExit(f"target {spec.target} must be in (0, 1]")
    return profile


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    out = Path(args.out)
    markdown = Path(args.markdown) if args.markdown else out.parent / "RESULTS.md"
    if not args.report_only:
        profile = resolve_profile(args)
        command = shlex.join(["python", "-m", "benchmarks.compare", *argv])
        run_benchmark(profile, out / f"{profile.name}.json", command, args.resume, args.overwrite)
    try:
        written = write_reports(out, markdown)
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
