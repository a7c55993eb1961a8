"""What a narrow layer costs on this machine: the kernels under a pruned network's training step.

    python -m benchmarks.kernels --json benchmarks/results/kernels.json

The speed targets of a pruned step assume that a layer's time scales with its FLOPs. This
measures whether it does here, for the layers of resnet20 (3x3 conv and BatchNorm, batch 128,
28x28 input) at the full widths and at the kept widths of a 0.35-FLOPs resnet20: a conv's
training forward+backward in channels_last, and a BatchNorm's training forward+backward in
channels_last and in NCHW (with the two layout copies the sliced forward pays for it).
Medians over repeated timings after warm-up, timed alternately.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.speed import machine, timed

CL = torch.channels_last
# (feature map side, full width, kept width at 0.35 FLOPs, from benchmarks/results/speed_resnet20)
STAGES = [(28, 16, 9), (14, 32, 20), (7, 64, 38)]


def conv_step(side: int, channels: int, batch: int):
    conv = torch.nn.Conv2d(channels, channels, 3, padding=1, bias=False).to(memory_format=CL)
    x = torch.randn(batch, channels, side, side).contiguous(memory_format=CL).requires_grad_()
    return lambda: torch.autograd.grad(conv(x).sum(), [x, conv.weight])


def norm_step(side: int, channels: int, batch: int, nchw: bool):
    x = torch.randn(batch, channels, side, side).contiguous(memory_format=CL).requires_grad_()
    weight = torch.ones(channels, requires_grad=True)
    bias = torch.zeros(channels, requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        inp = x.contiguous() if nchw else x
        out = F.batch_norm(inp, None, None, weight, bias, training=True)
        out = out.contiguous(memory_format=CL)
        torch.autograd.grad(out, [x, weight, bias], grad)

    return step


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    rows = []
    for side, full, kept in STAGES:
        fns = {}
        for width in (full, kept):
            fns[f"conv_{width}"] = conv_step(side, width, args.batch_size)
            fns[f"bn_cl_{width}"] = norm_step(side, width, args.batch_size, nchw=False)
            fns[f"bn_nchw_{width}"] = norm_step(side, width, args.batch_size, nchw=True)
        samples: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(3):
            for name, fn in fns.items():
                samples[name] += timed(fn, args.repeats)
        ms = {k: 1e3 * statistics.median(v) for k, v in samples.items()}
        rows.append({
            "side": side, "full_width": full, "kept_width": kept,
            "conv_flops_ratio": (kept / full) ** 2,
            "conv_time_ratio": ms[f"conv_{kept}"] / ms[f"conv_{full}"],
            "bn_channels_last_time_ratio": ms[f"bn_cl_{kept}"] / ms[f"bn_cl_{full}"],
            "bn_nchw_time_ratio": ms[f"bn_nchw_{kept}"] / ms[f"bn_cl_{full}"],
            "milliseconds": ms,
        })
        print(json.dumps(rows[-1]))
    result = {"rows": rows, "batch_size": args.batch_size, "machine": machine(),
              "command": "python -m benchmarks.kernels "
              + " ".join(sys.argv[1:] if argv is None else argv)}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, args.json)
    return result


if __name__ == "__main__":
    main()
