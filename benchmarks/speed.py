"""Speed of an S2HPruner step against a plain training step, and of the exported model.

    python -m benchmarks.speed --model resnet20 --target-flops 0.35 --batch-size 128 \
        --json benchmarks/results/speed_resnet20.json

Everything is measured in one process on one machine, as ratios: the functions compared take
turns within each of 5 rounds (medians of repeated timings after warm-up), and a ratio is the
median over rounds of its within-round value, so a machine whose speed drifts (a shared VM)
skews both sides alike. ``phases_over_plain_step`` times the pieces of a step alone: soft
forward(+backward), the mask-only backward G_s adds, the sliced hard pass, and the exported
network's own training pass (the floor of the hard pass on this machine); ``speed_report``
turns them into floors for the step. Peak memory is
measured in fresh subprocesses (one per kind of step) as the rise of the resident set's
high-water mark over its value after warm-up (Linux ``/proc/self/clear_refs``), or with
``torch.cuda.max_memory_allocated`` on CUDA.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from s2hpruner import S2HPruner, count_flops
from s2hpruner.app.config import RunConfig
from s2hpruner.app.models import create_model
from s2hpruner.app.run import build_trainer
from s2hpruner.core.layout import tune_hard_layout
from s2hpruner.core.measure import latency_speedup, memory_format_of
from s2hpruner.core.trainer import project_to_budget

IN_CHANS, SIZE, CLASSES = 1, 28, 10  # Fashion-MNIST geometry


def setup(model_name: str, target: float, batch: int, device: torch.device, seed: int = 0,
          width_step: int | None = None, round_to: int | None = None):
    torch.manual_seed(seed)
    model = create_model(model_name, num_classes=CLASSES, in_chans=IN_CHANS).to(device)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(batch, IN_CHANS, SIZE, SIZE, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, CLASSES, (batch,), device=device)
    pruner = S2HPruner(model, x[:1], target_flops=target, width_step=width_step,
                       round_to=round_to, separate_hard_bn_stats=True)
    project_to_budget(pruner, 0.005)  # time the search where it spends its epochs
    tune_hard_layout(pruner, x)  # as training does at every epoch's start (hard_layout=auto)
    # the run's trainer, in the joint search phase for every step timed here
    cfg = RunConfig(model=model_name, target_flops=target, batch_size=batch, warmup=0.0,
                    freeze=0.0)  # fmt: skip
    trainer, schedule = build_trainer(cfg, model, pruner, total_steps=10_000)
    for group in trainer.mask_optimizer.param_groups:  # full steps, widths kept at the budget
        group["lr"] = 0.0
    plain_opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def plain_step():
        plain_opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        plain_opt.step()

    def s2h_step():
        trainer.step(x, y)  # both forwards, the four losses, both optimizer steps
        schedule.step()  # as the run's loop does after every step

    def s2h_step_model_layout():
        """The same step with the hard pass in the model's layout (hard_layout=model)."""
        tuned, pruner.hard_layout = pruner.hard_layout, None
        try:
            s2h_step()
        finally:
            pruner.hard_layout = tuned

    def bookkeeping():
        """Everything a step does besides forwards and backwards of the network."""
        pruner.update_ranks()
        soft = pruner.flat_masks("soft")
        hard = pruner.flat_masks("hard")
        if pruner.sliced_hard:
            with pruner._sliced.apply(hard.detach() > 0.5, hard, pruner.hard_layout,
                                      pruner.hard_nchw_norms):  # fmt: skip
                pass
        resource = pruner.resource_loss(cfg.resource_on)
        torch.autograd.grad(resource + soft.sum() * 0 + hard.sum() * 0,
                            pruner.mask_parameters(), allow_unused=True)
        float(pruner.budget_excess("hard").detach())  # the balancer's update

    return Bench(model, pruner, x, y, plain_step, s2h_step, s2h_step_model_layout, bookkeeping)


@dataclass
class Bench:
    model: torch.nn.Module
    pruner: S2HPruner
    x: torch.Tensor
    y: torch.Tensor
    plain_step: Callable[[], None]
    s2h_step: Callable[[], None]
    s2h_step_model_layout: Callable[[], None]
    bookkeeping: Callable[[], None]

    def phases(self) -> dict[str, Callable[[], None]]:
        """The pieces of an S2HPruner step, each timed alone (where the time goes)."""
        model, pruner, x, y = self.model, self.pruner, self.x, self.y
        weights, masks = list(model.parameters()), pruner.mask_parameters()
        layout = pruner.hard_layout  # the exported network in the layout the hard pass uses
        layout = memory_format_of(model) if layout is None else layout
        exported = pruner.export().to(memory_format=layout).train()
        x_exported = x.contiguous(memory_format=layout)

        def soft_forward():
            with pruner.mode("soft"):
                model(x)

        def soft(inputs):
            with pruner.mode("soft"):
                loss = F.cross_entropy(model(x), y)
            torch.autograd.grad(loss, inputs)

        def hard_forward_backward():
            with pruner.mode("hard"):
                loss = F.cross_entropy(model(x), y)
            torch.autograd.grad(loss, weights + masks)

        def exported_forward_backward():
            loss = F.cross_entropy(exported(x_exported), y)
            torch.autograd.grad(loss, list(exported.parameters()))

        return {
            "soft_forward": soft_forward,
            "soft_forward_backward": lambda: soft(weights + masks),
            "soft_forward_mask_backward": lambda: soft(masks),  # what G_s adds: its backward
            "hard_forward_backward": hard_forward_backward,
            "exported_forward_backward": exported_forward_backward,  # the hard pass's floor
        }


def timed(fn, repeats: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return times


def interleaved(fns: dict, repeats: int, rounds: int = 5) -> dict[str, list[float]]:
    """Per round, the median seconds per call of each function; the functions take turns
    within a round, so a ratio of two of them is measured under the same machine load."""
    medians: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            medians[name].append(statistics.median(timed(fn, repeats)))
    return medians


def ratio(times: dict[str, list[float]], num: str, den: str) -> float:
    """Median over rounds of the within-round ratio (robust to a machine that drifts)."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(kind: str, args) -> float:
    """Peak extra memory (bytes) of ``kind`` steps ('plain' or 's2h') in this process."""
    device = torch.device(args.device)
    bench = setup(args.model, args.target_flops, args.batch_size, device,
                  width_step=args.width_step, round_to=args.round_to)
    step = bench.plain_step if kind == "plain" else bench.s2h_step
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    base = _rss_kib("VmRSS")
    for _ in range(3):
        step()
    return 1024.0 * (_rss_kib("VmHWM") - base)


def machine() -> dict:
    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--target-flops", type=float, default=0.35)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per round")
    parser.add_argument("--width-step", type=int, default=None,
                        help="candidate width step d (SPEC section 3; default: the pruner's)")
    parser.add_argument("--round-to", type=int, default=None,
                        help="kept widths are multiples of this (default: any candidate width)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--memory-only", choices=("plain", "s2h"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_only:
        print(json.dumps({"peak_bytes": peak_memory(args.memory_only, args)}))
        return {}

    device = torch.device(args.device)
    bench = setup(args.model, args.target_flops, args.batch_size, device,
                  width_step=args.width_step, round_to=args.round_to)
    model, pruner, x = bench.model, bench.pruner, bench.x
    times = interleaved({"plain": bench.plain_step, "s2h": bench.s2h_step,
                         "s2h_model_layout": bench.s2h_step_model_layout,
                         "bookkeeping": bench.bookkeeping}, args.repeats)
    phase_times = interleaved({"plain": bench.plain_step, **bench.phases()}, args.repeats)
    phases = {k: ratio(phase_times, k, "plain") for k in phase_times if k != "plain"}
    phases["mask_backward"] = phases["soft_forward_mask_backward"] - phases["soft_forward"]
    memory = {}
    for kind in ("plain", "s2h"):
        out = subprocess.run(
            [sys.executable, "-m", "benchmarks.speed", "--memory-only", kind, "--model",
             args.model, "--target-flops", str(args.target_flops), "--batch-size",
             str(args.batch_size), "--device", args.device]
            + ([] if args.width_step is None else ["--width-step", str(args.width_step)])
            + ([] if args.round_to is None else ["--round-to", str(args.round_to)]),
            capture_output=True, text=True, check=True,
            # fixed malloc thresholds: freed activations leave the resident set at once, so
            # its high-water mark is the real peak (glibc's adaptive thresholds keep them)
            env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072",
                 "MALLOC_TRIM_THRESHOLD_": "131072"},
        )
        memory[kind] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    exported = pruner.export().eval()
    example = x[:1]
    full = model.eval()
    flops_ratio = count_flops(exported, example) / count_flops(full, example)
    speed = latency_speedup(full, exported, example, repeats=30)
    result = {
        "model": args.model,
        "target_flops": args.target_flops,
        "batch_size": args.batch_size,
        "width_step": args.width_step,
        "round_to": args.round_to,
        "device": str(device),
        "sliced_hard_forward": pruner.sliced_hard,
        "hard_layout": str(pruner.hard_layout).removeprefix("torch."),
        "hard_nchw_norms": pruner.hard_nchw_norms,
        "step_ratio": ratio(times, "s2h", "plain"),
        "step_ratio_model_layout": ratio(times, "s2h_model_layout", "plain"),
        "bookkeeping_share": ratio(times, "bookkeeping", "s2h"),
        "peak_mem_ratio": memory["s2h"] / memory["plain"],
        "latency_speedup_b1": speed["b1"],
        "latency_speedup_b64": speed["b64"],
        "flops_ratio": flops_ratio,
        "kept_widths": pruner.kept_widths(),
        "ideal_speedup": 1.0 / flops_ratio,
        "phases_over_plain_step": phases,
        "seconds": {"plain_step": statistics.median(times["plain"]),
                    "s2h_step": statistics.median(times["s2h"]),
                    "bookkeeping": statistics.median(times["bookkeeping"]), **{
                        k: v for k, v in speed.items() if k.endswith("seconds")}},
        "latency_rounds": {k: v for k, v in speed.items() if k.endswith("rounds")},
        "peak_bytes": memory,
        "machine": machine(),
        "command": "python -m benchmarks.speed " + " ".join(sys.argv[1:] if argv is None
                                                             else argv),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.json)
    return result


if __name__ == "__main__":
    main()
