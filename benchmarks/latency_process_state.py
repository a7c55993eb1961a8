"""Does a latency ratio depend on what the timing process did before? A probe.

Times an exported model against the full one (``benchmarks.latency_budget``'s measurement),
then does one thing, then times again, in this process:

- ``train``: 150 plain SGD steps of the full model at batch 128 (what a run's process did);
- ``forward``: 150 no-grad forwards of the full model at batch 128;
- ``allocate``: 150 rounds of 20 CPU tensors of 0.4-2.8 MB, no model.

Run each in a fresh process, with and without glibc's ``MALLOC_MMAP_THRESHOLD_`` pinned.
Every timing of the library now holds freed memory first (``core.measure.hold_freed_cpu_memory``);
the probe turns that off unless asked (``--hold start``: before the first timing, as the
library does; ``--hold between``: only after the action, as in a process that trained first):

    for a in train forward allocate; do python -m benchmarks.latency_process_state $a \\
        --exported runs/latency_budget/resnet20_latency/model_pruned.pt \\
        --init benchmarks/cache/resnet20_fmnist_5ep.pt; done
"""

from __future__ import annotations

import argparse
import gc
import json
import os

import torch
import torch.nn.functional as F

from benchmarks.latency_budget import measured_latency_ratio
from s2hpruner.app.config import RunConfig
from s2hpruner.app.data import dataset_spec
from s2hpruner.app.run import build_model
from s2hpruner.core import measure
from s2hpruner.core.measure import hold_freed_cpu_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["train", "forward", "allocate"])
    parser.add_argument("--exported", required=True, help="a model_pruned.pt")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--init", default=None)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--hold", choices=["no", "start", "between"], default="no",
                        help="call hold_freed_cpu_memory() at the start or after the action")
    args = parser.parse_args()
    spec = dataset_spec("fashion-mnist")
    cfg = RunConfig(model=args.model, init=args.init, progress=False)
    full = build_model(cfg, spec, torch.device("cpu"))
    pruned = torch.load(args.exported, weights_only=False)
    example = torch.zeros(1, spec.in_chans, spec.image_size, spec.image_size)

    def batch() -> torch.Tensor:
        shape = (128, spec.in_chans, spec.image_size, spec.image_size)
        return torch.randn(shape).contiguous(memory_format=torch.channels_last)

    if args.hold != "start":  # the library's timings would hold it at once
        measure.hold_freed_cpu_memory = lambda: False
    before = [measured_latency_ratio(full, pruned, example, 64) for _ in range(3)]
    if args.action == "train":
        model = build_model(cfg, spec, torch.device("cpu")).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        for _ in range(args.steps):
            loss = F.cross_entropy(model(batch()), torch.randint(0, 10, (128,)))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        del model, optimizer, loss
    elif args.action == "forward":
        with torch.no_grad():
            for _ in range(args.steps):
                full(batch())
    else:
        for i in range(args.steps):
            junk = [torch.empty(100_000 * (1 + i % 7)) for _ in range(20)]
        del junk
    gc.collect()
    if args.hold == "between":
        hold_freed_cpu_memory()
    after = [measured_latency_ratio(full, pruned, example, 64) for _ in range(3)]
    print(json.dumps({"action": args.action, "before": before, "after": after,
                      "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
                      "hold": args.hold, "held": measure._allocator_held}))


if __name__ == "__main__":
    main()
