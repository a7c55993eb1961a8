"""Plots and tables of a run directory (``s2hpruner report`` redraws them)."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .files import atomic_write_bytes  # noqa: E402


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_figure(fig, path: Path) -> None:
    """Write ``fig`` as a PNG atomically (a crash leaves the old picture) and close it."""
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def plot_run(run_dir: str | Path) -> list[Path]:
    """accuracy.png (soft vs hard per epoch, and the starting model), flops.png (hard ratio
    of every budgeted resource against its target), widths.png."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    start = next((r for r in records if "val_top1_full" in r), None)
    records = [r for r in records if "val_top1_soft" in r]  # the epochs
    if not records:
        return []
    epochs = [r["epoch"] for r in records]
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["val_top1_soft"] for r in records], "o-", label="soft network")
    ax.plot(epochs, [r["val_top1_hard"] for r in records], "s-", label="hard network")
    if start is not None:
        ax.axhline(start["val_top1_full"], color="gray", ls=":", label="starting model")
    ax.set(xlabel="epoch", ylabel="validation top-1 (%)", title="Soft vs hard accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, run_dir / "accuracy.png")
    written.append(run_dir / "accuracy.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["flops_ratio_soft"] for r in records], "o-", label="FLOPs, soft")
    ax.plot(epochs, [r["flops_ratio_hard"] for r in records], "s-", label="FLOPs, hard (kept)")
    budgets = records[-1].get("budgets") or {"flops": records[-1]["target_flops"]}
    for i, (name, target) in enumerate(budgets.items()):
        color = f"C{i + 2}"
        if name != "flops":
            ratios = [r.get("ratios_hard", {}).get(name, float("nan")) for r in records]
            ax.plot(epochs, ratios, "^-", color=color, label=f"{name}, hard (kept)")
        ax.axhline(target, color=color if name != "flops" else "k", ls="--",
                   label=f"{name} target")  # fmt: skip
    ax.set(xlabel="epoch", ylabel="ratio of the full model", title="Resources against the budget",
           ylim=(0, 1.05))  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, run_dir / "flops.png")
    written.append(run_dir / "flops.png")

    final = records[-1]
    names = list(final["widths"])
    kept = [final["widths"][n] / final["channels"][n] for n in names]
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(names)), 4))
    ax.bar(range(len(names)), [1.0] * len(names), color="#dddddd", label="full")
    ax.bar(range(len(names)), kept, color="#3b75af", label="kept")
    for i, n in enumerate(names):
        ax.text(
            i,
            kept[i] + 0.01,
            f"{final['widths'][n]}/{final['channels'][n]}",
            ha="center",
            va="bottom",
            fontsize=6,
            rotation=90,
        )
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set(ylabel="kept fraction of channels", title="Kept width per group", ylim=(0, 1.25))
    ax.legend(loc="upper right")
    save_figure(fig, run_dir / "widths.png")
    written.append(run_dir / "widths.png")
    return written


def summary_table(report: dict) -> str:
    """A small text table of a report (printed at the end of ``s2hpruner prune``)."""
    rows = [
        ("method", report["method"]),
        ("model / dataset", f"{report['model']} / {report['dataset']}"),
        ("budgets", ", ".join(f"{k} {report[f'target_{k}']:.3f}"
                              for k in ("flops", "params", "latency")
                              if report.get(f"target_{k}") is not None)),
        ("top-1 hard (exported, test)", f"{report['top1_hard']:.2f}%"),
        ("top-1 soft (test)", f"{report['top1_soft']:.2f}%"),
        ("gap soft - hard", f"{report['gap']:+.2f} points"),
        ("FLOPs ratio (counted)", f"{report['flops_ratio']:.4f}"),
        ("params ratio", f"{report['params_ratio']:.4f}"),
        (
            "latency speedup b1 / b64",
            f"{report['latency_speedup_b1']:.2f}x / {report['latency_speedup_b64']:.2f}x",
        ),
        ("epochs / train time", f"{report['epochs']:g} / {report['train_seconds']:.0f} s"),
    ]
    if report.get("top1_start_val") is not None:
        rows.insert(3, ("top-1 of the starting model (val)", f"{report['top1_start_val']:.2f}%"))
    if report.get("latency_ratio") is not None:
        rows.append(("latency ratio measured / predicted",
                     f"{report['latency_ratio']:.3f} / {report['latency_ratio_predicted']:.3f} "
                     f"(batch {report['latency_batch']})"))  # fmt: skip
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 30)
    return "\n".join([line] + [f"{k:<{width}}  {v}" for k, v in rows] + [line])
