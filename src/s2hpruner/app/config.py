"""One dataclass drives a run; YAML files and command-line flags fill it."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..core.balance import SCOPES as BALANCE_SCOPES
from ..core.balance import GradientBalancer
from ..core.errors import S2HError
from ..core.trainer import FREEZE_TEACHERS, default_freeze
from ..core.trainer import METHODS as _METHODS

METHODS = tuple(_METHODS)
HARD_LAYOUTS = ("auto", "model", "contiguous", "channels_last")
AUTOCAST = ("bf16", "fp16")
MASK_LR_SCHEDULES = ("constant", "cosine")
# what the latency model's shape follows: chosen on the measured networks, or fixed
LATENCY_PREDICTORS = ("auto", "tables", "flops")
# "start": a fixed copy of the starting weights (--init or --pretrained) teaches the last phase
FREEZE_TEACHER_CHOICES = (*FREEZE_TEACHERS, "start")
# what ranks a group's channels: its producers' L1 norms (SPEC) or torch-pruning's group L1
IMPORTANCE_CHOICES = ("producers", "group")
# fresh: a new Python process times the report's latency and takes the allocator state that
# timing holds with it (core.fresh_timing); same: this process, which then keeps that state
LATENCY_PROCESSES = ("fresh", "same")
# where the width search starts: the nearly full network (SPEC) or uniform pruning's widths
SEARCH_STARTS = ("full", "uniform")
DEFAULT_TARGET_FLOPS = 0.35
# with no --epochs: 4 epochs, or more on a small data set, so that the schedule has at least
# this many steps (scikit-learn's digits has 10 steps per epoch at batch 128: 4 epochs left
# the run at 47% top-1)
DEFAULT_EPOCHS = 4.0
DEFAULT_MIN_STEPS = 1000
# flags that say how to run, not what: config.yaml leaves them out, so that a run's config.yaml
# given to --config neither replaces, resumes nor silences a run by itself
RUN_CONTROL = ("resume", "overwrite", "progress")
# of these, the ones a config file may not set (an older config.yaml records them): a run is
# replaced or resumed only when its command line says so
COMMAND_LINE_ONLY = ("resume", "overwrite")
# settings only an image folder takes: the other data sets have a fixed size and normalisation
FOLDER_OPTIONS = ("image_size", "in_chans", "mean", "std")


class ConfigError(S2HError, ValueError):
    """A config file or flag with an unknown key or an invalid value."""


@dataclass
class RunConfig:
    """Everything that defines a pruning run (see ``s2hpruner prune --help``)."""

    # what to prune, on which data, to which budget
    model: str = "resnet20"
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    target_flops: float | None = None  # with no target at all: DEFAULT_TARGET_FLOPS
    target_params: float | None = None
    target_latency: float | None = None
    latency_batch: int = 64  # batch size at which latency counts (target and report)
    latency_cache: str | None = None  # default: ~/.cache/s2hpruner/latency/latency.json
    skip_slow_widths: bool = True  # latency budget: never keep a width slower than a wider one
    latency_feedback: int = 3  # latency budget: measured refits of the latency model mid-search
    latency_predictor: str = "auto"  # latency budget: shape of the cost (LATENCY_PREDICTORS)
    method: str = "s2h"
    model_kwargs: dict = field(default_factory=dict)
    init: str | None = None  # start from these trained weights (state dict or checkpoint)
    pretrained: bool = False  # torchvision/timm weights from the local cache only
    image_size: int | None = None  # imagefolder: input size (default: from the images)
    in_chans: int | None = None  # imagefolder: 1 or 3 channels (default: from the images)
    mean: list[float] | None = None  # imagefolder: normalisation (default: measured)
    std: list[float] | None = None
    width_step: int | None = None
    round_to: int | None = None  # kept widths: multiples of this or full (latency budget: 8)
    ignored_layers: list[str] = field(default_factory=list)
    # schedule: warm-up (u frozen at init), joint search, last phase (u frozen, hard trained);
    # warmup and freeze are fractions of the run, *_epochs (if set) absolute and win
    epochs: float | None = None  # None: DEFAULT_EPOCHS, or more for DEFAULT_MIN_STEPS steps
    warmup: float = 0.0
    freeze: float | None = None  # None: core.trainer.default_freeze (0.25 unless warm-up is long)
    warmup_epochs: float | None = None
    freeze_epochs: float | None = None
    batch_size: int = 128
    eval_batch_size: int = 500
    val_size: float | None = None  # default: 10% of the training files, at most 5000
    train_subset: int | None = None
    augment: bool = True
    # weights: SGD + momentum (CNNs) or AdamW (transformers), weight decay, cosine schedule
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = True
    lr_warmup_steps: int = 0
    label_smoothing: float = 0.0
    # width logits: own optimizer, norm-balanced gradients (see core/balance.py)
    mask_optimizer: str = "adam"
    mask_lr: float = 0.05
    mask_lr_schedule: str = "constant"  # or "cosine": scaled as the weights' lr is
    temperature: float = 1.0
    alpha: float = 1.0  # weight of G_h in the weights' loss
    beta: float = GradientBalancer.beta  # gap gradient norm relative to the task's (on u)
    gamma_init: float = GradientBalancer.gamma  # resource gradient norm relative to task + gap
    gamma_growth: float = GradientBalancer.growth  # per step, while the budget is missed
    gamma_min: float = GradientBalancer.gamma_min
    gamma_max: float = GradientBalancer.gamma_max
    budget_tolerance: float = GradientBalancer.tolerance
    balance: str = GradientBalancer.scope  # the rule spans all width logits, or each group
    importance: str = "producers"  # channel ranks: producers' L1 (SPEC) or the whole group's
    search_start: str = "full"  # the search starts nearly full, or at uniform pruning's widths
    descent: float = 0.0  # share of the search over which its aim falls from full to the budget
    freeze_teacher: str = "soft"  # last phase: hard distilled from soft, "none" or "start"
    prune_at_freeze: bool = False  # last phase trains the physically pruned network itself
    resource_on: str = "hard"  # R on the hard FLOPs ratio (straight-through) or on the soft one
    freeze_ranks_after_warmup: bool = False
    separate_hard_bn_stats: bool = True
    autocast: str | None = None  # bf16 (CPU, CUDA) or fp16 (CUDA) mixed precision
    # run
    seed: int = 0
    # seed of the train/val split only (None: ``seed``). Fix it to the split a starting
    # checkpoint was trained on, so other seeds never validate on images it has seen
    split_seed: int | None = None
    device: str = "auto"
    workers: int = 0
    channels_last: bool = True
    hard_layout: str = "model"  # memory format of the sliced hard pass (see HARD_LAYOUTS)
    out: str = "runs/default"
    resume: bool = False
    overwrite: bool = False
    checkpoint_every: int = 200  # steps (plus every epoch)
    deterministic: bool = False
    latency_repeats: int = 30
    # where the report times the exported model (see LATENCY_PROCESSES)
    latency_process: str = "fresh"
    progress: bool = True

    def validate(self) -> RunConfig:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name, value in self.budgets().items():
            if not 0.0 < float(value) <= 1.0:
                raise ConfigError(
                    f"target_{name} must be in (0, 1] (a fraction of the full model's {name}), "
                    f"got {value}"
                )
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            raise ConfigError(f"epochs must be a finite number > 0, got {self.epochs}")
        for name in ("warmup", "freeze", "warmup_epochs", "freeze_epochs"):
            value = getattr(self, name)
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        for name in ("lr", "weight_decay", "mask_lr", "alpha"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        self._validate_balancer()
        if self.checkpoint_every < 0:
            raise ConfigError(f"checkpoint_every must be >= 0 (training steps between "
                              f"checkpoints; 0: at epoch ends only), got {self.checkpoint_every}")
        given = [flag_name(k) for k in FOLDER_OPTIONS if getattr(self, k) is not None]
        if given and self.dataset != "imagefolder":
            raise ConfigError(
                f"{', '.join(given)} only apply to dataset 'imagefolder'; {self.dataset!r} has a "
                "fixed image size, channel count and normalisation: drop them"
            )
        for name in ("momentum", "label_smoothing"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        if self.lr_warmup_steps < 0:
            raise ConfigError(f"lr_warmup_steps must be >= 0, got {self.lr_warmup_steps}")
        for name in ("seed", "split_seed"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 2**32:
                raise ConfigError(f"{name} must be in [0, 2**32), got {value}")
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be a finite number > 0, got {self.temperature}")
        if not self.separate_hard_bn_stats and _METHODS[self.method].hard:
            raise ConfigError(
                f"--no-separate-hard-bn-stats: method {self.method!r} trains the hard network, "
                "whose BatchNorm statistics must be its own (sharing the soft network's breaks "
                "the soft network's backward); drop the flag, or use it with --method dmp"
            )
        if self.eval_batch_size < 1:
            raise ConfigError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.workers < 0:
            raise ConfigError(f"workers must be >= 0, got {self.workers}")
        absolute = self.warmup_epochs is not None or self.freeze_epochs is not None
        if self.epochs is not None or not absolute:  # else checked once the epochs are known
            warmup, freeze = self.phase_fractions()
            if warmup + freeze >= 1.0:
                if self.epochs is None:
                    phases = f"({warmup:g} of the run) and the frozen-width phase ({freeze:g})"
                    run = "the run"
                else:
                    phases = (f"({warmup * self.epochs:g} epochs) and the frozen-width phase "
                              f"({freeze * self.epochs:g} epochs)")  # fmt: skip
                    run = f"epochs={self.epochs:g}"
                raise ConfigError(
                    f"the warm-up {phases} leave no joint search phase within {run}; lower "
                    "--warmup/--freeze (fractions of the run) or --warmup-epochs/--freeze-epochs"
                )
        if self.autocast is not None and self.autocast not in AUTOCAST:
            raise ConfigError(
                f"autocast must be one of {', '.join(AUTOCAST)}, got {self.autocast!r}"
            )
        if self.latency_predictor not in LATENCY_PREDICTORS:
            raise ConfigError(f"latency_predictor must be one of {', '.join(LATENCY_PREDICTORS)}"
                              f", got {self.latency_predictor!r}")  # fmt: skip
        if self.latency_feedback < 0:
            raise ConfigError(f"latency_feedback must be >= 0, got {self.latency_feedback}")
        if self.latency_batch < 1:
            raise ConfigError(f"latency_batch must be >= 1, got {self.latency_batch}")
        if self.init is not None and self.pretrained:
            raise ConfigError("--init and --pretrained both give starting weights; choose one")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.train_subset is not None and self.train_subset < 1:
            raise ConfigError(f"train_subset must be >= 1 (or unset), got {self.train_subset}")
        if self.val_size is not None and not self.val_size >= 0:
            raise ConfigError(
                f"val_size must be >= 0 (a count, or a fraction < 1), got {self.val_size}"
            )
        for name in ("width_step", "round_to"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 (or unset), got {value}")
        if self.hard_layout not in HARD_LAYOUTS:
            raise ConfigError(
                f"hard_layout must be one of {', '.join(HARD_LAYOUTS)}, got {self.hard_layout!r}"
            )
        if self.importance not in IMPORTANCE_CHOICES:
            raise ConfigError(f"importance must be one of {', '.join(IMPORTANCE_CHOICES)}, "
                              f"got {self.importance!r}")  # fmt: skip
        if not 0.0 <= self.descent <= 1.0:
            raise ConfigError(f"descent is a fraction of the joint search in [0, 1], got "
                              f"{self.descent}")  # fmt: skip
        if self.descent and self.search_start == "uniform":
            raise ConfigError("descent lowers the search's aim from the full model, but "
                              "search_start 'uniform' starts it at the budget: use one of them")
        if self.search_start not in SEARCH_STARTS:
            raise ConfigError(f"search_start must be one of {', '.join(SEARCH_STARTS)}, "
                              f"got {self.search_start!r}")  # fmt: skip
        if self.freeze_teacher not in FREEZE_TEACHER_CHOICES:
            raise ConfigError(
                f"freeze_teacher must be one of {', '.join(FREEZE_TEACHER_CHOICES)}, "
                f"got {self.freeze_teacher!r}"
            )
        if self.freeze_teacher == "start" and self.init is None and not self.pretrained:
            raise ConfigError(
                "freeze_teacher 'start' distils from the starting weights, but this run starts "
                "from random ones; give --init CHECKPOINT (or --pretrained), or choose soft/none"
            )
        if self.mask_lr_schedule not in MASK_LR_SCHEDULES:
            raise ConfigError(
                f"mask_lr_schedule must be one of {', '.join(MASK_LR_SCHEDULES)}, "
                f"got {self.mask_lr_schedule!r}"
            )
        if self.balance not in BALANCE_SCOPES:
            raise ConfigError(
                f"balance must be one of {', '.join(BALANCE_SCOPES)}, got {self.balance!r}"
            )
        if self.latency_process not in LATENCY_PROCESSES:
            raise ConfigError(f"latency_process must be one of {', '.join(LATENCY_PROCESSES)}, "
                              f"got {self.latency_process!r}")
        if self.resource_on not in ("hard", "soft"):
            raise ConfigError(f"resource_on must be 'hard' or 'soft', got {self.resource_on!r}")
        if self.optimizer not in ("sgd", "adamw"):
            raise ConfigError(f"optimizer must be 'sgd' or 'adamw', got {self.optimizer!r}")
        if self.mask_optimizer not in ("adam", "sgd"):
            raise ConfigError(
                f"mask_optimizer must be 'adam' or 'sgd', got {self.mask_optimizer!r}"
            )
        return self

    def _validate_balancer(self) -> None:
        """The balancer's gains are norm ratios and gamma's bounds and step a multiplicative
        schedule (core/balance.py): values that would reverse or break the rule are refused."""
        for name in ("beta", "gamma_init", "gamma_min", "budget_tolerance"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value}")
        if not self.gamma_max >= self.gamma_min:
            raise ConfigError(f"gamma_max ({self.gamma_max}) must be >= gamma_min "
                              f"({self.gamma_min}): gamma is kept between the two")  # fmt: skip
        if not (self.gamma_growth >= 1 and math.isfinite(self.gamma_growth)):
            raise ConfigError(
                f"gamma_growth must be a finite factor >= 1 (gamma is multiplied by it while "
                f"the budget is missed and divided by it once met; 1 keeps gamma fixed), got "
                f"{self.gamma_growth}"
            )

    def budgets(self) -> dict[str, float]:
        """The budgets of the run by resource; FLOPs at 0.35 when none is given."""
        given = {
            "flops": self.target_flops,
            "params": self.target_params,
            "latency": self.target_latency,
        }
        given = {k: float(v) for k, v in given.items() if v is not None}
        return given or {"flops": DEFAULT_TARGET_FLOPS}

    def resolve_epochs(self, steps_per_epoch: int) -> float:
        """The run's epochs: as given, else the default for a data set of
        ``steps_per_epoch`` steps (set on the config, so that it is saved with the run)."""
        if self.epochs is None:
            # phases given in epochs take at most half the default run (the search the rest)
            phases = (self.warmup_epochs or 0.0) + (self.freeze_epochs or 0.0)
            self.epochs = max(DEFAULT_EPOCHS, float(math.ceil(DEFAULT_MIN_STEPS / steps_per_epoch)),
                              2.0 * phases)  # fmt: skip
            self.validate()
        return self.epochs

    def resolve_paths(self) -> RunConfig:
        """Make the settings that name files absolute (:func:`absolute_path`), in place."""
        for key in PATH_SETTINGS:
            setattr(self, key, absolute_path(key, getattr(self, key)))
        return self

    def phase_fractions(self) -> tuple[float, float]:
        """(warm-up, frozen widths) as fractions of the run: absolute epochs win when set."""
        warmup = self.warmup if self.warmup_epochs is None else self.warmup_epochs / self.epochs
        if self.freeze_epochs is not None:
            freeze = self.freeze_epochs / self.epochs
        elif self.freeze is not None:
            freeze = self.freeze
        else:  # the default never leaves a long warm-up without a search
            freeze = default_freeze(warmup)
        return float(warmup), float(freeze)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml_dict(self) -> dict:
        """The settings config.yaml records: all but :data:`RUN_CONTROL`, so that the file
        given to --config again starts a run as a fresh command line would."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_CONTROL}

    @classmethod
    def from_dict(cls, values: dict) -> RunConfig:
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(values) - set(known))  # YAML keys may be non-str
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {', '.join(unknown)}; known keys: {', '.join(known)}"
            )
        hints = typing.get_type_hints(cls)
        return cls(**{k: _coerce(k, v, hints[k]) for k, v in values.items()})

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            values = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
        if values is None:  # empty, or comments only: most likely a file not written yet
            raise ConfigError(f"config file {str(path)!r} holds no settings; write them into it, "
                              "or leave out --config to run on the defaults")  # fmt: skip
        if not isinstance(values, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
        for key in COMMAND_LINE_ONLY:  # (older runs wrote them into config.yaml)
            if key in values and _coerce(key, values.pop(key), bool) and not overrides.get(key):
                warnings.warn(f"config file {str(path)!r} sets {key}: true, which only the "
                              f"command line may ask for; ignored: pass {flag_name(key)} to "
                              f"{key} the run", stacklevel=2)  # fmt: skip
        overrides = {k: v for k, v in overrides.items() if v is not None}
        for share, epochs in PHASES.items():
            for given, other in ((share, epochs), (epochs, share)):
                if given in overrides:  # the command line's way of giving the phase wins
                    values.pop(other, None)
        values.update(overrides)
        return cls.from_dict(values)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(key, deep=deep) for key, _ in node.value
                if key.tag != "tag:yaml.org,2002:merge"]  # (<<: a merged mapping)
        repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
        if repeated:
            raise yaml.constructor.ConstructorError(
                None, None, f"key(s) {', '.join(repeated)} given more than once", node.start_mark)
        return super().construct_mapping(node, deep=deep)


# a phase of the run, given as a share of it or in epochs (epochs win when both are set)
PHASES = {"warmup": "warmup_epochs", "freeze": "freeze_epochs"}
# settings that name files: config.yaml records them absolute, so eval, export and --resume
# rebuild the run from any folder
PATH_SETTINGS = ("model", "init", "data_root")


def absolute_path(key: str, value):
    """A path setting made absolute (``model``: the file of ``file.py:factory``); other
    values, and paths that do not exist from here, as they are."""
    if not isinstance(value, str) or not value:
        return value
    if key == "model":
        target, colon, attr = value.rpartition(":")
        is_file = target.endswith(".py") or "/" in target or "\\" in target
        if colon and is_file and Path(target).expanduser().is_file():
            return f"{os.path.abspath(os.path.expanduser(target))}:{attr}"
        return value
    path = os.path.expanduser(value)  # abspath, not resolve: a symlink stays the link
    return os.path.abspath(path) if os.path.exists(path) else value


def flag_name(key: str) -> str:
    """The command-line flag of a RunConfig field."""
    return "--" + key.replace("_", "-")


def _looks_like_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _coerce(key: str, value, hint):
    """Check and convert a YAML/CLI value to the field's type (ints for floats are fine)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r}: {value!r} is not a valid {hint}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r}: expected true/false, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(f"config key {key!r}: {value!r} is too large") from None
        hint_1e = ""
        if isinstance(value, str) and _looks_like_number(value):
            hint_1e = " (YAML reads numbers like 1e-3 as text; write 1.0e-3)"
        raise ConfigError(f"config key {key!r}: expected a number, got {value!r}{hint_1e}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key {key!r}: expected an integer, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
    if origin is list or hint is list:
        if isinstance(value, list | tuple):
            if not args:
                return list(value)
            try:
                return [_coerce(key, item, args[0]) for item in value]
            except ConfigError:
                raise ConfigError(
                    f"config key {key!r}: expected a list of {args[0].__name__}, got {value!r}"
                ) from None
        raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
    if origin is dict or hint is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return dict(value)
        raise ConfigError(f"config key {key!r}: expected a mapping with text keys, got {value!r}")
    return value
