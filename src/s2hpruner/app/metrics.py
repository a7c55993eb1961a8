"""What a run writes as it goes: one JSON line per epoch and the same as TensorBoard events."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..core import distributed as D

SCALARS = (
    "val_top1_soft",
    "val_top1_hard",
    "gap",
    "flops_ratio_soft",
    "flops_ratio_hard",
    "lr",
)


def append_jsonl(path: Path, record: dict) -> None:
    """Append one record and make it durable (a killed run keeps every finished epoch)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def reduced_sums(running: dict) -> dict:
    """The epoch's loss sums (and step count ``n``) summed over ranks."""
    if not D.is_distributed() or not running:
        return running
    keys = list(running)  # the same order on every rank (same code path)
    total = D.all_reduce_sum(torch.tensor([float(running[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, total.tolist(), strict=True))


class MetricWriter:
    """TensorBoard events of the run (rank 0 only; a run goes on without tensorboard)."""

    def __init__(self, out: Path):
        self.writer = None
        if not D.is_main():
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return
        self.writer = SummaryWriter(str(out / "tensorboard"))

    def log(self, record: dict) -> None:
        if self.writer is None:
            return
        step = record["step"]
        for key in SCALARS:
            if key in record:
                self.writer.add_scalar(key, record[key], step)
        for key, value in record.get("losses", {}).items():
            self.writer.add_scalar(f"loss/{key}", value, step)
        for mode in ("soft", "hard"):
            for key, value in record.get(f"ratios_{mode}", {}).items():
                self.writer.add_scalar(f"ratio_{mode}/{key}", value, step)
        for name, width in record.get("widths", {}).items():
            self.writer.add_scalar(f"width/{name}", width, step)
        self.writer.flush()

    def log_step(self, step: int, losses: dict[str, float], ratios_hard: dict[str, float]
                 ) -> None:  # fmt: skip
        """Within-epoch trace (``step/`` scalars): how fast the search reaches the budget
        matters most in short runs, where an epoch is the whole search."""
        if self.writer is None:
            return
        for key, value in losses.items():
            self.writer.add_scalar(f"step/loss/{key}", value, step)
        for key, value in ratios_hard.items():
            self.writer.add_scalar(f"step/ratio_hard/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
