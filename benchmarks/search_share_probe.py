"""Probe (round 37): S2HPruner on resnet20 at 0.15 with a shorter search and a longer pruned
phase at about the wall time of the benchmark's recipe (1 epoch, freeze 0.85). Only the
validation top-1 decides; the test top-1 is printed beside it.

    python -m benchmarks.search_share_probe 1.25 0.92 0 --out runs/probe

Each run is S2HPruner's chosen recipe of profile ``from-trained-iterative-015-own-steps``
(built by ``compare.run_config``) with ``epochs`` and ``freeze`` replaced. A line per run is
appended to ``benchmarks/results/search_share_probe.jsonl``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from s2hpruner.app.run import prune

from . import compare

PROFILE = "from-trained-iterative-015-own-steps"
RECIPE = {"lr": 0.03, "freeze_teacher": "none", "freeze": 0.85, "descent": 0.8}  # its choice
RESULTS = Path(__file__).parent / "results" / "search_share_probe.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("epochs", type=float)
    parser.add_argument("freeze", type=float)
    parser.add_argument("seed", type=int)
    parser.add_argument("--out", default="runs/search_share_probe")
    args = parser.parse_args()
    profile = compare.PROFILES[PROFILE]
    spec = compare.RunSpec("s2h", 0.15, args.seed, "epochs")
    out = Path(args.out) / f"e{args.epochs}-f{args.freeze}-s{args.seed}"
    cfg = compare.run_config(profile, spec, args.epochs, out, {**RECIPE, "freeze": args.freeze})
    cfg = dataclasses.replace(cfg, progress=False, overwrite=True)
    start = time.perf_counter()
    report = prune(cfg)
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    record = {"epochs": args.epochs, "freeze": args.freeze, "seed": args.seed,
              "val_top1": last.get("val_top1_hard"), "test_top1": report.get("top1_hard"),
              "flops_ratio": report.get("flops_ratio"),
              "train_seconds": report.get("train_seconds"),
              "wall_seconds": time.perf_counter() - start}  # fmt: skip
    print(json.dumps(record))
    with RESULTS.open("a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
