"""Train a model with plain PyTorch (no pruner) and cache its weights: the trained model users
start from. Every from-trained run of the benchmarks starts from this one file.

    python -m benchmarks.pretrain --model resnet20 --epochs 5 \\
        --out benchmarks/cache/resnet20_fmnist_5ep.pt

Writes the state dict (``.pt``) and beside it a JSON with the recipe, the validation and test
top-1 and the wall time. The split is the application's (same seed, same validation hold-out),
so the validation images stay unseen for every method started from it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from s2hpruner.app.checkpoint import seed_everything
from s2hpruner.app.config import RunConfig
from s2hpruner.app.files import atomic_torch_save, atomic_write_bytes
from s2hpruner.app.models import create_model
from s2hpruner.app.optim import build_weight_optimizer
from s2hpruner.app.run import build_splits
from s2hpruner.app.sampling import EpochSampler, eval_loader, train_loader
from s2hpruner.core.trainer import evaluate


def pretrain(cfg: RunConfig, out: Path) -> dict:
    """Plain training of ``cfg.model`` for ``cfg.epochs`` with the run recipe (same optimizer
    builder, batch order and augmentation as pruning runs); returns the record it writes."""
    seed_everything(cfg.seed)
    splits = build_splits(cfg)
    spec = splits.spec
    model = create_model(cfg.model, num_classes=spec.num_classes, in_chans=spec.in_chans,
                         image_size=spec.image_size, **cfg.model_kwargs)  # fmt: skip
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    sampler = EpochSampler(len(splits.train), cfg.seed, cfg.batch_size)
    loader = train_loader(splits.train, sampler, cfg.workers)
    steps_per_epoch = len(sampler.order()) // cfg.batch_size
    total = round(cfg.resolve_epochs(steps_per_epoch) * steps_per_epoch)
    optimizer, schedule = build_weight_optimizer(model, cfg, total)
    start, step = time.perf_counter(), 0
    model.train()
    with tqdm(total=total, desc=f"plain {cfg.model}", disable=not cfg.progress) as bar:
        while step < total:
            sampler.epoch = step // steps_per_epoch
            loader.generator.manual_seed(cfg.seed * 100_003 + sampler.epoch)
            for x, y in loader:
                if cfg.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                loss = F.cross_entropy(model(x), y, label_smoothing=cfg.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                bar.update(1)
                if step == total:
                    break
    seconds = time.perf_counter() - start
    device = torch.device("cpu")
    record = {
        "model": cfg.model,
        "model_kwargs": cfg.model_kwargs,
        "dataset": cfg.dataset,
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "val_top1": evaluate(model, eval_loader(splits.val, 500, 0), device),
        "test_top1": evaluate(model, eval_loader(splits.test, 500, 0), device),
        "train_seconds": seconds,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save(model.state_dict(), out)
    atomic_write_bytes(out.with_suffix(".json"), json.dumps(record, indent=2).encode())
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--epochs", type=float, default=5.0)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-kwargs", type=json.loads, default={},
                        help='model factory arguments as JSON, e.g. \'{"cifar_stem": true}\'')
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    cfg = RunConfig(model=args.model, dataset=args.dataset, epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    model_kwargs=args.model_kwargs)  # fmt: skip
    print(json.dumps(pretrain(cfg, args.out), indent=2))


if __name__ == "__main__":
    main()
