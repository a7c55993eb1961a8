"""What the sliced hard pass's weight gradient costs: autograd's ``index_select`` backward
against :func:`s2hpruner.core.sliced.take_channels`, side by side, in one process.

    python -m benchmarks.sliced_backward --json benchmarks/results/sliced_backward.json

1. Kernels: the backward of one sliced weight of each resnet20 shape (two ``index_select`` s
   and the layout copy), timed alternately, medians.
2. The joint search step: two S2HPruner trainers built alike (S2HPruner's chosen recipe of
   ``from-trained-iterative-015-own-steps``, resnet20 at 0.15 from the trained checkpoint)
   walk the whole joint search on the same batches, one slicing its weights the old way and
   one the new, with a plain full-model block beside each pair of blocks; the order rotates
   block by block so that drift cancels. Both must end with the same width logits and
   weights, bit for bit: the new backward copies where the old one added into zeros.

``--competing-threads N`` runs a second process of N threads training a small conv net
throughout, as when another job shares the cores: autograd's ``index_add_`` backward
is parallelised with OpenMP, and its threads then wait on each other.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from s2hpruner.app import run as app_run
from s2hpruner.app.checkpoint import seed_everything
from s2hpruner.app.optim import build_weight_optimizer, set_mask_lr
from s2hpruner.core import sliced
from s2hpruner.core.layout import tune_hard_layout

from . import compare
from .baselines import build_model, load_data, pick_device
from .search_share_probe import PROFILE, RECIPE
from .speed import machine, timed
from .step_timing import _batches, _timed

CL = torch.channels_last
FAST = sliced.take_channels


def autograd_slice(weight, out_idx, in_idx, layout=torch.contiguous_format):
    """The sliced weight as rounds 1-37 took it: autograd's own ``index_select`` backward."""
    if out_idx is not None:
        weight = weight.index_select(0, out_idx)
    if in_idx is not None:
        weight = weight.index_select(1, in_idx)
    return weight.clone(memory_format=layout) if weight.dim() == 4 else weight


COMPETITOR = """
import torch
torch.set_num_threads({threads})
net = torch.nn.Sequential(torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.BatchNorm2d(32),
                          torch.nn.ReLU(), torch.nn.Conv2d(32, 32, 3, padding=1))
net = net.to(memory_format=torch.channels_last)
x = torch.randn(128, 16, 28, 28).contiguous(memory_format=torch.channels_last)
while True:
    net(x).square().mean().backward()
"""  # another training job on the same cores
WAYS = {"index_select": autograd_slice, "take_channels": FAST}


def _backward(slice_fn, weight, out_idx, in_idx, upstream):
    return lambda: torch.autograd.grad(slice_fn(weight, out_idx, in_idx, CL), weight, upstream)


def kernels(repeats: int) -> list[dict]:
    """Backward of one sliced resnet20 weight (channels_last), both ways, in milliseconds."""
    rows = []
    for shape, kept in [((16, 16, 3, 3), (9, 9)), ((32, 32, 3, 3), (20, 20)),
                        ((64, 64, 3, 3), (38, 38)), ((64, 32, 1, 1), (38, 20))]:  # fmt: skip
        weight = torch.randn(shape, requires_grad=True)
        generator = torch.Generator().manual_seed(0)
        out_idx, in_idx = (torch.randperm(n, generator=generator)[:k].sort().values
                           for n, k in zip(shape[:2], kept, strict=True))  # fmt: skip
        upstream = torch.randn(kept[0], kept[1], *shape[2:]).contiguous(memory_format=CL)
        fns = {way: _backward(f, weight, out_idx, in_idx, upstream) for way, f in WAYS.items()}
        samples: dict[str, list[float]] = {way: [] for way in WAYS}
        for _ in range(3):
            for way, fn in fns.items():
                samples[way] += timed(fn, repeats)
        ms = {way: 1e3 * statistics.median(v) for way, v in samples.items()}
        rows.append({"shape": list(shape), "kept": list(kept), "milliseconds": ms,
                     "speedup": ms["index_select"] / ms["take_channels"]})  # fmt: skip
        print(json.dumps(rows[-1]))
    return rows


def joint_search(seed: int, block: int) -> dict:
    """The whole joint search of the profile's run, both ways, beside plain steps."""
    profile = compare.PROFILES[PROFILE]
    spec = compare.RunSpec("s2h", 0.15, seed, "epochs")
    cfg = compare.run_config(profile, spec, 1.0, Path("runs/sliced_backward"), RECIPE)
    cfg = dataclasses.replace(cfg, progress=False)
    device = pick_device(cfg.device)
    seed_everything(cfg.seed)
    data = load_data(cfg, device)
    total = max(1, round(cfg.resolve_epochs(data.steps_per_epoch) * data.steps_per_epoch))
    trainers = {}
    for way in WAYS:
        seed_everything(cfg.seed)
        model, pruner, _ = app_run.build_model_and_pruner(cfg, data.splits.spec, device)
        trainer, schedule = app_run.build_trainer(cfg, model, pruner, total, data.splits.spec)
        model.train()
        trainers[way] = (trainer, schedule)
    plain = build_model(cfg, data)
    plain.train()
    optimizer, _ = build_weight_optimizer(plain, cfg, 1)
    x0, _ = next(_batches(data, cfg, 0, 1))
    tuned, other = (t.pruner for t, _ in trainers.values())
    if cfg.hard_layout == "auto":  # as a run does at its start; both then train alike
        tune_hard_layout(tuned, x0)
    other.hard_layout, other.hard_nchw_norms = tuned.hard_layout, tuned.hard_nchw_norms
    layout = {"hard_layout": str(tuned.hard_layout), "hard_nchw_norms": tuned.hard_nchw_norms}

    def s2h(way: str, batches: list) -> float:
        trainer, schedule = trainers[way]
        sliced.take_channels = WAYS[way]  # the sliced pass looks it up at each entry
        try:
            def work() -> None:
                for x, y in batches:
                    trainer.step(x, y)
                    schedule.step()
                    set_mask_lr(trainer.mask_optimizer, cfg, schedule)
            return _timed(device, work)
        finally:
            sliced.take_channels = FAST

    def plain_block(batches: list) -> float:
        def work() -> None:
            for x, y in batches:
                loss = F.cross_entropy(plain(x), y, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return _timed(device, work)

    plain_block(list(_batches(data, cfg, 0, block)))  # untimed: first allocations
    first = trainers["index_select"][0]
    seconds = {way: 0.0 for way in WAYS} | {"plain": 0.0}
    sides = ("index_select", "take_channels", "plain")
    orders = [sides[i:] + sides[:i] for i in range(len(sides))]  # rotated block by block
    start, turn = first.warmup_end, 0
    while start < first.freeze_start:
        steps = min(block, first.freeze_start - start)
        # drawn once: the augmentation draws from the global generator, so every side gets
        # these very tensors
        batches = list(_batches(data, cfg, start, steps))
        for side in orders[turn % len(orders)]:
            seconds[side] += plain_block(batches) if side == "plain" else s2h(side, batches)
        start, turn = start + steps, turn + 1
    a, b = (trainers[way][0] for way in WAYS)
    same = all(torch.equal(p, q) for p, q in zip(a.pruner.mask_parameters(),
                                                 b.pruner.mask_parameters(), strict=True)) and \
        all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(),
                                              strict=True))  # fmt: skip
    if not same:
        raise AssertionError("the two ways of slicing trained different networks")
    steps = first.freeze_start - first.warmup_end
    return {
        "seed": seed, "search_steps": steps, "block_steps": block, "hard_pass": layout,
        "final_flops_ratio": a.pruner.ratios("hard").get("flops"),
        "seconds": seconds,
        "joint_step_in_plain_steps": {way: seconds[way] / seconds["plain"] for way in WAYS},
        "speedup": seconds["index_select"] / seconds["take_channels"],
        "identical_networks": same,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--seeds", default="0", help="comma list: one joint search each")
    parser.add_argument("--block", type=int, default=4, help="steps per timed block")
    parser.add_argument("--competing-threads", type=int, default=0,
                        help="threads of a second process training a small conv net")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    competitor = None
    if args.competing_threads:
        competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR.format(
            threads=args.competing_threads)])  # fmt: skip
    try:
        result = {"kernels": kernels(args.repeats), "joint_search": []}
        for seed in (int(s) for s in args.seeds.split(",")):
            result["joint_search"].append(joint_search(seed, args.block))
            print(json.dumps(result["joint_search"][-1]))
    finally:
        if competitor is not None:
            competitor.kill()
    result |= {"competing_threads": args.competing_threads, "profile": PROFILE, "recipe": RECIPE,
               "machine": machine(),
               "threads": torch.get_num_threads(), "load_average": os.getloadavg(),
               "seconds": time.perf_counter() - start,
               "command": "python -m benchmarks.sliced_backward "
               + " ".join(sys.argv[1:] if argv is None else argv)}  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        os.replace(tmp, args.json)
    return result


if __name__ == "__main__":
    main()
