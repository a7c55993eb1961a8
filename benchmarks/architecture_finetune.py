"""Is an architecture good in itself? Each run's kept widths, cut from one checkpoint and
fine-tuned alike.

A run's top-1 mixes two things: which widths its search kept, and how the run trained them.
For each finished run (a directory with ``report.json`` and ``config.yaml``) this cuts the
run's ``kept_widths`` from the run's own starting weights (``--init``) by L1 rank (the
pruner's importance, as S2HPruner exports), fine-tunes the cut network with the baselines'
plain trainer (same recipe, same batches for every run) and reports validation and test
top-1. Differences between runs are then differences between their architectures.

    python -m benchmarks.architecture_finetune runs/latency_budget_intel/resnet20* \\
        --lr 0.01 --json benchmarks/results/architecture_finetune.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from benchmarks import baselines as B
from s2hpruner.app.checkpoint import seed_everything
from s2hpruner.app.config import RunConfig
from s2hpruner.app.data import dataset_spec
from s2hpruner.app.files import atomic_write_bytes
from s2hpruner.app.run import build_model_and_pruner
from s2hpruner.core.resources import count_flops
from s2hpruner.core.trainer import evaluate


def _cut_pruner(cfg: RunConfig, device: torch.device):
    """A pruner of ``cfg``'s starting model for cutting: its groups and importance, not the
    run's budget (no latency tables are built) nor its width steps (any width can be cut,
    e.g. the uniform baseline's)."""
    cfg = dataclasses.replace(cfg, target_flops=0.5, target_params=None, target_latency=None,
                              round_to=None, width_step=1)  # fmt: skip
    return build_model_and_pruner(cfg, dataset_spec(cfg.dataset), device)[1]  # its importance


def cut(cfg: RunConfig, kept_widths: dict[str, int], device: torch.device) -> nn.Module:
    """The network of ``cfg``'s starting weights at ``kept_widths`` (group name -> width),
    each group keeping its channels of largest L1 norm."""
    pruner = _cut_pruner(cfg, device)
    pruner.update_ranks(force=True)
    missing = sorted(set(pruner.candidate_widths()) - set(kept_widths))
    if missing:
        raise ValueError(f"the widths name no width for group(s) {', '.join(missing)}; are "
                         "they the widths of a run of this model?")  # fmt: skip
    with pruner.at_widths(kept_widths):
        return pruner.export()


def l1_uniform_widths(cfg: RunConfig, target: float, device: torch.device) -> dict[str, int]:
    """The widths the ``l1-ft`` baseline keeps with uniform allocation (every layer loses the
    same share, torch-pruning's L1) at ``target`` x the FLOPs of ``cfg``'s starting model."""
    data = B.load_data(cfg, device)
    model = B.build_model(cfg, data)
    B.prune_to_flops(model, data.example, partial(B.l1_pruner, global_pruning=False), target,
                     ignored_layers=cfg.ignored_layers)  # the groups cut_groups(cfg) finds
    names = cut_groups(cfg, device)
    return {name: model.get_submodule(name).out_channels for name in names}


def cut_groups(cfg: RunConfig, device: torch.device) -> list[str]:
    """The names of ``cfg``'s model's channel groups (each its first producing layer's)."""
    return list(_cut_pruner(cfg, device).candidate_widths())


def run_config(run_dir: Path, lr: float | None, epochs: float, init: str | None,
               importance: str | None = None) -> RunConfig:  # fmt: skip
    """``run_dir``'s config with the one fine-tuning recipe's seed, epochs and lr (and the
    channel ranking the cut keeps by, ``importance``: default the run's own)."""
    cfg = RunConfig.from_yaml(run_dir / "config.yaml", seed=0, epochs=epochs, progress=False,
                              **({"lr": lr} if lr is not None else {}),
                              **({"init": init} if init is not None else {}),
                              **({"importance": importance} if importance else {}))  # fmt: skip
    if cfg.init is None and not cfg.pretrained:
        raise ValueError(f"{run_dir}: the run started from random weights; give --init")
    return cfg


def finetune(cfg: RunConfig, kept_widths: dict[str, int], label: str,
             device: torch.device) -> dict:  # fmt: skip
    """Cut ``kept_widths`` from ``cfg``'s starting weights and fine-tune them by the one
    recipe; top-1 on test and validation."""
    seed_everything(cfg.seed)
    data = B.load_data(cfg, device)
    full = B.build_model(cfg, data)
    net = B._memory_format(cut(cfg, kept_widths, device), cfg)
    steps = max(1, round(cfg.epochs * data.steps_per_epoch))
    seconds = B.train(net, data, cfg, 0, steps, f"fine-tune {label}")
    net.eval()
    loader = partial(DataLoader, batch_size=cfg.eval_batch_size, num_workers=cfg.workers)
    return {
        "kept_widths": kept_widths,
        "flops_ratio": count_flops(net, data.example) / count_flops(full, data.example),
        "init": cfg.init, "lr": cfg.lr, "epochs": cfg.epochs, "train_seconds": seconds,
        "test_top1": evaluate(net, loader(data.splits.test), device, progress=False),
        "val_top1": evaluate(net, loader(data.splits.val), device, progress=False),
    }  # fmt: skip


def finetune_run(run_dir: Path, lr: float | None, epochs: float, init: str | None,
                 device: torch.device, importance: str | None = None) -> dict:  # fmt: skip
    """Cut ``run_dir``'s architecture and fine-tune it; its record (top-1 on test and val)."""
    report = json.loads((run_dir / "report.json").read_text())
    cfg = run_config(run_dir, lr, epochs, init, importance)
    return {
        "run": str(run_dir), "budget": {k: report.get(f"target_{k}") for k in
                                        ("flops", "params", "latency")},
        "run_top1": report["top1_hard"], "latency_ratio": report.get("latency_ratio"),
        "importance": cfg.importance,
        **finetune(cfg, report["kept_widths"], run_dir.name, device),
    }  # fmt: skip


def finetune_uniform(run_dir: Path, lr: float | None, epochs: float, init: str | None,
                     device: torch.device, importance: str | None = None) -> dict:  # fmt: skip
    """The uniform L1 architecture at ``run_dir``'s FLOPs target, fine-tuned alike: the
    allocation the ``l1-ft`` baseline keeps, against which a search's allocation is judged."""
    report = json.loads((run_dir / "report.json").read_text())
    target = report.get("target_flops")
    if target is None:
        raise ValueError(f"{run_dir}: --uniform needs runs with a FLOPs budget")
    cfg = run_config(run_dir, lr, epochs, init, importance)
    return {
        "run": f"uniform L1 at {target} ({run_dir})", "uniform": True,
        "budget": {"flops": target, "params": None, "latency": None},
        "run_top1": None, "latency_ratio": None, "importance": cfg.importance,
        **finetune(cfg, l1_uniform_widths(cfg, target, device), "uniform", device),
    }  # fmt: skip


def plot(records: list[dict], path: Path) -> None:
    """Top-1 of each architecture fine-tuned alike against its FLOPs, one marker per budget."""
    from s2hpruner.app.report import plt, save_figure  # pyplot on the Agg backend

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for kind, marker in (("latency", "o"), ("flops", "s"), ("params", "^"), ("uniform L1", "*")):
        rows = [r for r in records if r.get("uniform", False) == (kind == "uniform L1")
                and (kind == "uniform L1" or r["budget"].get(kind) is not None)]  # fmt: skip
        if rows:
            ax.scatter([r["flops_ratio"] for r in rows], [r["test_top1"] for r in rows],
                       marker=marker, label=f"{kind}: test")  # fmt: skip
            ax.scatter([r["flops_ratio"] for r in rows], [r["val_top1"] for r in rows],
                       marker=marker, facecolors="none", edgecolors="0.4",
                       label=f"{kind}: validation")  # fmt: skip
    ax.set_xlabel("FLOPs ratio of the architecture")
    ax.set_ylabel("top-1 after the same fine-tuning (%)")
    ax.set_title("Each run's kept widths, cut from one checkpoint and fine-tuned alike", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (report.json)")
    parser.add_argument("--lr", type=float, default=None, help="default: each run's own lr")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--init", default=None, help="default: each run's own starting weights")
    parser.add_argument("--uniform", action="store_true",
                        help="also the uniform L1 architecture (the l1-ft baseline's) at each "
                             "distinct FLOPs target and start of the runs")  # fmt: skip
    parser.add_argument("--importance", choices=("producers", "group"), default=None,
                        help="the channel ranking every cut keeps by (default: each run's "
                             "own): see s2hpruner prune --importance")  # fmt: skip
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path,
                        default=Path("benchmarks/results/architecture_finetune.json"))
    args = parser.parse_args(argv)
    device = B.pick_device(args.device)
    records = []

    def add(record: dict, label: str) -> None:
        """Keep and show one architecture's record, and write the JSON: a long benchmark
        keeps what it measured."""
        records.append(record)
        result = {"machine": {"cpu": platform.processor() or platform.machine(),
                              "torch": torch.__version__, "threads": torch.get_num_threads()},
                  "command": "python -m benchmarks.architecture_finetune " + " ".join(
                      sys.argv[1:] if argv is None else argv),
                  "runs": records}  # fmt: skip
        atomic_write_bytes(args.json, json.dumps(result, indent=2).encode())
        run = "" if record["run_top1"] is None else f"  run {record['run_top1']:.2f}"
        tqdm.write(f"{label:32s} FLOPs {record['flops_ratio']:.3f}{run}  fine-tuned alike: "
                   f"test {record['test_top1']:.2f} val {record['val_top1']:.2f}")

    options = (args.lr, args.epochs, args.init, device, args.importance)
    for run_dir in tqdm(args.runs, desc="architectures"):
        add(finetune_run(run_dir, *options), run_dir.name)
    if args.uniform:
        starts = {}  # (start, target) -> one run of it
        for run_dir, r in zip(args.runs, records, strict=True):
            starts.setdefault((r["init"], r["budget"]["flops"]), run_dir)
        for run_dir in starts.values():
            record = finetune_uniform(run_dir, *options)
            add(record, record["run"])
    plot(records, args.json.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
