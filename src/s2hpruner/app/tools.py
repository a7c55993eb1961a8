"""The ``eval``, ``export`` and ``report`` commands: work on finished or running runs."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

from ..core import distributed as D
from ..core.errors import CheckpointError, RunDirectoryError, S2HError
from ..core.resources import count_flops, count_params
from ..core.trainer import evaluate
from .checkpoint import FORMAT as CHECKPOINT_FORMAT
from .checkpoint import load_checkpoint, load_model_and_pruner
from .config import RunConfig
from .data import DataSpec, build_datasets
from .files import (
    atomic_torch_save,
    atomic_write_bytes,
    onnx_max_abs_diff,
    save_onnx,
    save_program,
)
from .models import load_factory
from .report import plot_run, summary_table
from .run import build_model_and_pruner, build_splits


def _run_dir_near(path: Path) -> Path | None:
    """The run directory of a model or checkpoint file (it holds config.yaml)."""
    for folder in (path.parent, path.parent.parent):
        if (folder / "config.yaml").exists():
            return folder
    return None


def _run_config_near(path: Path) -> RunConfig | None:
    folder = _run_dir_near(path)
    if folder is None:
        return None
    return RunConfig.from_dict(yaml.safe_load((folder / "config.yaml").read_text()))


def _classes_near(path: Path) -> list[str] | None:
    """The class names, in label order, a model or checkpoint was trained on (its run's
    report.json, or an export's classes.json), if recorded."""
    folder = _run_dir_near(path)
    if folder is None:
        return None
    if (folder / "classes.json").exists():
        return json.loads((folder / "classes.json").read_text())
    if (folder / "report.json").exists():
        return json.loads((folder / "report.json").read_text()).get("classes")
    return None


def _check_classes(path: Path, splits, trained: list[str] | None = None) -> None:
    """Labels are folder names' ranks: another folder with other classes would mislabel
    (``trained``: the classes a checkpoint records; else its run's or export's)."""
    if splits.classes is None:
        return
    trained = trained if trained is not None else _classes_near(path)
    if trained is not None and trained != splits.classes:
        raise S2HError(
            f"{path} was trained on classes {trained}, but the data has {splits.classes}: "
            "their labels would not match; fix: evaluate on class folders named as in training"
        )


def restore_from_checkpoint(path: str | Path, device: torch.device | str = "cpu"):
    """(config, model, pruner, example, hard network, class names or None) of a checkpoint,
    weights and widths loaded. The hard network is the physically pruned one: the one the run
    trained after its freeze (``prune_at_freeze``), else the pruner's export of the model.
    The model is built for the data spec the checkpoint records (older checkpoints: the data
    set's, read again)."""
    ckpt = load_checkpoint(Path(path), map_location=device)
    cfg = RunConfig.from_dict(ckpt["config"])
    built_for = ckpt.get("data") or {}
    spec = DataSpec(**built_for["spec"]) if "spec" in built_for else _spec_of(cfg)
    started_from = cfg.init, cfg.pretrained
    cfg.init, cfg.pretrained = None, False  # the checkpoint holds the weights
    model, pruner, example = build_model_and_pruner(cfg, spec, device,
                                                    resumed=ckpt.get("pruner"))  # (alignment)
    cfg.init, cfg.pretrained = started_from  # the config as the run wrote it
    load_model_and_pruner(ckpt, model, pruner)
    pruner.freeze_ranks = True
    hard = pruner.export()
    trained = (ckpt.get("trainer") or {}).get("pruned")
    if trained is not None:
        try:
            hard.load_state_dict(trained)
        except (RuntimeError, KeyError) as exc:
            raise CheckpointError(f"{path}: its pruned network does not match its widths "
                                  f"({exc}); the checkpoint is damaged") from exc  # fmt: skip
    return cfg, model, pruner, example, hard, built_for.get("classes")


def _spec_of(cfg: RunConfig):
    """The data spec a run's model was built for (image folders are read for it)."""
    from .data import dataset_spec, folder_spec

    if cfg.dataset == "imagefolder":
        return folder_spec(cfg.data_root, cfg.image_size, cfg.mean, cfg.std, cfg.in_chans)
    return dataset_spec(cfg.dataset)


def _is_checkpoint(path: Path) -> bool:
    """A training checkpoint, by its place (a run's checkpoints/) or, copied elsewhere, by its
    content (memory-mapped: only the header is read); else a model file."""
    if path.suffix != ".pt":
        return False
    if path.parent.name == "checkpoints":
        return True
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - not a checkpoint we wrote; the model path reports it
        return False
    return isinstance(saved, dict) and saved.get("format") == CHECKPOINT_FORMAT


def evaluate_path(args: argparse.Namespace) -> dict:
    path = Path(args.path)
    if not path.exists():
        raise S2HError(f"{path} does not exist")
    device = D.setup(args.device)
    cfg = _run_config_near(path)
    is_checkpoint = _is_checkpoint(path)
    classes = None
    if is_checkpoint:
        cfg, model, pruner, _, hard, classes = restore_from_checkpoint(path, device)
    dataset = args.dataset or (cfg.dataset if cfg else None)
    if dataset is None:
        raise S2HError(f"cannot tell which data set {path} was trained on; pass --dataset")
    # the run's data root only for the run's own data set
    root = args.data_root or (cfg.data_root if cfg and cfg.dataset == dataset else None)
    if cfg is not None:
        cfg.dataset, cfg.data_root = dataset, root
        if args.split == "all":  # the run's subset and validation share do not apply
            cfg.train_subset, cfg.val_size = None, 0
        splits = build_splits(cfg, augment=False)
    else:
        splits = build_datasets(dataset, root, val_size=None, seed=0, augment=False)
    _check_classes(path, splits, classes)
    if args.split == "all":  # validation is held out of the training files: the three cover all
        images = torch.utils.data.ConcatDataset([splits.train, splits.val, splits.test])
    else:
        images = getattr(splits, args.split)
    loader = torch.utils.data.DataLoader(images, batch_size=args.batch_size)
    result = {"path": str(path), "dataset": dataset, "split": args.split, "images": len(images)}
    if is_checkpoint:
        result["top1_soft"] = evaluate(model, loader, device, pruner, "soft", True, "soft")
        result["top1_hard"] = evaluate(hard, loader, device, progress=True, desc="hard")
        result["flops_ratio_hard"] = pruner.ratio("hard")
        return result
    if path.suffix == ".pt2":
        from .files import load_program

        try:
            model = load_program(path).to(device)
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable torch.export program "
                                  f"({type(exc).__name__}: {exc})") from exc  # fmt: skip
    else:
        try:
            try:
                model = torch.load(path, map_location=device, weights_only=False)
            except (ModuleNotFoundError, AttributeError):  # a user's class not imported yet:
                if cfg is None or ":" not in cfg.model:  # import its module as the run did
                    raise
                load_factory(cfg.model)
                model = torch.load(path, map_location=device, weights_only=False)
        except S2HError:
            raise
        except Exception as exc:
            raise CheckpointError(f"{path} is not a readable model file: {exc}") from exc
        if not isinstance(model, torch.nn.Module):
            raise CheckpointError(f"{path} does not hold an nn.Module")
    result["top1"] = evaluate(model, loader, device, progress=True, desc="eval")
    return result


# onnxruntime against PyTorch on a random batch, relative to the outputs' scale: float32
# kernels differ by ~1e-6 here; more than this means the ONNX program computes something else
ONNX_TOLERANCE = 1e-3


def export_checkpoint(checkpoint: str | Path, out: str | Path, onnx: bool = False,
                      overwrite: bool = False) -> dict:  # fmt: skip
    """Export the hard network of ``checkpoint`` into ``out`` (.pt2, .pt, optionally .onnx
    checked against PyTorch by onnxruntime), never over an earlier export (a run's own
    models) unless ``overwrite``. Every file is written and checked in a staging folder
    first and moved in only then: a failure leaves the earlier export as it was. Outside a
    run directory, the run's config.yaml (its preprocessing) and class names go along, so
    ``eval`` of the exported model reads images as the run did."""
    out = Path(out)
    earlier = sorted(str(p) for p in out.glob("model_pruned.*"))
    if earlier and not overwrite:
        raise RunDirectoryError(f"{out} already holds exported models ({', '.join(earlier)}); "
                                "pass --overwrite to replace them, or choose another --out")
    if onnx:
        try:
            import onnxruntime  # noqa: F401
        except ImportError as exc:
            raise S2HError("--onnx needs onnx, onnxruntime and onnxscript; fix: "
                           "pip install 's2hpruner[onnx]'") from exc  # fmt: skip
    cfg, model, pruner, example, exported, classes = restore_from_checkpoint(checkpoint)
    exported = exported.eval()
    for stale in out.glob(".export.*.tmp"):  # an export killed before it could clean up
        shutil.rmtree(stale, ignore_errors=True)
    result = {
        "model": cfg.model,
        "flops_ratio": count_flops(exported, example) / count_flops(model, example),
        "params_ratio": count_params(exported) / count_params(model),
        "files": [str(out / "model_pruned.pt"), str(out / "model_pruned.pt2")],
    }
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".export.", suffix=".tmp"))
    try:
        save_program(exported, example, staging / "model_pruned.pt2")
        atomic_torch_save(exported, staging / "model_pruned.pt")
        if onnx:
            save_onnx(exported, example, staging / "model_pruned.onnx")
            # a seeded random batch: on the all-zero example every map past the stem is
            # constant, and wrong kernels could pass
            generator = torch.Generator().manual_seed(0)
            probe = torch.randn(2, *example.shape[1:], generator=generator).to(example)
            diff = onnx_max_abs_diff(exported, probe, staging / "model_pruned.onnx")
            with torch.no_grad():
                scale = max(1.0, float(exported(probe).abs().max()))
            if not diff <= ONNX_TOLERANCE * scale:
                raise S2HError(f"the ONNX program's outputs differ from PyTorch's by {diff:.3g} "
                               f"(more than {ONNX_TOLERANCE:g} of the outputs' scale "
                               f"{scale:.3g}): nothing was exported; export without --onnx, "
                               "or report the model")  # fmt: skip
            result["onnx_max_abs_diff"] = diff
            result["files"].append(str(out / "model_pruned.onnx"))
        if not (out / "metrics.jsonl").exists():  # (a run's own folder has its config)
            atomic_write_bytes(staging / "config.yaml", yaml.safe_dump(cfg.to_yaml_dict()).encode())
            classes = classes if classes is not None else _classes_near(Path(checkpoint))
            if classes is not None:
                atomic_write_bytes(staging / "classes.json", json.dumps(classes).encode())
        written = sorted(staging.iterdir())
        for file in written:  # all written and checked: now in place
            os.replace(file, out / file.name)
        for name in ("model_pruned.onnx", "classes.json"):  # another checkpoint's: not kept
            if name not in {file.name for file in written}:
                (out / name).unlink(missing_ok=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result


def redraw_report(run_dir: Path) -> str:
    if not (run_dir / "metrics.jsonl").exists():
        raise S2HError(f"{run_dir} is not a run directory (no metrics.jsonl)")
    written = plot_run(run_dir)
    lines = [f"wrote {p}" for p in written]
    if (run_dir / "report.json").exists():
        lines.append(summary_table(json.loads((run_dir / "report.json").read_text())))
    return "\n".join(lines)
