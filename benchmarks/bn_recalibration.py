"""Does recalibrating the exported model's BatchNorm statistics help? (issue: from-trained)

For each exported model (``model_pruned.pt`` of a finished run), the BatchNorm running
statistics are recomputed from scratch over ``--batches`` training batches (cumulative
average, no weight changes), and the validation top-1 before and after is recorded; test
top-1 is only reported. A post-hoc probe: no method is retrained.

    python -m benchmarks.bn_recalibration \\
        benchmarks/results/runs/from-trained/*-epochs-t0.35-s0/*/model_pruned.pt
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from s2hpruner.app.config import RunConfig
from s2hpruner.app.files import atomic_write_bytes
from s2hpruner.app.run import build_splits
from s2hpruner.app.sampling import EpochSampler, eval_loader, train_loader
from s2hpruner.core.trainer import evaluate


@torch.no_grad()
def recalibrate(model: nn.Module, loader, batches: int) -> None:
    """Reset every BatchNorm's running statistics and re-estimate them as the plain average
    over ``batches`` training batches (momentum None), in train mode, weights untouched."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        model(x.contiguous(memory_format=torch.channels_last))
    model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, help="exported model_pruned.pt files")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--json", type=Path,
                        default=Path("benchmarks/results/bn_recalibration.json"))
    args = parser.parse_args(argv)
    cfg = RunConfig(dataset=args.dataset, split_seed=args.split_seed, batch_size=args.batch_size)
    splits = build_splits(cfg)
    val, test = eval_loader(splits.val, 500, 0), eval_loader(splits.test, 500, 0)
    rows = []
    for path in args.models:
        model = torch.load(path, weights_only=False, map_location="cpu").eval()
        row = {"model": str(path), "val_before": evaluate(model, val, "cpu"),
               "test_before": evaluate(model, test, "cpu")}  # fmt: skip
        torch.manual_seed(0)
        sampler = EpochSampler(len(splits.train), 0, args.batch_size)
        recalibrate(model, train_loader(splits.train, sampler, 0), args.batches)
        row.update(val_after=evaluate(model, val, "cpu"), test_after=evaluate(model, test, "cpu"))
        print(json.dumps(row))
        rows.append(row)
    result = {"batches": args.batches, "batch_size": args.batch_size, "runs": rows}
    atomic_write_bytes(args.json, json.dumps(result, indent=2).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
