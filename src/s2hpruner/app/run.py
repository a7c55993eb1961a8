"""A whole pruning run: data, model, pruner, the loop over S2HTrainer, export, report.

Run directory layout (only rank 0 writes):
    config.yaml         the resolved RunConfig, without the run-control flags
    metrics.jsonl       the starting model's val top-1, then one line per epoch
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
import shutil
import time
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch
import yaml
from torch import nn

from .. import __version__
from ..core import distributed as D
from ..core.balance import GradientBalancer
from ..core.errors import (
    BudgetError,
    CheckpointError,
    NonFiniteLossError,
    RunDirectoryError,
    S2HError,
)
from ..core.fresh_timing import latency_speedup_in_fresh_process
from ..core.layout import tune_hard_layout
from ..core.measure import latency_ratio, latency_speedup, same_memory_format
from ..core.pruner import S2HPruner, uniform_widths
from ..core.resources import count_flops, count_params
from ..core.trainer import METHODS, S2HTrainer, evaluate
from .checkpoint import (
    MEASURED_PREPROCESSING,
    RunState,
    check_resumable,
    check_same_data,
    data_record,
    load_checkpoint,
    load_model_and_pruner,
    restore,
    save_checkpoint,
    seed_everything,
)
from .config import ConfigError, RunConfig
from .data import build_datasets
from .files import atomic_torch_save, atomic_write_bytes, remove_stale_temporaries, save_program
from .metrics import MetricWriter, append_jsonl, reduced_sums
from .models import ModelSpecError, check_model_name, create_model
from .optim import build_mask_optimizer, build_weight_optimizer, set_mask_lr
from .sampling import EpochSampler, eval_loader, train_loader

REPORT_KEYS = (
    "method",
    "model",
    "dataset",
    "target_flops",
    "target_params",
    "target_latency",
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
_LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def given_hard_layout(cfg: RunConfig) -> torch.memory_format | None:
    """The memory layout ``cfg.hard_layout`` names for the hard (and pruned) network; None for
    "model" (the model's own) and "auto" (timed)."""
    return _LAYOUTS.get(cfg.hard_layout)


# ------------------------------------------------------------------------------ building
def prepare_run_dir(cfg: RunConfig) -> Path:
    """Refuse to clobber a finished run; make the folders. Nothing is deleted here but the
    temporary files of a checkpoint whose writing was killed."""
    out = Path(cfg.out)
    if (out / "report.json").exists() and not (cfg.overwrite or cfg.resume):
        raise RunDirectoryError(
            f"{out} holds a finished run (report.json exists); pass --overwrite to replace it, "
            "or choose another --out"
        )
    if (out / "checkpoints" / "last.pt").exists() and not (cfg.overwrite or cfg.resume):
        raise RunDirectoryError(
            f"{out} holds an unfinished run (checkpoints/last.pt exists); pass --resume to "
            "continue it, --overwrite to replace it, or choose another --out"
        )
    if cfg.resume and not (out / "checkpoints" / "last.pt").exists():
        raise CheckpointError(f"--resume: no checkpoint at {out / 'checkpoints' / 'last.pt'}")
    if D.is_main():
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out / "checkpoints", ("last.pt", "best.pt"))
    D.barrier()
    return out


def fit_batch_to_split(cfg: RunConfig, n_train: int) -> None:
    """A training split smaller than one batch per process (a small folder at the default
    batch of 128) trains in batches of the whole split, with a warning; ``cfg`` records it."""
    per_process = n_train // D.world_size()
    if 0 < per_process < cfg.batch_size:
        warnings.warn(f"the training split holds {per_process} images per process, fewer than "
                      f"--batch-size {cfg.batch_size}: training in batches of {per_process}",
                      stacklevel=3)  # fmt: skip
        cfg.batch_size = per_process


def build_splits(cfg: RunConfig, augment: bool | None = None):
    """The run's train/val/test splits (val held out of the training files, seeded)."""
    extra = {}
    if cfg.dataset == "imagefolder":
        extra = {"image_size": cfg.image_size, "mean": cfg.mean, "std": cfg.std,
                 "in_chans": cfg.in_chans}  # fmt: skip
    try:
        return build_datasets(
            cfg.dataset,
            cfg.data_root,
            val_size=cfg.val_size,
            seed=cfg.seed if cfg.split_seed is None else cfg.split_seed,
            augment=cfg.augment if augment is None else augment,
            train_subset=cfg.train_subset,
            **extra,
        )
    except S2HError:
        raise
    except (ValueError, TypeError) as exc:  # the split sizes do not fit the data set
        raise ConfigError(f"{exc}; choose another --val-size or --train-subset") from exc


def use_the_runs_own_defaults(cfg: RunConfig, checkpoint: dict) -> None:
    """Settings a resuming command leaves unset take the values the run resolved for them, in
    place: its epochs (the default follows the data), its frozen phase (before round 33 the
    default was always 0.25) and an image folder's measured preprocessing. A resume can then
    repeat the first command plus ``--resume``; settings given still have to match."""
    saved = checkpoint.get("config")
    if not isinstance(saved, dict):
        return  # check_resumable says what is wrong with it
    if cfg.epochs is None:
        cfg.epochs = saved.get("epochs")
    if cfg.freeze is None and cfg.freeze_epochs is None:
        cfg.freeze, cfg.freeze_epochs = saved.get("freeze"), saved.get("freeze_epochs")
    if cfg.dataset == "imagefolder":
        for key in MEASURED_PREPROCESSING:
            if getattr(cfg, key) is None:
                setattr(cfg, key, saved.get(key))


def check_model_fits_data(model: nn.Module, name: str, spec) -> None:
    """One forward of a blank batch, in eval mode: a factory that ignores ``in_chans`` or
    ``num_classes`` fails here, named, instead of in the graph tracing or the loss."""
    first = next(model.parameters(), None)  # a factory may return it on a GPU, or in half
    kind = {} if first is None else {"device": first.device, "dtype": first.dtype}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, spec.in_chans, spec.image_size, spec.image_size, **kind))
    except (RuntimeError, ValueError, AssertionError) as exc:  # timm asserts input sizes
        raise ModelSpecError(
            f"model {name!r} does not take the data's {spec.in_chans}-channel "
            f"{spec.image_size}x{spec.image_size} images ({exc}); fix: let its factory accept "
            "in_chans (and image_size), or for an image folder set --in-chans to what it takes"
        ) from exc
    finally:
        model.train(was_training)
    if isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[1] != spec.num_classes:
        raise ModelSpecError(
            f"model {name!r} gives {out.shape[1]} outputs but the data set has "
            f"{spec.num_classes} classes; fix: let its factory accept num_classes (or set it "
            "in model_kwargs)"
        )


def pretrained_normalization(name: str, model: nn.Module, in_chans: int):
    """(mean, std) the pretrained weights of ``model`` were trained with: timm's pretrained
    config, or the torchvision weights' transforms (ImageNet's); for grey input (the stem's
    RGB kernels summed) the channels' averages."""
    import torchvision

    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, Mapping) and cfg.get("mean") and cfg.get("std"):
        mean, std = cfg["mean"], cfg["std"]
    else:
        weights = torchvision.models.get_model_weights(name.removeprefix("torchvision/"))
        transforms = weights.DEFAULT.transforms()
        mean, std = transforms.mean, transforms.std
    if in_chans == 1:
        mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
    return [float(v) for v in mean], [float(v) for v in std]


def build_model(cfg: RunConfig, spec, device: torch.device) -> nn.Module:
    """The model of a run, with its starting weights (``--init`` or ``--pretrained``).

    The data's num_classes, in_chans and image_size go to :func:`create_model`; an entry of
    ``model_kwargs`` with one of these names wins, as model_kwargs win over every argument
    offered to a factory (e.g. ``img_size``). The model must still take the data's images and
    give its number of classes: :func:`check_model_fits_data` says when it does not.
    """
    from .weights import load_init_weights, load_pretrained

    data = {"num_classes": spec.num_classes, "in_chans": spec.in_chans,
            "image_size": spec.image_size}  # fmt: skip
    model = create_model(cfg.model, **{**data, **cfg.model_kwargs})
    check_model_fits_data(model, cfg.model, spec)
    if cfg.init is not None:
        load_init_weights(model, cfg.init, cfg.model, dataset=cfg.dataset)
    elif cfg.pretrained:
        load_pretrained(cfg.model, model)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


# Under a latency budget, kept widths are multiples of this unless --round-to says otherwise:
# unaligned widths (11 of 16 channels) can run slower than wider aligned ones, which the
# per-layer tables do not see (benchmarks/MEASUREMENTS.md, round 5).
LATENCY_ROUND_TO = 8


def build_pruner(
    cfg: RunConfig, model: nn.Module, spec, device: torch.device, resumed: dict | None = None
) -> S2HPruner:
    """The pruner of a run's model, with its budgets (and a latency table if one is set).
    A latency budget aligns kept widths to ``LATENCY_ROUND_TO`` by default; when aligned
    widths cannot meet the budgets, the widths stay unaligned (with a warning). A resumed
    run (``resumed``: its checkpoint's pruner state) keeps the alignment it was built with:
    timings taken again could decide that choice the other way. For the same reason it
    times nothing: the tables, the calibration and the skipped widths come from the
    checkpoint (which the caller loads)."""
    budgets = cfg.budgets()
    # (a checkpoint from before the skipped widths were saved is timed again, as it was then)
    restoring = resumed is not None and "slow_widths" in resumed.get("_extra_state", {})
    if resumed is not None and cfg.round_to is None:  # (the pruner keeps it in extra state)
        saved = resumed.get("_extra_state", {}).get("round_to")
        return _build_pruner(cfg, model, spec, device, saved, restoring)
    if cfg.round_to is not None or "latency" not in budgets:
        return _build_pruner(cfg, model, spec, device, cfg.round_to, restoring)
    try:
        return _build_pruner(cfg, model, spec, device, LATENCY_ROUND_TO)
    except BudgetError as exc:
        pruner = _build_pruner(cfg, model, spec, device, None)  # raises if still infeasible
        warnings.warn(
            f"the latency budget keeps unaligned widths: with widths aligned to "
            f"{LATENCY_ROUND_TO}, {exc}. Set --round-to to choose the alignment yourself",
            stacklevel=2,
        )
        return pruner


def _build_pruner(
    cfg: RunConfig, model: nn.Module, spec, device: torch.device, round_to: int | None,
    restoring: bool = False,
) -> S2HPruner:
    example = torch.zeros(1, spec.in_chans, spec.image_size, spec.image_size, device=device)
    budgets = cfg.budgets()
    latency_model = None
    if "latency" in budgets:
        from ..core.resources.latency import LatencyModel

        def latency_model(model, example_inputs, groups):
            """Rank 0 measures the tables and the whole model and every other rank takes
            them from it: one cost function, so every rank calibrates, skips widths and
            searches alike. A restored run measures nothing (its checkpoint has them)."""
            table = LatencyModel(
                model, example_inputs, groups, batch_size=cfg.latency_batch, device=device,
                cache=cfg.latency_cache, progress=cfg.progress and D.is_main(),
                predictor=cfg.latency_predictor, measure=D.is_main() and not restoring,
            )  # fmt: skip
            if D.is_distributed() and not restoring:
                table.load_state_dict(D.broadcast_object(
                    {k: v.cpu() if torch.is_tensor(v) else v
                     for k, v in table.state_dict().items()}))  # fmt: skip
            return table

    pruner = S2HPruner(
        model,
        example,
        target_flops=budgets.get("flops"),
        target_params=budgets.get("params"),
        target_latency=budgets.get("latency"),
        latency_model=latency_model,
        skip_slow_widths=cfg.skip_slow_widths,
        width_step=cfg.width_step,
        round_to=round_to,
        ignored_layers=cfg.ignored_layers,
        temperature=cfg.temperature,
        separate_hard_bn_stats=cfg.separate_hard_bn_stats and METHODS[cfg.method].hard,
        importance=cfg.importance,
    )
    pruner.hard_layout = given_hard_layout(cfg)
    if cfg.search_start == "uniform" and not restoring:  # (a resumed run's come from it)
        pruner.start_at(uniform_widths(pruner))
    return pruner


def build_model_and_pruner(cfg: RunConfig, spec, device: torch.device, resumed: dict | None = None):
    """(model, pruner, example input) of a run (``resumed``: see :func:`build_pruner`)."""
    model = build_model(cfg, spec, device)
    pruner = build_pruner(cfg, model, spec, device, resumed)
    return model, pruner, pruner.example_inputs


def build_trainer(
    cfg: RunConfig, model: nn.Module, pruner: S2HPruner, total_steps: int, spec=None
):
    """(S2HTrainer, weight LR schedule) of a run: the user-loop trainer, configured
    (``spec``: the data set's, needed to rebuild the starting model as a teacher)."""
    optimizer, schedule = build_weight_optimizer(model, cfg, total_steps)
    warmup, freeze = cfg.phase_fractions()
    teacher = cfg.freeze_teacher
    if teacher == "start":  # the starting weights again, from their file: also after a resume
        if spec is None or (cfg.init is None and not cfg.pretrained):
            raise ValueError("freeze_teacher 'start' needs the data spec and starting weights "
                             "(--init or --pretrained) to rebuild the starting model")
        with torch.random.fork_rng(devices=[]):  # the run's random stream stays as without it
            teacher = build_model(cfg, spec, next(model.parameters()).device)
    trainer = S2HTrainer(
        model,
        pruner,
        optimizer,
        total_steps,
        method=cfg.method,
        loss_fn=_cross_entropy(cfg.label_smoothing),
        mask_optimizer=build_mask_optimizer(pruner.mask_parameters(), cfg),
        alpha=cfg.alpha,
        balancer=GradientBalancer(
            beta=cfg.beta,
            gamma=cfg.gamma_init,
            growth=cfg.gamma_growth,
            gamma_min=cfg.gamma_min,
            gamma_max=cfg.gamma_max,
            tolerance=cfg.budget_tolerance,
            scope=cfg.balance,
        ),
        warmup=warmup,
        freeze=freeze,
        freeze_teacher=teacher,
        prune_at_freeze=cfg.prune_at_freeze,
        pruned_layout="auto" if cfg.hard_layout == "auto" and not cfg.deterministic else None,
        resource_on=cfg.resource_on,
        freeze_ranks_after_warmup=cfg.freeze_ranks_after_warmup,
        autocast=cfg.autocast,
        latency_feedback=cfg.latency_feedback,
        descent=cfg.descent,
    )
    set_mask_lr(trainer.mask_optimizer, cfg, schedule)
    return trainer, schedule


def _cross_entropy(label_smoothing: float):
    def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(logits, target, label_smoothing=label_smoothing)

    return loss_fn


# what a run writes besides config.yaml and metrics.jsonl: a run started over (--overwrite)
# removes them first, so that nothing of the replaced run is taken for the new one's
REPLACED_RESULTS = (
    "checkpoints/best.pt", "checkpoints/last.pt", "report.json", "model_pruned.pt",
    "model_pruned.pt2", "model_pruned.onnx", "accuracy.png", "flops.png", "widths.png",
)  # fmt: skip


# ---------------------------------------------------------------------------------- loop
# cuBLAS is deterministic only with a fixed workspace, set before its first handle is made
CUBLAS_WORKSPACE = ":4096:8"


def setup_device(cfg: RunConfig) -> torch.device:
    """The run's device (:func:`D.setup`), with ``--deterministic``'s settings made first.

    On CUDA the run warns instead of failing at a kernel that has no deterministic version
    (AdaptiveAvgPool2d's backward, in every CNN here): strict mode would stop every such run,
    and the rest still runs deterministically. The CPU stays strict (bitwise resumes)."""
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.deterministic and cuda:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    device = D.setup(cfg.device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
    return device


def prune(cfg: RunConfig) -> dict:
    """Train, prune and export; returns the report (also written to ``report.json``)."""
    from tqdm.auto import tqdm

    cfg.validate().resolve_paths()  # config.yaml then rebuilds the run from any folder
    # before the run folder is made and the data read (a large folder takes minutes)
    check_model_name(cfg.model)
    if cfg.init is not None and not Path(cfg.init).is_file():
        raise CheckpointError(f"--init: weights file {cfg.init} does not exist")
    device = setup_device(cfg)
    if cfg.autocast == "fp16" and device.type != "cuda":
        raise ConfigError(f"--autocast fp16 needs a CUDA device (this run is on {device}); "
                          "use --autocast bf16 on the CPU")  # fmt: skip
    out = prepare_run_dir(cfg)
    seed_everything(cfg.seed)
    last = out / "checkpoints" / "last.pt"
    checkpoint = load_checkpoint(last, device) if cfg.resume else None
    if checkpoint is not None:
        use_the_runs_own_defaults(cfg, checkpoint)
    splits = build_splits(cfg)
    model, pruner, example = build_model_and_pruner(
        cfg, splits.spec, device, resumed=checkpoint and checkpoint["pruner"]
    )
    if cfg.dataset == "imagefolder":
        # what pretrained weights expect; a run resumed from before this rule keeps its own
        if cfg.pretrained and cfg.mean is None and cfg.std is None and checkpoint is None:
            cfg.mean, cfg.std = pretrained_normalization(cfg.model, model, splits.spec.in_chans)
            splits = build_splits(cfg)
        # config.yaml records the folder's preprocessing: eval, export and deployment reuse it
        spec = splits.spec
        cfg.image_size, cfg.in_chans = spec.image_size, spec.in_chans
        cfg.mean, cfg.std = list(spec.mean), list(spec.std)
    main = D.is_main()

    fit_batch_to_split(cfg, len(splits.train))
    if checkpoint is not None:  # before the trainer, which needs the latency model's timings
        check_resumable(checkpoint, cfg)
        check_same_data(checkpoint, data_record(splits), cfg.data_root)
        load_model_and_pruner(checkpoint, model, pruner)
    sampler = EpochSampler(len(splits.train), cfg.seed, cfg.batch_size)
    loader = train_loader(splits.train, sampler, cfg.workers)
    steps_per_epoch = len(sampler.order()) // cfg.batch_size
    if steps_per_epoch == 0:
        raise RunDirectoryError("the training split holds no image for this process; add "
                                "images, or run on fewer processes")  # fmt: skip
    total_steps = max(1, round(cfg.resolve_epochs(steps_per_epoch) * steps_per_epoch))
    trainer, schedule = build_trainer(cfg, model, pruner, total_steps, splits.spec)
    val_loader = eval_loader(splits.val, cfg.eval_batch_size, cfg.workers)
    if D.world_size() > 1:  # the same initial weights on every rank (above); from here each
        seed_everything(cfg.seed + 1_000_003 * (D.rank() + 1))  # draws its own augmentation
    state = RunState()
    saved_step = None  # step of the newest good checkpoint of this run, if any
    if checkpoint is not None:
        state = restore(checkpoint, model, pruner, trainer, schedule, cfg, checked=True)
        saved_step = state.step
    else:  # what the starting weights score: what pruning costs is measured against it
        state.history.append(_start_record(model, pruner, val_loader, device, cfg))
    if main:
        if checkpoint is None:  # replacing a run (--overwrite): none of its results stay
            for stale in REPLACED_RESULTS:
                (out / stale).unlink(missing_ok=True)
            shutil.rmtree(out / "tensorboard", ignore_errors=True)
        # exactly the epochs of the checkpoint: a run killed between writing an epoch's line
        # and its checkpoint repeats that epoch when resumed
        lines = "".join(json.dumps(record) + "\n" for record in state.history)
        atomic_write_bytes(out / "metrics.jsonl", lines.encode())
        atomic_write_bytes(out / "config.yaml", yaml.safe_dump(cfg.to_yaml_dict()).encode())
    writer = MetricWriter(out)

    built_for = data_record(splits)

    def save_interval(path: Path = last, best: bool = False) -> None:
        """End of an interval: average BatchNorm statistics over ranks, refuse to save a
        non-finite state, save (``best``: as best.pt too, first, so that a run stopped in
        between repeats this epoch and writes it again)."""
        nonlocal saved_step
        trainer.average_statistics()
        _check_finite(model, pruner, trainer, _non_finite(state, total_steps, last, saved_step))
        if best:
            save_checkpoint(out / "checkpoints" / "best.pt", model, pruner, trainer, schedule,
                            state, cfg, built_for)  # fmt: skip
        save_checkpoint(path, model, pruner, trainer, schedule, state, cfg, built_for)
        saved_step = state.step

    model.train()
    bar = tqdm(total=total_steps, initial=state.step, desc=f"{cfg.method} {cfg.model}",
               disable=not (cfg.progress and main), dynamic_ncols=True)  # fmt: skip
    while state.step < total_steps:
        epoch = state.step // steps_per_epoch
        sampler.epoch, sampler.start_batch = epoch, state.step % steps_per_epoch
        loader.generator.manual_seed(cfg.seed * 100_003 + epoch)
        tune_layout = cfg.hard_layout == "auto" and not cfg.deterministic
        start = time.perf_counter()
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cfg.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            if tune_layout and trainer.pruned is None:  # kept widths moved since last epoch
                tune_hard_layout(pruner, x)
                tune_layout = False
            try:
                losses = trainer.step(x, y)
            except NonFiniteLossError as exc:
                raise NonFiniteLossError(
                    f"training step {state.step + 1} of {total_steps} (epoch {epoch + 1}): "
                    f"{exc}; {_last_good(last, saved_step)}"
                ) from None
            schedule.step()
            set_mask_lr(trainer.mask_optimizer, cfg, schedule)
            state.step += 1
            for k, v in losses.items():
                state.running[k] = state.running.get(k, 0.0) + v
            state.running["n"] = state.running.get("n", 0) + 1
            if state.step % 10 == 0:
                ratios = pruner.ratios("hard")
                bar.set_postfix(phase=trainer.phase(state.step - 1),
                                loss=f"{losses.get('task', 0):.3f}",
                                **{k: f"{v:.3f}" for k, v in ratios.items()})  # fmt: skip
                if main:
                    writer.log_step(state.step, losses, ratios)
            bar.update(1)
            if state.step % steps_per_epoch == 0 or state.step == total_steps:
                break
            if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                state.train_seconds += time.perf_counter() - start
                start = time.perf_counter()
                save_interval()
        state.train_seconds += time.perf_counter() - start
        trainer.average_statistics()  # before evaluating the epoch
        record = _epoch_record(state, steps_per_epoch, model, pruner, trainer, schedule,
                               val_loader, device, cfg)  # fmt: skip
        state.running = {}
        state.history.append(record)
        best = trainer.widths_frozen and record["val_top1_hard"] > state.best_top1_hard
        if best:  # before last.pt is written, so that a resumed run knows the best so far
            state.best_top1_hard = record["val_top1_hard"]
        if main:
            append_jsonl(out / "metrics.jsonl", record)
            writer.log(record)
        save_interval(best=best)
    bar.close()
    if not trainer.widths_frozen:  # no frozen phase (--freeze 0): the widths meet the budget
        trainer.freeze_widths()  # now, and the checkpoints hold the network the run exports
        save_interval(best=True)
    report = finish(cfg, out, splits, model, pruner, trainer, example, device, state)
    writer.close()
    return report


def _start_record(model, pruner, val_loader, device, cfg: RunConfig) -> dict:
    top1 = evaluate(model, val_loader, device, progress=cfg.progress and D.is_main(),
                    desc="val start")  # fmt: skip
    return {"epoch": 0.0, "step": 0, "val_top1_full": top1, "init": cfg.init,
            "pretrained": cfg.pretrained}  # fmt: skip


def _check_finite(model, pruner: S2HPruner, trainer: S2HTrainer, message: str) -> None:
    """Raise :class:`NonFiniteLossError` if a weight, width logit, statistic or optimizer state
    is NaN or infinite, so that such a state never replaces the last good checkpoint."""
    tensors = [*model.parameters(), *model.buffers(), *pruner.parameters(), *pruner.buffers()]
    if trainer.pruned is not None:
        tensors += [*trainer.pruned.parameters(), *trainer.pruned.buffers()]
    for optimizer in (trainer.optimizer, trainer.mask_optimizer):
        for param_state in optimizer.state.values():
            tensors += [v for v in param_state.values() if isinstance(v, torch.Tensor)]
    floats = [t for t in tensors if t.is_floating_point()]
    if floats and not bool(torch.stack([torch.isfinite(t).all() for t in floats]).all()):
        raise NonFiniteLossError(message)


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


def _epoch_record(state, steps_per_epoch, model, pruner, trainer, schedule, val_loader,
                  device, cfg) -> dict:  # fmt: skip
    running = reduced_sums(state.running)
    n = max(1, running.pop("n", 1))
    progress = cfg.progress and D.is_main()
    soft = evaluate(model, val_loader, device, pruner, "soft", progress, "val soft")
    if trainer.pruned is not None:  # the hard network is the pruned one now
        hard = evaluate(trainer.pruned, val_loader, device, progress=progress, desc="val hard")
    else:
        hard = evaluate(model, val_loader, device, pruner, "hard", progress, "val hard")
    return {
        "epoch": round(state.step / steps_per_epoch, 4),
        "step": state.step,
        "phase": trainer.phase(state.step - 1),
        "val_top1_soft": soft,
        "val_top1_hard": hard,
        "gap": soft - hard,
        "flops_ratio_soft": pruner.ratio("soft"),
        "flops_ratio_hard": pruner.ratio("hard"),
        "target_flops": pruner.budgets.get("flops"),
        "ratios_soft": pruner.ratios("soft"),
        "ratios_hard": pruner.ratios("hard"),
        "budgets": pruner.budgets,
        "budget_projection_steps": trainer.projection_steps,
        "budget_met_step": trainer.budget_met_step,
        "losses": {k: v / n for k, v in running.items()},
        "lr": schedule.get_last_lr()[0],
        "mask_lr": trainer.mask_optimizer.param_groups[0]["lr"],
        "widths": pruner.kept_widths(),
        "channels": {g.name: g.channels for g in pruner.groups},
        "train_seconds": state.train_seconds,
    }


# -------------------------------------------------------------------------------- finish
def finish(cfg, out, splits, model, pruner, trainer, example, device, state) -> dict:
    """Export the hard network, measure it on the test split, write the report and plots."""
    from .report import plot_run, summary_table

    exported = trainer.export().eval()  # freezes the widths on the budget if not yet done
    test_loader = eval_loader(splits.test, cfg.eval_batch_size, cfg.workers)
    progress = cfg.progress and D.is_main()
    top1_hard = evaluate(exported, test_loader, device, progress=progress, desc="test hard")
    top1_soft = evaluate(model, test_loader, device, pruner, "soft", progress, "test soft")
    if not D.is_main():
        return {}
    cpu_example = example.cpu()
    model.eval()
    full_cpu = model.cpu()
    # in the full model's layout, as timed below and saved (torch-pruning slices a
    # channels_last weight into an NCHW one)
    pruned_cpu = same_memory_format(exported.cpu(), full_cpu)
    flops_full = count_flops(full_cpu, cpu_example)
    flops_pruned = count_flops(pruned_cpu, cpu_example)
    time_speedup = (latency_speedup_in_fresh_process if cfg.latency_process == "fresh"
                    else latency_speedup)  # fmt: skip
    speed = time_speedup(full_cpu, pruned_cpu, cpu_example, repeats=cfg.latency_repeats)
    model.to(device)
    exported.to(device)
    report = {
        "method": cfg.method,
        "model": cfg.model,
        "dataset": cfg.dataset,
        "init": cfg.init,
        "pretrained": cfg.pretrained,
        "target_flops": pruner.budgets.get("flops"),
        "target_params": pruner.budgets.get("params"),
        "target_latency": pruner.budgets.get("latency"),
        "top1_start_val": state.history[0].get("val_top1_full") if state.history else None,
        "top1_hard": top1_hard,
        "top1_soft": top1_soft,
        "gap": top1_soft - top1_hard,
        "flops_ratio": flops_pruned / flops_full,
        "params_ratio": count_params(pruned_cpu) / count_params(full_cpu),
        "predicted_flops_ratio": pruner.ratio("hard"),
        "predicted_params_ratio": pruner.ratio("hard", "params"),
        "budget_projection_steps": trainer.projection_steps,
        # when the search first met the budget by itself, within its joint phase [start, end)
        "budget_met_step": trainer.budget_met_step,
        "joint_phase_steps": [trainer.warmup_end, trainer.freeze_start],
        "round_to": pruner.round_to,  # the alignment used (a latency budget's default: 8)
        # the last phase trained the pruned network itself: top1_soft is then the soft
        # network as it was when the widths froze
        "prune_at_freeze": trainer.pruned is not None,
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
        "classes": splits.classes,  # label i is classes[i] (image folders; None: fixed sets)
        "device": str(device),
        "world_size": D.world_size(),
        "torch": torch.__version__,
        "s2hpruner": __version__,
    }
    if pruner.latency is not None:
        report.update(_latency_report(model, exported, pruner, example, cfg, device))
    atomic_torch_save(pruned_cpu.cpu(), out / "model_pruned.pt")
    report["program"] = _save_program_or_warn(pruned_cpu.cpu(), cpu_example,
                                              out / "model_pruned.pt2")  # fmt: skip
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=2).encode())
    plot_run(out)
    print(summary_table(report))
    return report


def _save_program_or_warn(model: nn.Module, example: torch.Tensor, path: Path) -> dict:
    """The torch.export program of the pruned network, if torch.export can trace it: a model
    whose code it cannot trace (a data-dependent branch, a fixed batch in a ``view``) still
    ends its run with model_pruned.pt and report.json, not a traceback after hours of
    training that a resume would repeat."""
    try:
        save_program(model, example, path)
    except Exception as exc:  # noqa: BLE001 - torch.export raises many kinds; all reported
        path.unlink(missing_ok=True)  # not an earlier run's program beside this run's model
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        warnings.warn(f"torch.export could not save the pruned network ({message}); "
                      "model_pruned.pt holds it (torch.load, weights_only=False)",
                      stacklevel=2)  # fmt: skip
        return {"file": None, "error": message}
    return {"file": path.name, "error": None}


def _latency_report(model, exported, pruner: S2HPruner, example, cfg, device) -> dict:
    """Predicted and measured latency ratio of the exported model at the latency batch, on
    the run's device, from alternating forwards of the two (``latency_ratio``)."""
    batch = example[:1].expand(cfg.latency_batch, *example.shape[1:]).to(device)
    layout = torch.channels_last if cfg.channels_last else torch.contiguous_format
    batch = batch.contiguous(memory_format=layout)
    exported = exported.to(device, memory_format=layout).eval()
    model.eval()
    ratio, ratios, _, _ = latency_ratio(model, exported, batch, cfg.latency_repeats)
    frozen = [c for c in pruner.latency_calibration if c.get("when") == "freeze"]
    return {
        "latency_ratio_predicted": pruner.ratio("hard", "latency"),
        # what the model predicted for the frozen network before that network was timed
        "latency_ratio_predicted_before_check": (
            frozen[0]["predicted_ratio_before"] if frozen else None),
        "latency_floor": pruner.latency_floor,
        "latency_ratio": ratio,
        "latency_ratio_rounds": ratios,
        "latency_batch": cfg.latency_batch,
        "latency_correction": float(getattr(pruner.latency, "correction", 1.0)),
        # what the fitted model follows: the per-layer tables or a proxy such as FLOPs
        "latency_predictor": getattr(pruner.latency, "predictor", None),
        "latency_skipped_widths": pruner.slow_widths,
        "latency_calibration": pruner.latency_calibration,
    }
