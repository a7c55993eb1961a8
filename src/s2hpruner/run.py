"""A whole pruning run: data, model, pruner, the phased loop, checkpoints, export, report.

Run directory layout (only rank 0 writes):
    config.yaml         the resolved RunConfig
    metrics.jsonl       one line per epoch (val accuracies, gap, FLOPs ratios, losses, widths)
    tensorboard/        the same as TensorBoard events
    checkpoints/        last.pt (every N steps and every epoch), best.pt; written atomically
    model_pruned.pt2    the exported hard network as a torch.export program (no s2hpruner needed)
    model_pruned.pt     the exported nn.Module (pickled; needs the model's classes)
    report.json         final figures, see ``REPORT_KEYS``
    *.png               plots (see report.py)
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset, Sampler

from . import distributed as D
from .config import ConfigError, RunConfig
from .data import build_datasets
from .errors import CheckpointError, NonFiniteLossError, RunDirectoryError, S2HError
from .export import atomic_torch_save, atomic_write_bytes, save_program
from .measure import latency_speedup
from .models import create_model
from .pruner import S2HPruner
from .resources import count_flops, count_params
from .train import Optimizers, build_optimizers, evaluate, phase_of, project_to_budget, train_step

REPORT_KEYS = (
    "method",
    "model",
    "dataset",
    "target_flops",
    "top1_hard",
    "top1_soft",
    "gap",
    "flops_ratio",
    "params_ratio",
    "latency_speedup_b1",
    "latency_speedup_b64",
    "epochs",
    "train_seconds",
)


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch, sharded over ranks, that can start mid-epoch.

    The order depends only on (seed, epoch), so a resumed run sees the same batches.
    """

    def __init__(self, size: int, seed: int, batch_size: int):
        self.size, self.seed, self.batch_size = size, seed, batch_size
        self.epoch, self.start_batch = 0, 0

    def order(self) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.size, generator=gen)
        world = D.world_size()
        usable = (self.size // (world * self.batch_size)) * world * self.batch_size
        return perm[:usable][D.rank() :: world].tolist()

    def __iter__(self):
        return iter(self.order()[self.start_batch * self.batch_size :])

    def __len__(self) -> int:
        return len(self.order()) - self.start_batch * self.batch_size


@dataclass
class RunState:
    """Where the loop is; saved in checkpoints."""

    step: int = 0
    best_top1_hard: float = -1.0
    train_seconds: float = 0.0
    history: list = field(default_factory=list)
    running: dict = field(default_factory=dict)  # loss sums of the current epoch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Refuse to clobber a finished run; make the folders. Nothing is deleted here."""
    out = Path(cfg.out)
    if (out / "report.json").exists() and not (cfg.overwrite or cfg.resume):
        raise RunDirectoryError(
            f"{out} holds a finished run (report.json exists); pass --overwrite to replace it, "
            "or choose another --out"
        )
    if cfg.resume and not (out / "checkpoints" / "last.pt").exists():
        raise CheckpointError(f"--resume: no checkpoint at {out / 'checkpoints' / 'last.pt'}")
    if D.is_main():
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    D.barrier()
    return out


def save_checkpoint(path: Path, model, pruner, opt: Optimizers, state: RunState, cfg) -> None:
    if not D.is_main():
        return
    atomic_torch_save(
        {
            "format": "s2hpruner-checkpoint-v1",
            "config": cfg.to_dict(),
            "world_size": D.world_size(),
            "model": model.state_dict(),
            "pruner": pruner.state_dict(),
            "opt_weights": opt.weights.state_dict(),
            "opt_masks": opt.masks.state_dict(),
            "schedule": opt.weights_schedule.state_dict(),
            "balancer": opt.balancer.state_dict(),
            "rng": _rng_state(),
            "state": state.__dict__,
        },
        path,
    )


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Read a checkpoint, turning any corruption into a clear :class:`CheckpointError`."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {exc}); "
            "delete it and restart the run, or resume from another checkpoint"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != "s2hpruner-checkpoint-v1":
        raise CheckpointError(f"{path} is not an s2hpruner checkpoint")
    return ckpt


# settings that decide the model, the data, the steps and the schedule of a run: a checkpoint
# resumes only a run with the same ones (learning rates and loss weights may change)
MUST_MATCH = (
    "model",
    "dataset",
    "method",
    "target_flops",
    "model_kwargs",
    "width_step",
    "round_to",
    "ignored_layers",
    "separate_hard_bn_stats",
    "epochs",
    "warmup_epochs",
    "freeze_epochs",
    "batch_size",
    "val_size",
    "train_subset",
    "seed",
)


def restore(ckpt: dict, model, pruner, opt: Optimizers, cfg: RunConfig) -> RunState:
    """Load a checkpoint into the live objects, checking it belongs to this run."""
    saved = ckpt.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError("checkpoint has no run config; it is corrupt or not from a run")
    for key in MUST_MATCH:
        if saved.get(key) != getattr(cfg, key):
            raise CheckpointError(
                f"checkpoint was made with {key}={saved.get(key)!r} but this run has "
                f"{key}={getattr(cfg, key)!r}; use the same settings or another --out"
            )
    if ckpt.get("world_size", 1) != D.world_size():
        raise CheckpointError(
            f"checkpoint was made by {ckpt.get('world_size', 1)} process(es) but this run has "
            f"{D.world_size()}; resume with the same torchrun --nproc_per_node"
        )
    try:
        model.load_state_dict(ckpt["model"])
        pruner.load_state_dict(ckpt["pruner"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint does not match the model: {exc}") from exc
    try:
        opt.weights.load_state_dict(ckpt["opt_weights"])
        opt.masks.load_state_dict(ckpt["opt_masks"])
        opt.weights_schedule.load_state_dict(ckpt["schedule"])
        opt.balancer.load_state_dict(ckpt["balancer"])
        _set_rng_state(ckpt["rng"])
        state = RunState(**ckpt["state"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint's optimizer, schedule, RNG or loop state is damaged or does not match "
            f"this run ({type(exc).__name__}: {exc}); restart the run or use another --out"
        ) from exc
    _use_learning_rates(opt, cfg)
    return state


def _use_learning_rates(opt: Optimizers, cfg: RunConfig) -> None:
    """Let --lr and --mask-lr of a resumed run win over the checkpoint's (the way out of a NaN).

    The schedule's factor is recomputed the way LambdaLR computes it, so an unchanged --lr
    gives bit-identical learning rates.
    """
    schedule = opt.weights_schedule
    schedule.base_lrs = [cfg.lr] * len(opt.weights.param_groups)
    for group, factor in zip(opt.weights.param_groups, schedule.lr_lambdas, strict=True):
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * factor(schedule.last_epoch)
    schedule._last_lr = [group["lr"] for group in opt.weights.param_groups]
    for group in opt.masks.param_groups:
        group["lr"] = cfg.mask_lr


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _loader(dataset: Dataset, batch_size: int, cfg: RunConfig, sampler=None) -> DataLoader:
    # Its own generator (re-seeded every epoch): every new iterator draws the workers' base
    # seed from it, which would otherwise advance the global RNG between a mid-epoch
    # checkpoint and the resumed run's first batch (augmentation draws from the global RNG).
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        shuffle=False,
        num_workers=cfg.workers,
        drop_last=sampler is not None,
        persistent_workers=cfg.workers > 0,
        generator=torch.Generator(),
    )


class _ShardSampler(Sampler[int]):
    """Every index exactly once over all ranks (DistributedSampler pads the last shard with
    repeated samples, which the reduced accuracy would count twice)."""

    def __init__(self, size: int):
        self.indices = list(range(size))[D.rank() :: D.world_size()]

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _eval_loader(dataset: Dataset, cfg: RunConfig) -> DataLoader:
    sampler = None
    if D.is_distributed():
        sampler = _ShardSampler(len(dataset))
    return DataLoader(
        dataset, batch_size=cfg.eval_batch_size, sampler=sampler, num_workers=cfg.workers
    )


def val_size(cfg: RunConfig) -> int | float:
    """A count when >= 1, else a fraction of the training files."""
    return int(cfg.val_size) if cfg.val_size >= 1 else float(cfg.val_size)


def build(cfg: RunConfig, device: torch.device):
    """Data, model and pruner of a run."""
    splits = build_splits(cfg)
    return (splits, *build_model_and_pruner(cfg, splits.spec, device))


def build_splits(cfg: RunConfig):
    """The run's train/val/test splits (val held out of the training files, seeded)."""
    try:
        return build_datasets(
            cfg.dataset,
            cfg.data_root,
            val_size=val_size(cfg),
            seed=cfg.seed,
            augment=cfg.augment,
            train_subset=cfg.train_subset,
        )
    except S2HError:
        raise
    except (ValueError, TypeError) as exc:  # the split sizes do not fit the data set
        raise ConfigError(f"{exc}; choose another --val-size or --train-subset") from exc


def build_model_and_pruner(cfg: RunConfig, spec, device: torch.device):
    """The model of a run, wrapped by its pruner, and the example input used to trace it."""
    model = create_model(
        cfg.model,
        num_classes=spec.num_classes,
        in_chans=spec.in_chans,
        image_size=spec.image_size,
        **cfg.model_kwargs,
    ).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    example = torch.zeros(1, spec.in_chans, spec.image_size, spec.image_size, device=device)
    pruner = S2HPruner(
        model,
        example,
        target_flops=cfg.target_flops,
        width_step=cfg.width_step,
        round_to=cfg.round_to,
        ignored_layers=cfg.ignored_layers,
        temperature=cfg.temperature,
        separate_hard_bn_stats=cfg.separate_hard_bn_stats and cfg.method != "dmp",
    )
    pruner.hard_layout = {
        "contiguous": torch.contiguous_format, "channels_last": torch.channels_last
    }.get(cfg.hard_layout)
    return model, pruner, example


def prune(cfg: RunConfig) -> dict:
    """Train, prune and export; returns the report (also written to ``report.json``)."""
    from tqdm.auto import tqdm

    cfg.validate()
    device = D.setup(cfg.device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    out = prepare_run_dir(cfg)
    seed_everything(cfg.seed)
    splits, model, pruner, example = build(cfg, device)
    main = D.is_main()

    sampler = EpochSampler(len(splits.train), cfg.seed, cfg.batch_size)
    train_loader = _loader(splits.train, cfg.batch_size, cfg, sampler)
    steps_per_epoch = len(sampler.order()) // cfg.batch_size
    if steps_per_epoch == 0:
        raise RunDirectoryError("the training split is smaller than one batch; lower --batch-size")
    total_steps = max(1, round(cfg.epochs * steps_per_epoch))
    opt = build_optimizers(model, pruner, cfg, total_steps)
    state = RunState()
    last = out / "checkpoints" / "last.pt"
    saved_step = None  # step of the newest good checkpoint of this run, if any
    if cfg.resume:
        state = restore(load_checkpoint(last, device), model, pruner, opt, cfg)
        saved_step = state.step
    if main:
        # exactly the epochs of the checkpoint: a run killed between writing an epoch's line
        # and its checkpoint repeats that epoch when resumed
        lines = "".join(json.dumps(record) + "\n" for record in state.history)
        atomic_write_bytes(out / "metrics.jsonl", lines.encode())
        atomic_write_bytes(out / "config.yaml", yaml.safe_dump(cfg.to_dict()).encode())
    writer = _tensorboard(out) if main else None
    val_loader = _eval_loader(splits.val, cfg)

    model.train()
    running = state.running
    bar = tqdm(
        total=total_steps,
        initial=state.step,
        desc=f"{cfg.method} {cfg.model}",
        disable=not (cfg.progress and main),
        dynamic_ncols=True,
    )
    while state.step < total_steps:
        epoch = state.step // steps_per_epoch
        sampler.epoch, sampler.start_batch = epoch, state.step % steps_per_epoch
        train_loader.generator.manual_seed(cfg.seed * 100_003 + epoch)
        start = time.perf_counter()
        tune_layout = cfg.hard_layout == "auto" and not cfg.deterministic
        for x, y in train_loader:
            phase = phase_of(state.step / steps_per_epoch, cfg)
            if phase in ("freeze", "dmp-freeze") and not pruner.freeze_ranks:
                pruner.freeze_ranks = True  # the architecture is final from here on
                project_to_budget(pruner, cfg.target_flops, cfg.budget_tolerance)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cfg.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            if tune_layout:  # the kept widths have moved since the last epoch
                pruner.tune_hard_layout(x)
                tune_layout = False
            try:
                stats = train_step(model, pruner, x, y, opt, cfg, phase)
            except NonFiniteLossError as exc:
                raise NonFiniteLossError(
                    f"training step {state.step + 1} of {total_steps} (epoch {epoch + 1}): "
                    f"{exc}; {_last_good(last, saved_step)}"
                ) from None
            state.step += 1
            for k, v in stats.items():
                running[k] = running.get(k, 0.0) + v
            running["n"] = running.get("n", 0) + 1
            if main and state.step % 10 == 0:
                bar.set_postfix(
                    phase=phase,
                    loss=f"{stats.get('task', 0):.3f}",
                    flops=f"{pruner.ratio('hard'):.3f}",
                )
            bar.update(1)
            end_of_epoch = state.step % steps_per_epoch == 0 or state.step == total_steps
            if end_of_epoch:
                break
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                state.train_seconds += time.perf_counter() - start
                start = time.perf_counter()
                _average_bn_statistics(model, pruner)
                _check_finite(model, pruner, opt, _non_finite(state, total_steps, last, saved_step))
                save_checkpoint(last, model, pruner, opt, state, cfg)
                saved_step = state.step
        state.train_seconds += time.perf_counter() - start
        _average_bn_statistics(model, pruner)
        _check_finite(model, pruner, opt, _non_finite(state, total_steps, last, saved_step))
        record = _epoch_record(
            state, steps_per_epoch, running, model, pruner, val_loader, device, cfg, opt
        )
        running = state.running = {}
        state.history.append(record)
        best = pruner.freeze_ranks and record["val_top1_hard"] > state.best_top1_hard
        if best:  # before last.pt is written, so that a resumed run knows the best so far
            state.best_top1_hard = record["val_top1_hard"]
        if main:
            _append_jsonl(out / "metrics.jsonl", record)
            _log_tensorboard(writer, record)
            save_checkpoint(last, model, pruner, opt, state, cfg)
            if best:
                save_checkpoint(out / "checkpoints" / "best.pt", model, pruner, opt, state, cfg)
        saved_step = state.step
    bar.close()
    if not pruner.freeze_ranks:  # a run without a frozen last phase still meets the budget
        pruner.freeze_ranks = True
        project_to_budget(pruner, cfg.target_flops, cfg.budget_tolerance)
    report = finish(cfg, out, splits, model, pruner, example, device, state)
    if writer is not None:
        writer.close()
    return report


def _average_bn_statistics(model, pruner) -> None:
    """Average BatchNorm running statistics, the model's and the hard network's, over ranks.

    They only feed evaluation, and their momentum update is affine, so averaging before a
    mid-epoch checkpoint gives the same epoch-end statistics as averaging once at the end.
    """
    D.average_buffers(model)
    if pruner.hard_bn_stats is not None:
        D.average_tensors([t for stats in pruner.hard_bn_stats.values() for t in stats.values()])


def _check_finite(model, pruner, opt: Optimizers, message: str) -> None:
    """Raise :class:`NonFiniteLossError` if a weight, width logit, statistic or optimizer state
    is NaN or infinite, so that such a state never replaces the last good checkpoint."""
    tensors = [*model.parameters(), *model.buffers(), *pruner.mask_parameters()]
    if pruner.hard_bn_stats is not None:
        tensors += [t for stats in pruner.hard_bn_stats.values() for t in stats.values()]
    for optimizer in (opt.weights, opt.masks):
        for param_state in optimizer.state.values():
            tensors += [v for v in param_state.values() if isinstance(v, torch.Tensor)]
    floats = [t for t in tensors if t.is_floating_point()]
    if floats and not bool(torch.stack([torch.isfinite(t).all() for t in floats]).all()):
        raise NonFiniteLossError(message)


def _reduced_sums(running: dict) -> dict:
    """The epoch's loss sums (and step count ``n``) summed over ranks."""
    if not D.is_distributed() or not running:
        return running
    keys = list(running)  # the same order on every rank (same code path)
    total = D.all_reduce_sum(torch.tensor([float(running[k]) for k in keys], dtype=torch.float64))
    return dict(zip(keys, total.tolist(), strict=True))


def _last_good(last: Path, saved_step: int | None) -> str:
    if saved_step is None:
        return "no checkpoint was saved before it (lower --lr or --mask-lr and restart)"
    return (
        f"the last good checkpoint is {last} (step {saved_step}); lower --lr or --mask-lr "
        "and --resume"
    )


def _non_finite(state: RunState, total_steps: int, last: Path, saved_step: int | None) -> str:
    return (
        f"after training step {state.step} of {total_steps} the weights, width logits, "
        f"BatchNorm statistics or optimizer states are NaN or infinite; not saving them; "
        f"{_last_good(last, saved_step)}"
    )


def _epoch_record(state, steps_per_epoch, running, model, pruner, val_loader, device, cfg, opt):
    running = _reduced_sums(running)
    n = max(1, running.pop("n", 1))
    soft = evaluate(
        model, val_loader, device, pruner, "soft", cfg.progress and D.is_main(), "val soft"
    )
    hard = evaluate(
        model, val_loader, device, pruner, "hard", cfg.progress and D.is_main(), "val hard"
    )
    return {
        "epoch": round(state.step / steps_per_epoch, 4),
        "step": state.step,
        "val_top1_soft": soft,
        "val_top1_hard": hard,
        "gap": soft - hard,
        "flops_ratio_soft": pruner.ratio("soft"),
        "flops_ratio_hard": pruner.ratio("hard"),
        "target_flops": cfg.target_flops,
        "losses": {k: v / n for k, v in running.items()},
        "lr": opt.weights.param_groups[0]["lr"],
        "mask_lr": opt.masks.param_groups[0]["lr"],
        "widths": pruner.kept_widths(),
        "channels": {g.name: g.channels for g in pruner.groups},
        "train_seconds": state.train_seconds,
    }


def _tensorboard(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but keep runs alive without it
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _log_tensorboard(writer, record: dict) -> None:
    if writer is None:
        return
    step = record["step"]
    for key in (
        "val_top1_soft",
        "val_top1_hard",
        "gap",
        "flops_ratio_soft",
        "flops_ratio_hard",
        "lr",
    ):
        writer.add_scalar(key, record[key], step)
    for key, value in record["losses"].items():
        writer.add_scalar(f"loss/{key}", value, step)
    for name, width in record["widths"].items():
        writer.add_scalar(f"width/{name}", width, step)
    writer.flush()


def finish(cfg, out, splits, model, pruner, example, device, state) -> dict:
    """Export the hard network, measure it on the test split, write the report and plots."""
    from .report import plot_run, summary_table

    exported = pruner.export().eval()
    test_loader = _eval_loader(splits.test, cfg)
    progress = cfg.progress and D.is_main()
    top1_hard = evaluate(exported, test_loader, device, progress=progress, desc="test hard")
    top1_soft = evaluate(model, test_loader, device, pruner, "soft", progress, "test soft")
    if not D.is_main():
        return {}
    cpu_example = example.cpu()
    full_cpu = model.cpu().eval()
    pruned_cpu = exported.cpu().eval()
    flops_full = count_flops(full_cpu, cpu_example)
    flops_pruned = count_flops(pruned_cpu, cpu_example)
    speed = latency_speedup(full_cpu, pruned_cpu, cpu_example, repeats=cfg.latency_repeats)
    model.to(device)
    report = {
        "method": cfg.method,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "target_flops": cfg.target_flops,
        "top1_hard": top1_hard,
        "top1_soft": top1_soft if cfg.method is not None else None,
        "gap": top1_soft - top1_hard,
        "flops_ratio": flops_pruned / flops_full,
        "params_ratio": count_params(pruned_cpu) / count_params(full_cpu),
        "predicted_flops_ratio": pruner.ratio("hard"),
        "latency_speedup_b1": speed["b1"],
        "latency_speedup_b64": speed["b64"],
        "epochs": cfg.epochs,
        "train_seconds": state.train_seconds,
        "train_seconds_per_epoch": state.train_seconds / cfg.epochs,
        "flops_full": flops_full,
        "flops_pruned": flops_pruned,
        "params_full": count_params(full_cpu),
        "params_pruned": count_params(pruned_cpu),
        "kept_widths": pruner.kept_widths(),
        "channels": {g.name: g.channels for g in pruner.groups},
        "device": str(device),
        "world_size": D.world_size(),
        "torch": torch.__version__,
    }
    atomic_torch_save(pruned_cpu, out / "model_pruned.pt")
    save_program(pruned_cpu, cpu_example, out / "model_pruned.pt2")
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=2).encode())
    plot_run(out)
    print(summary_table(report))
    return report
