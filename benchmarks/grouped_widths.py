"""What a grouped convolution costs at each width per conv group on this machine.

    python -m benchmarks.grouped_widths --json benchmarks/results/grouped_widths.json

A grouped conv keeps its number of conv groups when pruned (core/kinds/grouped.py), so what a
pruned one runs is every conv group at a narrower width. Kernels run it conv group by conv
group, so its latency is a function of that width, not of the total channels. This times
the inference forward of a 3x3 grouped conv (by default RegNetX-400MF's first stage on a
28x28 image: 2 conv groups of 16 channels, 14x14 maps, batch 64) at every width per conv
group from 1 to 16, input and output alike, in NCHW and channels_last: what the latency
tables (core/resources/latency.py) must see for the pruner to skip the slow widths. Medians
over rounds of alternated timings.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from benchmarks.speed import interleaved, machine
from s2hpruner.app.files import atomic_write_bytes


def forward(groups: int, per_group: int, side: int, batch: int, layout: torch.memory_format):
    width = groups * per_group
    conv = torch.nn.Conv2d(width, width, 3, padding=1, groups=groups).eval()
    x = torch.randn(batch, width, side, side).contiguous(memory_format=layout)
    conv = conv.to(memory_format=layout)

    def run():
        with torch.no_grad():
            conv(x)

    return run


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for layout, ms in result["milliseconds"].items():
        widths = sorted(int(w) for w in ms)
        ax.plot(widths, [ms[str(w)] for w in widths], marker="o", label=layout)
    ax.set_xlabel("channels per conv group")
    ax.set_ylabel("forward, ms")
    ax.set_title(f"3x3 grouped conv, {result['groups']} conv groups, "
                 f"{result['side']}x{result['side']}, batch {result['batch_size']}")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--groups", type=int, default=2)
    parser.add_argument("--max-width", type=int, default=16)
    parser.add_argument("--side", type=int, default=14)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the results here (and a .png beside)")
    args = parser.parse_args(argv)
    result = {"groups": args.groups, "side": args.side, "batch_size": args.batch_size,
              "machine": machine(), "milliseconds": {}}  # fmt: skip
    for name, layout in (("NCHW", torch.contiguous_format), ("channels_last", torch.channels_last)):
        fns = {w: forward(args.groups, w, args.side, args.batch_size, layout)
               for w in range(1, args.max_width + 1)}  # fmt: skip
        rounds = interleaved(fns, args.repeats, args.rounds)
        ms = {str(w): 1e3 * statistics.median(v) for w, v in rounds.items()}
        result["milliseconds"][name] = ms
        print(name, {w: round(v, 2) for w, v in ms.items()})
    if args.json:
        atomic_write_bytes(args.json, json.dumps(result, indent=2).encode())
        plot(result, args.json.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
