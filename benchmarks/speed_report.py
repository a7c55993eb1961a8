"""Table and picture of the speed results: where an S2HPruner step's time goes, per model.

    python -m benchmarks.speed_report benchmarks/results/speed_*.json \
        --png benchmarks/results/speed.png

Reads the JSON files written by ``benchmarks.speed`` and prints a Markdown table; the PNG shows,
per run, the measured step beside its phases timed alone (soft pass, G_s's mask-only backward,
sliced hard pass), with this machine's floor and the FLOPs-proportional floor, in plain steps.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

COLUMNS = ("run", "FLOPs ratio", "step_ratio", "floor here", "FLOPs-prop. floor",
           "bookkeeping", "peak mem", "latency b1", "latency b64", "0.7/rho")


def floors(result: dict) -> tuple[float, float]:
    """Two floors for ``step_ratio``, in plain steps.

    Here: what a perfect implementation of the step would cost with this machine's kernels,
    from the phases timed alone: the soft pass, G_s's mask-only backward, and the cheaper way
    of running the hard network (the sliced pass, or the exported network's own training
    pass). FLOPs-proportional: 1 + 1/3 + rho, what it would cost if every kernel's time were
    proportional to its FLOPs (the speed issue's "about 1.33 + rho")."""
    phases = result["phases_over_plain_step"]
    hard = min(phases["hard_forward_backward"], phases["exported_forward_backward"])
    here = phases["soft_forward_backward"] + phases["mask_backward"] + hard
    return here, 1.0 + 1.0 / 3.0 + result["flops_ratio"]


def label(result: dict) -> str:
    name = result["model"]
    if result.get("round_to"):
        name += f", round_to {result['round_to']}"
    if result["machine"]["threads"] == 1:
        name += ", 1 thread"
    return name


def row(result: dict) -> list[str]:
    rho = result["flops_ratio"]
    here, proportional = floors(result)
    return [label(result), f"{rho:.3f}", f"{result['step_ratio']:.2f}",
            f"{here:.2f}", f"{proportional:.2f}",
            f"{100 * result['bookkeeping_share']:.1f}%", f"{result['peak_mem_ratio']:.2f}",
            f"{result['latency_speedup_b1']:.2f}x", f"{result['latency_speedup_b64']:.2f}x",
            f"{0.7 / rho:.2f}x"]


def table(results: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row(r)) + " |" for r in results]
    return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.9 * len(results) + 2, 4.2))
    parts = [("soft pass", "soft_forward_backward", "#4c72b0"),
             ("G_s mask backward", "mask_backward", "#55a868"),
             ("sliced hard pass", "hard_forward_backward", "#c44e52")]
    top = 0.0
    for i, r in enumerate(results):  # left: the step as measured; right: its phases timed alone
        ax.bar(i - 0.2, r["step_ratio"], width=0.38, color="#999999",
               label="S2HPruner step" if i == 0 else None)
        ax.text(i - 0.2, r["step_ratio"] + 0.04, f"{r['step_ratio']:.2f}", ha="center",
                fontsize=8)
        phases, bottom = r["phases_over_plain_step"], 0.0
        for name, key, color in parts:
            ax.bar(i + 0.2, phases[key], width=0.38, bottom=bottom, color=color,
                   label=f"{name} (alone)" if i == 0 else None)
            bottom += phases[key]
        here, proportional = floors(r)
        ax.hlines(here, i - 0.42, i + 0.42, colors="black",
                  label="floor with this machine's kernels" if i == 0 else None)
        ax.hlines(proportional, i - 0.42, i + 0.42, colors="black", linestyles="dashed",
                  label="FLOPs-proportional floor" if i == 0 else None)
        top = max(top, bottom, r["step_ratio"], here)
    ax.set_ylim(0, top + 0.35)
    ax.set_xticks(range(len(results)), [label(r).replace(", ", "\n") for r in results])
    ax.set_ylabel("time / plain training step")
    ax.set_title("S2HPruner step at 35% FLOPs, batch 128, in plain training steps")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    tmp = Path(path).with_name(f".{Path(path).name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="+", help="files written by benchmarks.speed")
    parser.add_argument("--png", help="write the picture here")
    args = parser.parse_args(argv)
    results = [json.loads(Path(p).read_text()) for p in args.json]
    text = table(results)
    print(text)
    if args.png:
        plot(results, args.png)
    return text


if __name__ == "__main__":
    main()
