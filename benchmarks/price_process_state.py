"""Does an S2HPruner run earlier in the same process change a baseline network's step price? A
probe (round 41).

Prices L1's network of ``from-trained-replicate-035-width-step`` (unaligned global L1 at 0.35,
as ``benchmarks.baselines.own_step_cost`` prices it for a compute budget) in this fresh
process, then runs S2HPruner's recipe of that profile for the same seed in the process (its
report measures latency, which pins glibc's allocator), then prices the same network twice
more. Run it with and without the allocator pinned from the start, to tell the two apart:

    python -m benchmarks.price_process_state SEED
    MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647 \\
        python -m benchmarks.price_process_state SEED

The run's report times its latency in this process (``latency_process: same``, as every run
did until round 42); ``--latency-process fresh`` times it in a child, as runs now do, to show
that the run then leaves the price alone.

Prints one JSON line per price.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from . import baselines
from .compare import PROFILES, RunSpec, prune_record, run_config, run_options

PROFILE = "from-trained-replicate-035-width-step"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("seed", type=int)
    parser.add_argument("--out", default="runs/price_process_state")
    parser.add_argument("--latency-process", choices=("same", "fresh"), default="same",
                        help="where the S2HPruner run's report times its latency")
    args = parser.parse_args(argv)
    profile = dataclasses.replace(PROFILES[PROFILE], progress=False)
    l1 = profile.search["l1-ft"][1]  # unaligned global L1, validation's choice
    out = Path(args.out)
    cfg = run_config(profile, RunSpec("l1-ft", 0.35, args.seed, "compute"), 1.0, out / "l1", l1)
    options = run_options(profile, l1)

    def price(when: str) -> None:  # in this process, as a run prices (not a fresh one)
        cost = baselines.own_step_price("l1-ft", cfg, options)
        print(json.dumps({"seed": args.seed, "when": when, "layout": cost["proxy_layout"],
                          "latency_process": args.latency_process,
                          "ratio": round(cost["ratio"], 3),
                          "pairs": [round(r, 3) for r in cost["pair_ratios"]]}), flush=True)

    price("fresh process")
    s2h = profile.search["s2h"][1]  # round_to 4, validation's choice
    run = run_config(profile, RunSpec("s2h", 0.35, args.seed, "epochs"), 1.0,
                     out / f"s2h{args.seed}", s2h)  # fmt: skip
    prune_record(dataclasses.replace(run, latency_process=args.latency_process), resume=False)
    price("after an S2HPruner run in the process")
    price("again")


if __name__ == "__main__":
    main()
