"""Run checkpoints: everything a resumed run needs to continue bit for bit, written
atomically, read with clear errors."""

from __future__ import annotations

import dataclasses
import random
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core import distributed as D
from ..core.errors import CheckpointError
from ..core.pruner import S2HPruner
from ..core.trainer import S2HTrainer
from .config import PATH_SETTINGS, RunConfig, absolute_path
from .files import atomic_torch_save
from .optim import set_mask_lr

FORMAT = "s2hpruner-checkpoint-v2"

# settings that decide the model, the data and its preprocessing, the steps, the schedules and
# the losses' kinds of a run: a checkpoint resumes only a run with the same ones (learning
# rates, momentum, weight decay, loss weights and the balancer's gains may change)
MUST_MATCH = (
    "model",
    "dataset",
    "method",
    "target_flops",
    "target_params",
    "target_latency",
    "model_kwargs",
    "init",
    "pretrained",
    "width_step",
    "round_to",
    "ignored_layers",
    "separate_hard_bn_stats",
    "epochs",
    "prune_at_freeze",
    "importance",
    "batch_size",
    "val_size",
    "train_subset",
    "seed",
    "split_seed",
    "optimizer",
    "mask_optimizer",
    "temperature",
    "latency_batch",
    "image_size",
    "in_chans",
    "mean",
    "std",
    "augment",
    "lr_warmup_steps",
    "mask_lr_schedule",
    "descent",
    "balance",
    "resource_on",
    "freeze_teacher",
    "freeze_ranks_after_warmup",
    "autocast",
)

# an image folder's preprocessing, measured and recorded by a run (MUST_MATCH when recorded)
MEASURED_PREPROCESSING = ("image_size", "in_chans", "mean", "std")

# settings a resume may change, with a warning (the optimizer's, applied to its state)
MAY_CHANGE = ("lr", "mask_lr", "weight_decay", "momentum", "nesterov")


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


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state`; the generators take CPU byte tensors only, and a checkpoint
    loaded onto a GPU (``map_location``) brings them there."""
    torch.set_rng_state(state["torch"].cpu())
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():  # the devices both runs see
        for index, saved in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(saved.cpu(), index)


def save_checkpoint(
    path: Path,
    model: nn.Module,
    pruner: S2HPruner,
    trainer: S2HTrainer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    state: RunState,
    cfg: RunConfig,
    data: dict | None = None,
) -> None:
    """Write the run's state to ``path`` atomically (rank 0 only). ``data``: what the model
    was built for (the data spec, the class names), so that ``export`` and ``eval`` rebuild it
    without reading the data set. Every rank's random streams and loss sums differ, so each
    is saved (a collective: every rank calls this)."""
    per_rank = D.gather_objects({"rng": rng_state(), "running": dict(state.running)})
    if not D.is_main():
        return
    atomic_torch_save(
        {
            "format": FORMAT,
            "config": cfg.to_dict(),
            "data": data or {},
            "world_size": D.world_size(),
            "model": model.state_dict(),
            "pruner": pruner.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "schedule": schedule.state_dict(),
            "trainer": trainer.state_dict(),
            "rng": per_rank[0]["rng"],
            "per_rank": per_rank,
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
            "start the run again with --overwrite, or (--resume reads checkpoints/last.pt) "
            "copy checkpoints/best.pt, the best epoch's, over it to resume from there"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an s2hpruner checkpoint (format {FORMAT})")
    return ckpt


def load_model_and_pruner(ckpt: dict, model: nn.Module, pruner: S2HPruner) -> None:
    try:
        model.load_state_dict(ckpt["model"])
        pruner.load_state_dict(ckpt["pruner"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint does not match the model: {exc}") from exc


def data_record(splits) -> dict:
    """What a run's model and split were made for, saved with its checkpoints: the data spec,
    the class names (label i is classes[i]; None for the fixed data sets) and the split sizes,
    so that export and eval rebuild the model without the data, and a resume checks that the
    data are still the same (:func:`check_same_data`)."""
    sizes = {name: len(getattr(splits, name)) for name in ("train", "val", "test")}
    return {"spec": dataclasses.asdict(splits.spec), "classes": splits.classes, "sizes": sizes}


def _names(items: list) -> str:
    shown = ", ".join(repr(item) for item in items[:10])
    return shown + (f" and {len(items) - 10} more" if len(items) > 10 else "")


def _class_change(then: list | None, now: list | None) -> str:
    if then is None or now is None:
        return f"{then!r} against {now!r}"
    parts = []
    if gone := [c for c in then if c not in now]:
        parts.append(f"gone: {_names(gone)}")
    if new := [c for c in now if c not in then]:
        parts.append(f"new: {_names(new)}")
    return "; ".join(parts) or "the same names in another order"


def _split_sizes(sizes: dict | None) -> str:
    sizes = sizes or {}
    return ", ".join(f"{sizes.get(k)} {k}" for k in ("train", "val", "test"))


def check_same_data(ckpt: dict, data: dict, data_root: str | None) -> None:
    """Refuse to resume on other data than the checkpoint's (``data``: :func:`data_record` of
    the data read now): a class folder renamed or added changes what the labels mean, and an
    image added or removed changes the seeded train/val split. Checkpoints that did not record
    the classes or the sizes resume unchecked."""
    saved = ckpt.get("data") or {}
    where = f"the data in {data_root}" if data_root else "the data set's files"
    fix = ("put the data back as the run had them, or start a new run on these data (another "
           "--out, or --overwrite)")  # fmt: skip
    then, now = saved.get("classes"), data.get("classes")
    if "classes" in saved and then != now:
        raise CheckpointError(
            f"checkpoint was made on {len(then or [])} classes but {where} have "
            f"{len(now or [])} ({_class_change(then, now)}): the labels would change meaning "
            f"mid-run; {fix}"
        )
    if saved.get("sizes") is not None and saved["sizes"] != data.get("sizes"):
        raise CheckpointError(
            f"checkpoint was made on a split of {_split_sizes(saved['sizes'])} images but "
            f"{where} now split into {_split_sizes(data.get('sizes'))}: images were added or "
            f"removed, so the seeded train/val split would differ from the run's; {fix}"
        )


def check_resumable(ckpt: dict, cfg: RunConfig) -> None:
    """Refuse a checkpoint made by another run: other processes, settings or phases."""
    saved = ckpt.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError("checkpoint has no run config; it is corrupt or not from a run")
    defaults = RunConfig()  # a setting older checkpoints lack had its default then

    def setting(config: dict, key: str):
        value = config.get(key, getattr(defaults, key))
        if key == "split_seed" and value is None:  # None: the run's seed splits the data
            value = config.get("seed", defaults.seed)
        return absolute_path(key, value) if key in PATH_SETTINGS else value

    if ckpt.get("world_size", 1) != D.world_size():  # first: the batch may follow from it
        raise CheckpointError(
            f"checkpoint was made by {ckpt.get('world_size', 1)} process(es) but this run has "
            f"{D.world_size()}; resume with the same torchrun --nproc_per_node"
        )
    asked = cfg.to_dict()
    for key in MUST_MATCH:
        if key in MEASURED_PREPROCESSING and saved.get(key) is None:
            continue  # a run from before round 35 did not record what it measured
        if setting(saved, key) != setting(asked, key):
            raise CheckpointError(
                f"checkpoint was made with {key}={saved.get(key)!r} but this run has "
                f"{key}={getattr(cfg, key)!r}; use the same settings or another --out"
            )
    # the phases as the schedule sees them: a share, or the same length in epochs, alike
    phase_keys = ("warmup", "freeze", "warmup_epochs", "freeze_epochs")
    then = replace(cfg, **{k: setting(saved, k) for k in phase_keys})
    phases, now = then.phase_fractions(), cfg.phase_fractions()
    if phases != now:
        raise CheckpointError(
            f"checkpoint was made with warm-up and frozen-width phases of {phases[0]:g} and "
            f"{phases[1]:g} of the run, but this run has {now[0]:g} and {now[1]:g}; use the "
            "same settings or another --out"
        )
    applied = MAY_CHANGE if cfg.optimizer == "sgd" else ("lr", "mask_lr", "weight_decay")
    changed = [f"{key} {setting(saved, key)!r} -> {getattr(cfg, key)!r}" for key in applied
               if setting(saved, key) != getattr(cfg, key)]  # fmt: skip
    if changed:  # allowed (a lower --lr is the way out of a NaN), but said: a resume that
        # leaves --weight-decay out would otherwise train on at the default without a word
        warnings.warn(f"resuming with other optimizer settings than the run's: "
                      f"{', '.join(changed)}; they apply from here", stacklevel=2)  # fmt: skip
    workers = setting(saved, "workers") or 0
    if (workers > 0) != (cfg.workers > 0):  # the augmentation's random stream changes kind
        warnings.warn(
            f"checkpoint was made with workers={workers} and this run has "
            f"workers={cfg.workers}: with worker processes each sample's augmentation is "
            "seeded by itself, without them it draws from the global RNG, so the rest of the "
            "run will not be what the uninterrupted one would have been (any workers >= 1 "
            "resume each other exactly)",
            stacklevel=3,
        )


def restore(
    ckpt: dict,
    model: nn.Module,
    pruner: S2HPruner,
    trainer: S2HTrainer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    cfg: RunConfig,
    checked: bool = False,
) -> RunState:
    """Load a checkpoint into the live objects, checking it belongs to this run
    (``checked``: the caller has checked it and loaded the model and the pruner)."""
    if not checked:
        check_resumable(ckpt, cfg)
        load_model_and_pruner(ckpt, model, pruner)
    try:  # the trainer first: it may move the optimizer onto the pruned network
        trainer.load_state_dict(ckpt["trainer"])
        trainer.optimizer.load_state_dict(ckpt["optimizer"])
        schedule.load_state_dict(ckpt["schedule"])
        state = RunState(**ckpt["state"])
        own = ckpt["per_rank"][D.rank()] if "per_rank" in ckpt else None  # (older: rank 0's)
        set_rng_state(ckpt["rng"] if own is None else own["rng"])
        if own is not None:
            state.running = own["running"]
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(
            f"checkpoint's optimizer, schedule, RNG or loop state is damaged or does not match "
            f"this run ({type(exc).__name__}: {exc}); restart the run or use another --out"
        ) from exc
    _use_optimizer_settings(trainer, schedule, cfg)
    return state


def _use_optimizer_settings(trainer: S2HTrainer, schedule, cfg: RunConfig) -> None:
    """Let --lr and --mask-lr of a resumed run win over the checkpoint's (the way out of a
    NaN), and its weight decay, momentum and Nesterov flag (loading the optimizer's state
    brings back the saved ones, which config.yaml would no longer record).

    The schedule's factor is recomputed the way LambdaLR computes it, so an unchanged --lr
    gives bit-identical learning rates.
    """
    optimizer = trainer.optimizer
    decay = optimizer.param_groups[0]  # build_weight_optimizer: weights, then norms and biases
    decay["weight_decay"] = cfg.weight_decay
    if "momentum" in decay:  # SGD
        for group in optimizer.param_groups:
            group["momentum"], group["nesterov"] = cfg.momentum, cfg.nesterov and cfg.momentum > 0
    schedule.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, schedule.lr_lambdas, strict=True):
        group["initial_lr"] = cfg.lr
        group["lr"] = cfg.lr * factor(schedule.last_epoch)
    schedule._last_lr = [group["lr"] for group in optimizer.param_groups]
    set_mask_lr(trainer.mask_optimizer, cfg, schedule)
