"""Does a latency ratio depend on the model instance timed? (issue #17, round 10)

Round 9 saw one exported MobileNetV3 measure 0.46-0.50 against the full model when loaded
four times, and guessed that the noise comes with the instance (where its tensors landed in
memory). This times, in one process and one after the other, K deep copies of the full and
of the pruned network with ``core.measure.latency_ratio`` (20 x 5 alternating pairs each):

- ``same``: the loaded full and pruned networks, 3 times;
- ``per_copy`` and ``again``: copy i of the full against copy i of the pruned, twice;
- ``cross_full``: copy i of the full against the loaded pruned network;
- ``cross_pruned``: the loaded full network against copy i of the pruned.

If the instance mattered, a pair's value would repeat across ``per_copy`` and ``again`` and
differ between pairs; if the time mattered, values would cluster by block.

    python -m benchmarks.latency_instances --model mobilenet_v3_small \
        --model-kwargs '{"cifar_stem": true}' --init CKPT --json OUT.json EXPORTED.pt [...]
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
from pathlib import Path

import torch

from s2hpruner.app.config import RunConfig
from s2hpruner.app.data import dataset_spec
from s2hpruner.app.files import atomic_write_bytes
from s2hpruner.app.run import build_model
from s2hpruner.core.measure import latency_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("exported", nargs="+", help="model_pruned.pt files of runs")
    parser.add_argument("--model", required=True)
    parser.add_argument("--model-kwargs", default="{}")
    parser.add_argument("--init", help="the full model's weights (the runs' starting point)")
    parser.add_argument("--copies", type=int, default=6)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    spec = dataset_spec("fashion-mnist")
    cfg = RunConfig(model=args.model, model_kwargs=json.loads(args.model_kwargs), init=args.init,
                    progress=False)  # fmt: skip
    layout = torch.channels_last
    full = build_model(cfg, spec, torch.device("cpu")).to(memory_format=layout).eval()
    x = torch.zeros(args.batch, spec.in_chans, spec.image_size, spec.image_size)
    x = x.contiguous(memory_format=layout)

    def ratio(a, b) -> float:
        return latency_ratio(a, b, x, 20, 5)[0]

    command = " ".join(shlex.quote(a) for a in sys.argv[1:])
    out = {"command": f"python -m benchmarks.latency_instances {command}", "runs": {}}
    for path in args.exported:
        pruned = torch.load(path, weights_only=False).to(memory_format=layout).eval()
        fulls = [copy.deepcopy(full) for _ in range(args.copies)]
        pruneds = [copy.deepcopy(pruned) for _ in range(args.copies)]
        k = range(args.copies)
        run = {
            "same": [ratio(full, pruned) for _ in range(3)],
            "per_copy": [ratio(fulls[i], pruneds[i]) for i in k],
            "again": [ratio(fulls[i], pruneds[i]) for i in k],
            "cross_full": [ratio(fulls[i], pruned) for i in k],
            "cross_pruned": [ratio(full, pruneds[i]) for i in k],
        }
        out["runs"][path] = run
        print(path, json.dumps({key: [round(v, 3) for v in vs] for key, vs in run.items()}),
              flush=True)  # fmt: skip
        atomic_write_bytes(args.json, json.dumps(out, indent=1).encode())


if __name__ == "__main__":
    main()
