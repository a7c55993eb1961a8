"""Are the latency tables right inside the whole network? Each timed layer, in the network
and by its table.

The latency model prices widths with tables of layers timed alone (conv + its BatchNorm,
fresh weights, a random input). This times the same calls inside the whole network: a
forward pre-hook on the conv and a forward hook on the BatchNorm that consumes its output
(on the layer itself when there is none), in eval mode under no_grad, at the latency batch
and the model's layout, median over ``--repeats`` forwards after warm-up. It does so for the
full model and for each run's exported network (its ``kept_widths``), and sets each call's
time beside the table's value at the same widths. At the kept widths it also lists each
group's latency price per channel: the tables' slope, their secant over one step of the kept
width (what the search follows) and FLOPs'.

Round 18 used it to tell two explanations of a latency search's choice apart: tables that
misprice layers in a narrow network, or a gradient that misreads correct tables (the slope of
a staircase). ``--vary GROUP=W1,W2,...`` re-times the network with one group at each width.

    python -m benchmarks.latency_in_network runs/latency_budget_intel/resnet20_latency \\
        --json benchmarks/results/latency_in_network.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from s2hpruner.app.config import RunConfig
from s2hpruner.app.data import dataset_spec
from s2hpruner.app.files import atomic_write_bytes
from s2hpruner.app.run import build_model_and_pruner
from s2hpruner.core.resources.latency import LatencyModel, _placed, _record_calls


@torch.no_grad()
def call_times(net: nn.Module, example: torch.Tensor, table: LatencyModel,
               repeats: int) -> tuple[dict[str, float], float]:  # fmt: skip
    """Median seconds of each of ``table``'s calls inside ``net`` (by layer name, a layer
    called twice sums), and of the whole forward, at the table's batch, device and layout."""
    net, x = _placed(net, example, table.batch_size, table.device, table.memory_format)
    net.eval()
    modules, wanted = dict(net.named_modules()), set(table.call_names)
    started: dict[str, float] = {}
    times: dict[str, list[float]] = {}
    handles = []
    for name, _, bn, _ in _record_calls(net, example.to(table.device)):
        if name not in wanted:
            continue
        end = bn if bn is not None else modules[name]

        def start(mod, args, name=name):
            started[name] = time.perf_counter()

        def stop(mod, args, out, name=name):
            times.setdefault(name, []).append(time.perf_counter() - started[name])

        handles += [modules[name].register_forward_pre_hook(start),
                    end.register_forward_hook(stop)]  # fmt: skip
    warmup, totals = 5, []
    try:
        for i in range(warmup + repeats):
            if i == warmup:
                times.clear()
            begin = time.perf_counter()
            net(x)
            totals.append(time.perf_counter() - begin)
    finally:
        for h in handles:
            h.remove()
    per_call = {}
    for name, v in times.items():  # per forward: the sum of the layer's calls
        n = len(v) // repeats
        per_call[name] = statistics.median(sum(v[i * n : (i + 1) * n]) for i in range(repeats))
    return per_call, statistics.median(totals[warmup:])


def compare(net: nn.Module, example: torch.Tensor, table: LatencyModel, widths: torch.Tensor,
            repeats: int) -> dict:  # fmt: skip
    """One network: each call's time inside it against the table's, and the totals."""
    measured, total = call_times(net, example, table, repeats)
    by_table = table.call_costs(widths)
    rows = [{"call": name, "in_network": measured[name], "table": by_table[name]}
            for name in by_table]  # fmt: skip
    return {"total": total, "calls_in_network": sum(measured.values()),
            "calls_by_table": sum(by_table.values()), "calls": rows}


def prices(pruner, table: LatencyModel, widths: torch.Tensor) -> list[dict]:
    """Each group's latency price per channel at ``widths``, as a fraction of the full model's:
    the tables' slope there, their secant over one step of the kept width (``price_steps``:
    what the search follows since round 18) and the FLOPs ratio's slope."""
    grads = {}
    for label, steps in (("slope", None), ("step", pruner.search.hard_steps)):
        table.price_steps(steps)
        w = widths.detach().clone().requires_grad_()
        grads[label] = torch.autograd.grad(table.feature(w, "tables"), w)[0]
    table.price_steps(None)
    w = widths.detach().clone().requires_grad_()
    resources = pruner.resources
    grads["flops"] = torch.autograd.grad(resources.flops(w) / resources.full_flops, w)[0]
    return [{"group": g.name, "width": round(float(widths[i])),
             **{label: float(grad[i]) for label, grad in grads.items()}}
            for i, g in enumerate(pruner.groups)]  # fmt: skip


def run_networks(run_dir: Path, repeats: int, vary: dict[str, list[int]]) -> dict:
    """The full model and ``run_dir``'s exported network (and its ``vary`` variants)."""
    report = json.loads((run_dir / "report.json").read_text())
    cfg = RunConfig.from_yaml(run_dir / "config.yaml", progress=False)
    # groups and export need no budget search: build with a FLOPs target, time with the tables
    cfg = dataclasses.replace(cfg, target_flops=0.5, target_params=None, target_latency=None,
                              round_to=report.get("round_to", cfg.round_to))  # fmt: skip
    model, pruner, example = build_model_and_pruner(cfg, dataset_spec(cfg.dataset),
                                                    torch.device("cpu"))  # fmt: skip
    model.eval()
    table = LatencyModel(model, example, pruner.groups, batch_size=cfg.latency_batch,
                         cache=cfg.latency_cache)  # fmt: skip
    networks = {"full": compare(model, example, table, table.channels, repeats)}
    variants = {"kept": report["kept_widths"]}
    for group, values in vary.items():
        for value in values:
            variants[f"kept, {group}={value}"] = {**report["kept_widths"], group: value}
    for label, widths in variants.items():
        with pruner.at_widths(widths):
            hard = pruner.search.hard_widths().detach()
            networks[label] = {"widths": widths, **compare(pruner.export().eval(), example,
                                                           table, hard, repeats)}  # fmt: skip
            if label == "kept":
                networks[label]["prices"] = prices(pruner, table, hard)
    return {"run": str(run_dir), "model": cfg.model, "batch": cfg.latency_batch,
            "networks": networks}  # fmt: skip


def _print(result: dict) -> None:
    print(f"\n{result['run']} ({result['model']}, batch {result['batch']}), milliseconds")
    for label, net in result["networks"].items():
        inside, tables = net["calls_in_network"] * 1e3, net["calls_by_table"] * 1e3
        print(f"  {label}: whole forward {net['total'] * 1e3:.2f}; timed calls in the network "
              f"{inside:.2f}, by the tables {tables:.2f}")
    full, kept = result["networks"]["full"]["calls"], result["networks"]["kept"]["calls"]
    print(f"  {'call':24s} {'full: in net':>12s} {'table':>7s} {'kept: in net':>12s} {'table':>7s}")
    for a, b in zip(full, kept, strict=True):
        print(f"  {a['call']:24s} {a['in_network'] * 1e3:12.3f} {a['table'] * 1e3:7.3f} "
              f"{b['in_network'] * 1e3:12.3f} {b['table'] * 1e3:7.3f}")


    print("  per channel, fraction of the full latency: tables' slope, step price, FLOPs")
    for row in result["networks"]["kept"]["prices"]:
        print(f"  {row['group']:24s} {row['width']:4d} {row['slope']:8.4f} {row['step']:8.4f} "
              f"{row['flops']:8.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (config.yaml, "
                        "report.json with kept_widths)")
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--vary", action="append", default=[], metavar="GROUP=W1,W2,...",
                        help="also time the kept network with this group at each width")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    vary = {}
    for item in args.vary:
        group, _, values = item.partition("=")
        vary[group] = [int(v) for v in values.split(",")]
    results = [run_networks(run, args.repeats, vary) for run in args.runs]
    for result in results:
        _print(result)
    if args.json:
        payload = {"runs": results, "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}}  # fmt: skip
        atomic_write_bytes(args.json, json.dumps(payload, indent=2).encode())


if __name__ == "__main__":
    main()
