"""Command-line interface: ``s2hpruner prune | eval | export | report | models | datasets``.

Every field of :class:`RunConfig` but ``model_kwargs`` (config file only) is a flag of ``prune``
(``target_flops`` -> ``--target-flops``);
``--config file.yaml`` fills the same fields, and flags given on the command line win.
Bad input exits with code 2 and a one-line message that says what to fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import re
import sys
import typing
from pathlib import Path

from .. import __version__
from ..core.errors import S2HError
from .config import (
    AUTOCAST,
    BALANCE_SCOPES,
    FREEZE_TEACHER_CHOICES,
    HARD_LAYOUTS,
    IMPORTANCE_CHOICES,
    LATENCY_PREDICTORS,
    LATENCY_PROCESSES,
    MASK_LR_SCHEDULES,
    METHODS,
    PHASES,
    SEARCH_STARTS,
    ConfigError,
    RunConfig,
    flag_name,
)

HELP = {
    "model": "model name: a registry name (resnet20, resnet56, resnet50, wrn28_10, vgg19_bn, "
    "mobilenet_v3_small, ...), any torchvision classification model name, or your own "
    "factory as package.module:function or path/to/file.py:function (`s2hpruner models` "
    "lists the registry)",
    "dataset": "data set: fashion-mnist (default), mnist, digits, cifar10, cifar100, "
    "tiny-imagenet, imagenet, or imagefolder (class folders under --data-root; "
    "`s2hpruner datasets` lists them)",
    "data_root": "folder with the data set's files (default: the data set's standard location, "
    "e.g. /usr/share/datasets/fashion-mnist)",
    "target_flops": "FLOPs budget as a fraction of the full model's FLOPs, in (0, 1] "
    "(0.35 when no budget is given)",
    "target_params": "parameter budget as a fraction of the full model's parameters; with other "
    "budgets, every one is met",
    "target_latency": "latency budget as a fraction of the full model's latency measured on "
    "--device at --latency-batch (per-layer tables, cached)",
    "latency_batch": "batch size at which latency is measured (budget and report)",
    "latency_cache": "file of measured latency tables (default: "
    "~/.cache/s2hpruner/latency/latency.json, or latency.json in $S2HPRUNER_CACHE)",
    "latency_feedback": "with --target-latency, times the hard network is exported, timed and "
    "the latency model refitted during the search (and again when the widths freeze)",
    "latency_predictor": "with --target-latency, what the latency model's shape follows: the "
    "measured per-layer tables, the FLOPs ratio, or (auto) whichever predicts the networks "
    "measured during the search better; its scale is always fitted to those measurements",
    "skip_slow_widths": "with --target-latency, never keep a width that the measured tables "
    "say is slower than a wider one (alignment effects)",
    "init": "start from trained weights: a state_dict (.pt, .pth, .safetensors), a checkpoint "
    "holding one (state_dict, model, ema, ...), or a pickled nn.Module",
    "pretrained": "start from torchvision/timm pretrained weights, read from the local cache "
    "only (never downloaded)",
    "image_size": "imagefolder: input size in pixels (default: from the images)",
    "in_chans": "imagefolder: 1 (greyscale) or 3 (RGB: grey images are converted, as "
    "torchvision's ImageFolder does; for a model trained that way) (default: from the images)",
    "mean": "imagefolder: per-channel normalisation mean (default: measured on a sample; "
    "with --pretrained, the weights' own)",
    "std": "imagefolder: per-channel normalisation std (default: measured on a sample; "
    "with --pretrained, the weights' own)",
    "method": f"training method: {', '.join(METHODS)}",
    "model_kwargs": "extra keyword arguments of the model factory (YAML mapping, config file only)",
    "width_step": "channel step d of every group (default: smallest divisor of the channel "
    "count giving at most 32 candidate widths)",
    "round_to": "make every kept channel width a multiple of this (or the full width), e.g. 8 "
    "or 16, so the pruned model runs at full kernel speed (default: 8 under a latency budget "
    "when that can meet the budgets, else any candidate width; 1 allows every width)",
    "ignored_layers": "module names whose output channels are never pruned (repeatable)",
    "epochs": "total training epochs (all phases; fractions allowed; default: 4, or as many "
    "as make 1,000 steps on a small data set, or twice the phases given in epochs)",
    "warmup": "fraction of the run training the weights with the width logits frozen at "
    "initialisation",
    "freeze": "fraction of the run at the end with widths frozen, training the hard network "
    "distilled from the soft one (default: 0.25, or half what the warm-up leaves if less)",
    "warmup_epochs": "warm-up in epochs, instead of --warmup (either flag replaces the "
                     "config file's warm-up, in whichever form the file gives it)",
    "freeze_epochs": "frozen-width phase in epochs, instead of --freeze (either flag replaces "
                     "the config file's)",
    "batch_size": "training batch size (per process under torchrun)",
    "eval_batch_size": "evaluation batch size",
    "val_size": "validation images held out from the training files (count, or fraction < 1; "
    "default: 10%% of them, at most 5000)",
    "train_subset": "use only this many training images (quick experiments)",
    "augment": "standard training augmentation of the data set",
    "optimizer": "optimizer of the weights: sgd (momentum) or adamw (transformers)",
    "lr": "peak learning rate of the weights (cosine schedule)",
    "momentum": "SGD momentum of the weights",
    "weight_decay": "weight decay of conv/linear weights (not of norms and biases)",
    "nesterov": "Nesterov momentum for the weights",
    "lr_warmup_steps": "linear learning-rate warm-up steps before the cosine decay",
    "label_smoothing": "label smoothing of the task loss",
    "mask_optimizer": "optimizer of the width logits: adam or sgd",
    "mask_lr": "learning rate of the width logits",
    "mask_lr_schedule": "constant, or cosine: the width logits' learning rate is scaled by "
                        "the weights' schedule (warm-up and cosine decay)",
    "temperature": "softmax temperature tau of the width distribution (constant)",
    "alpha": "weight of the hard-network distillation loss G_h in the weights' loss",
    "beta": "norm of the gap gradient on the width logits, relative to the task gradient",
    "gamma_init": "initial norm of the resource gradient relative to task + gap gradients",
    "gamma_growth": "per-step growth of gamma while the budget is missed by more "
    "than the tolerance (it decays by the same factor inside)",
    "gamma_min": "lower bound of gamma",
    "gamma_max": "upper bound of gamma",
    "budget_tolerance": "tolerance on the hard resource ratio around the target",
    "balance": "what the norm balancing of the width-logit gradients spans: global (all "
               "groups at once) or per_group (each group on its own)",
    "importance": "what ranks a group's channels (the hard network keeps the first ones): "
                  "producers (the L1 norm of the channel's weights in the layers that produce "
                  "it, as the method specifies) or group (torch-pruning's group L1 importance: "
                  "also the consuming layers' input weights and the norms' scales)",
    "search_start": "where the width search starts: full (the nearly full network, as the "
                    "method specifies) or uniform (the widths of uniform pruning at the "
                    "budget, e.g. from a trained model: the search then moves channels "
                    "between groups instead of first cutting down to the budget)",
    "descent": "fraction of the joint search over which the budget it aims at falls "
               "linearly from the full model to the target (0: the target from the first "
               "step, as the method specifies): a slower, gradual narrowing of the hard "
               "network, e.g. when pruning a trained model",
    "freeze_teacher": "what the hard network is distilled from once the widths freeze: soft "
                      "(the soft network's logits, as the method specifies), none (task loss "
                      "only; the last phase costs one pruned network's step) or start (a fixed "
                      "copy of the starting weights, --init or --pretrained)",
    "prune_at_freeze": "once the widths freeze, train the physically pruned network itself, "
                       "at its smaller cost; the soft network keeps the weights it had at the "
                       "freeze (with --freeze-teacher none or start the updates are the masked "
                       "hard network's; with soft the teacher is the soft network at the freeze)",
    "resource_on": "resource ratio in the resource loss: hard (kept widths, straight-through "
                   "gradient; what the exported model will have) or soft (expected widths)",
    "freeze_ranks_after_warmup": "stop recomputing the channel importance order after warm-up",
    "separate_hard_bn_stats": "keep separate BatchNorm running statistics for the hard network "
    "(S2HPruner and its ablations need them, so --no-separate-hard-bn-stats is refused there; "
    "DMP never trains the hard network and exports the soft statistics either way)",
    "autocast": "mixed precision: bf16 (CPU and CUDA) or fp16 (CUDA, with a grad scaler)",
    "seed": "random seed (data split, data order, initialisation)",
    "split_seed": "seed of the train/val split only (default: --seed); set it to the seed a "
                  "starting checkpoint's split used, so validation images stay unseen",
    "device": "auto (cuda if available, else cpu), cpu, cuda or cuda:N",
    "workers": "data loader worker processes",
    "channels_last": "channels-last memory format for 4-D activations (faster convs on CPU)",
    "hard_layout": "memory format of the sliced hard pass: model (the model's own), contiguous "
                   "(NCHW), channels_last, or auto (time the layouts at every epoch's start and "
                   "keep the fastest: faster on CPU, but picked by timing, so not reproducible "
                   "bit for bit)",
    "out": "run directory for config, metrics, checkpoints, exported model, report and plots",
    "resume": "continue from OUT/checkpoints/last.pt (command line only: a config file's "
              "resume is ignored)",
    "overwrite": "allow replacing a run in OUT (finished, or stopped before its end; command "
                 "line only: a config file's overwrite is ignored)",
    "checkpoint_every": "also save OUT/checkpoints/last.pt every N training steps (0: epochs only)",
    "deterministic": "use deterministic algorithms (bitwise-reproducible resume on CPU)",
    "latency_repeats": "timed repeats of the report's latency measurements of the exported "
    "model (medians are reported); a latency budget's tables and checks time at their own, "
    "fixed settings",
    "latency_process": "where the report times the exported model on CPU: fresh (a new Python "
    "process, so that the timing leaves this process's allocator as it was) or same (this "
    "process: no start-up cost, but glibc's allocator stays held for the rest of it)",
    "progress": "show progress bars",
}


class _Cleared:
    """The value ``none`` of an optional setting on the command line: it clears what a config
    file set (``--init none`` runs a from-trained config from random weights)."""

    def __repr__(self) -> str:
        return "none"


CLEARED = _Cleared()


def _or_none(kind: type):
    def parse(text: str):
        return CLEARED if text.strip().lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name == "model_kwargs":
            continue
        hint = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f"{HELP[f.name]} (default: {default})"
        optional = type(None) in typing.get_args(hint)
        if optional:
            text += "; none clears a config file's value"
        if hint is bool:
            parser.add_argument(
                flag_name(f.name), action=argparse.BooleanOptionalAction, default=None, help=text
            )
        elif f.name == "ignored_layers":
            parser.add_argument(flag_name(f.name), action="append", default=None, help=text)
        elif f.name in ("mean", "std"):
            parser.add_argument(flag_name(f.name), type=_or_none(float), nargs="+", default=None,
                                help=text)  # fmt: skip
        else:
            kind = {int: int, float: float, str: str}.get(hint)
            if kind is None:  # Optional[...]
                args = [a for a in typing.get_args(hint) if a is not type(None)]
                kind = args[0] if args and args[0] in (int, float, str) else str
            choices = {"method": METHODS, "hard_layout": HARD_LAYOUTS,
                       "autocast": AUTOCAST, "balance": BALANCE_SCOPES,
                       "mask_lr_schedule": MASK_LR_SCHEDULES,
                       "freeze_teacher": FREEZE_TEACHER_CHOICES,
                       "search_start": SEARCH_STARTS,
                       "importance": IMPORTANCE_CHOICES,
                       "latency_predictor": LATENCY_PREDICTORS,
                       "latency_process": LATENCY_PROCESSES}.get(f.name)  # fmt: skip
            if optional and choices is not None:
                choices = (*choices, CLEARED)
            parser.add_argument(
                flag_name(f.name),
                type=_or_none(kind) if optional else kind,
                default=None,
                help=text,
                choices=choices,
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s2hpruner",
        description="Prune an image model to a FLOPs, parameter or latency budget with "
        "S2HPruner (soft-to-hard distillation) and export the physically smaller network.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "prune",
        help="train, prune and export (the main job)",
        description="Train the soft and hard networks together, search the "
        "widths, and export the hard network.",
    )
    p.add_argument("--config", help="YAML file with RunConfig fields; flags override it")
    _add_config_flags(p)

    e = sub.add_parser(
        "eval",
        help="top-1 of a checkpoint or an exported model",
        description="Evaluate an exported model (.pt2 or model_pruned.pt) or a "
        "training checkpoint (soft and hard networks).",
    )
    e.add_argument("path", help="checkpoint (.pt from checkpoints/), model_pruned.pt or .pt2")
    e.add_argument("--dataset", default=None, help="data set (default: the run's)")
    e.add_argument("--data-root", default=None, help="data folder (default: the run's)")
    e.add_argument("--split", default="test", choices=("test", "val", "all"),
                   help="which split; all: every image of the data root (train and test "
                   "files; a folder of class folders whole, not its held-out test share)")
    e.add_argument("--device", default="auto", help="auto, cpu or cuda")
    e.add_argument("--batch-size", type=int, default=500, help="evaluation batch size")

    x = sub.add_parser(
        "export",
        help="export the hard network of a checkpoint",
        description="Physically prune the hard network of a checkpoint and save "
        "it as .pt2 (torch.export), .pt and optionally ONNX.",
    )
    x.add_argument("checkpoint", help="a checkpoint file (checkpoints/last.pt or best.pt)")
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument(
        "--onnx",
        action="store_true",
        help="also write model_pruned.onnx and check it with onnxruntime",
    )
    x.add_argument("--overwrite", action="store_true",
                   help="replace models an earlier export (or the run) wrote in OUT")

    r = sub.add_parser(
        "report",
        help="redraw plots and print the table of a run directory",
        description="Redraw the PNG plots of a run from metrics.jsonl and print its report.",
    )
    r.add_argument("run_dir", help="a run directory made by `s2hpruner prune`")

    filter_help = ("only the names containing this text, or matching it as a glob pattern "
                   "with * ? [ ] (e.g. 'vit*'); case-insensitive")  # fmt: skip
    m = sub.add_parser(
        "models",
        help="list the registered model names (for --model)",
        description="Print the model registry's names, sorted, one per line (as timm's "
        "list_models). --model also takes any torchvision classification model and your own "
        "factory (package.module:function or path/to/file.py:function).",
    )
    m.add_argument("filter", nargs="?", default=None, help=filter_help)
    m.add_argument("--torchvision", action="store_true",
                   help="also list torchvision's classification models, as torchvision/<name>")
    m.add_argument("-l", "--long", action="store_true",
                   help="add each name's one-line description")

    d = sub.add_parser(
        "datasets",
        help="list the data set names (for --dataset)",
        description="Print the data set registry's names, sorted, one per line.",
    )
    d.add_argument("filter", nargs="?", default=None, help=filter_help)
    d.add_argument("-l", "--long", action="store_true",
                   help="add each name's one-line description")
    return parser


def _matches(name: str, pattern: str | None) -> bool:
    """``pattern`` as a glob if it has glob characters, else as a substring (case-insensitive);
    a ``torchvision/<name>`` also matches through its bare name."""
    if not pattern:
        return True
    pattern = pattern.lower()
    names = {name.lower(), name.lower().rsplit("/", 1)[-1]}
    if any(c in pattern for c in "*?["):
        return any(fnmatch.fnmatchcase(n, pattern) for n in names)
    return any(pattern in n for n in names)


def _summary(obj: object) -> str:
    """The first clause of ``obj``'s docstring (up to its first ``.`` or ``;``), on one line,
    without reST markup."""
    doc = (getattr(obj, "__doc__", None) or "").strip().split("\n\n", 1)[0]
    text = " ".join(doc.split())
    text = re.sub(r":\w+:`~?([^`]*)`", r"\1", text).replace("``", "")
    return re.split(r"(?<=\.)\s|;\s", text, maxsplit=1)[0]


def _print_names(kind: str, names: list[str], pattern: str | None,
                 describe: typing.Callable[[str], str] | None, hint: str = "") -> None:  # fmt: skip
    """Print the ``names`` that match ``pattern``, one per line (with ``describe(name)``); none
    matching is no error (exit code 0), but says so on stderr."""
    shown = [n for n in names if _matches(n, pattern)]
    if not shown:
        print(f"s2hpruner: no {kind} name matches {pattern!r}; `s2hpruner {kind}s` lists them "
              f"all{hint}", file=sys.stderr)  # fmt: skip
        return
    width = max(len(n) for n in shown)
    for n in shown:
        text = describe(n) if describe is not None else ""
        print(f"{n:<{width}}  {text}".rstrip() if text else n)


def list_models_command(args: argparse.Namespace) -> None:
    """``s2hpruner models [FILTER] [--torchvision] [--long]``."""
    from .models import MODELS, list_models

    def describe(name: str) -> str:
        return _summary(MODELS[name]) if name in MODELS else "torchvision"

    hint = "" if args.torchvision else " (add --torchvision for torchvision's models)"
    _print_names("model", list_models(include_torchvision=args.torchvision), args.filter,
                 describe if args.long else None, hint)  # fmt: skip


def list_datasets_command(args: argparse.Namespace) -> None:
    """``s2hpruner datasets [FILTER] [--long]``."""
    from .data import DATASETS, FOLDER, dataset_spec, list_datasets

    def describe(name: str) -> str:
        if name == FOLDER:
            shape = "classes, channels and size from the images"
        else:
            spec = dataset_spec(name)
            size = spec.image_size
            shape = f"{spec.num_classes} classes, {spec.in_chans}x{size}x{size}"
        return f"{shape}: {_summary(DATASETS[name])}"

    _print_names("dataset", list_datasets(), args.filter, describe if args.long else None)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    names = [f.name for f in dataclasses.fields(RunConfig)]
    overrides = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    cleared = {n for n, v in overrides.items()
               if v is CLEARED or (isinstance(v, list) and CLEARED in v)}  # fmt: skip
    for name in cleared:
        if isinstance(overrides[name], list) and len(overrides[name]) > 1:
            raise ConfigError(f"{flag_name(name)}: none clears the setting; give it alone")
        del overrides[name]
    for share, epochs in PHASES.items():
        if share in overrides and epochs in overrides:
            raise ConfigError(f"--{share} and --{epochs.replace('_', '-')} both set the phase; "
                              "give one")  # fmt: skip
    if args.config:
        cfg = RunConfig.from_yaml(args.config, **overrides)
    else:
        cfg = RunConfig.from_dict(overrides)
    return dataclasses.replace(cfg, **dict.fromkeys(cleared)).validate()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "prune":
            from .run import prune

            prune(config_from_args(args))
        elif args.command == "eval":
            from .tools import evaluate_path

            print(json.dumps(evaluate_path(args), indent=2))
        elif args.command == "export":
            from .tools import export_checkpoint

            print(json.dumps(export_checkpoint(args.checkpoint, args.out, args.onnx,
                                                args.overwrite), indent=2))
        elif args.command == "report":
            from .tools import redraw_report

            print(redraw_report(Path(args.run_dir)))
        elif args.command == "models":
            list_models_command(args)
        elif args.command == "datasets":
            list_datasets_command(args)
    except S2HError as exc:
        print(f"s2hpruner: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("s2hpruner: interrupted; resume with --resume", file=sys.stderr)
        return 130
    finally:
        from ..core import distributed as D

        D.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
