"""Property tests of config parsing: RunConfig.from_dict / from_yaml coerce every value to its
field's type or reject it with a ConfigError naming the key; unknown keys are rejected; and
to_dict -> from_dict (and -> YAML -> from_yaml, as config.yaml is written) is the identity."""

from __future__ import annotations

import dataclasses
import math
import re
import tempfile
import types
import typing
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from s2hpruner.app.cli import build_parser, config_from_args, main
from s2hpruner.app.config import COMMAND_LINE_ONLY, PHASES, RUN_CONTROL, ConfigError, RunConfig

FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}
HINTS = typing.get_type_hints(RunConfig)

text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
numbers = st.floats(allow_nan=False, width=64)  # inf is a valid float value too
scalars = st.none() | st.booleans() | st.integers() | st.floats() | text
anything = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=6,
)  # fmt: skip


def valid_value(hint) -> st.SearchStrategy:
    """Values a YAML file could hold for a field of type ``hint``, all of them acceptable."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return st.one_of(*[st.none() if a is type(None) else valid_value(a) for a in args])
    if hint is bool:
        return st.booleans()
    if hint is float:
        return numbers | st.integers(-(10**6), 10**6)  # ints are fine where floats are asked
    if hint is int:
        return st.integers() | st.integers(-(10**6), 10**6).map(float)  # 3.0 is an int
    if hint is str:
        return text
    if origin is list or hint is list:
        return st.lists(valid_value(args[0]) if args else text, max_size=3)
    if origin is dict or hint is dict:  # NaN inside a dict would make the equality below fail
        return st.dictionaries(text, st.none() | st.booleans() | st.integers() | numbers | text,
                               max_size=3)  # fmt: skip
    raise AssertionError(f"no strategy for {hint}")


valid_configs = st.fixed_dictionaries(
    {}, optional={name: valid_value(HINTS[name]) for name in FIELDS}
)


def conforms(value, hint) -> bool:
    """``value`` has exactly the type ``hint`` asks for (bool is not an int here)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return type(value) is hint
    if hint in (bool, str):
        return isinstance(value, hint)
    if origin is list or hint is list:
        return isinstance(value, list) and all(conforms(v, args[0]) for v in value if args)
    if origin is dict or hint is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    raise AssertionError(hint)


def same(got, given) -> bool:
    """Coercion keeps the value (an int given for a float may round in its last bit)."""
    if isinstance(got, float) and isinstance(given, float) and math.isnan(given):
        return math.isnan(got)
    if isinstance(got, float) and isinstance(given, int):
        return math.isclose(got, given, rel_tol=1e-15)
    return got == given


@given(valid_configs)
@settings(max_examples=150, deadline=None)
def test_valid_values_are_coerced_to_the_field_types_and_round_trip(values):
    cfg = RunConfig.from_dict(values)
    for key, value in values.items():
        got = getattr(cfg, key)
        assert conforms(got, HINTS[key]), (key, got)
        assert got == value, (key, got, value)  # 3 == 3.0: coercion never changes the value
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    assert RunConfig.from_dict(yaml.safe_load(yaml.safe_dump(cfg.to_dict()))) == cfg


@given(valid_configs)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_from_yaml_reads_what_run_writes_as_config_yaml(values):
    cfg = RunConfig.from_dict(values)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(yaml.safe_dump(cfg.to_yaml_dict()))  # as run.prune writes it
        # without the run-control flags: the file starts a run as a fresh command line would
        control = {key: getattr(RunConfig(), key) for key in RUN_CONTROL}
        assert RunConfig.from_yaml(path) == dataclasses.replace(cfg, **control)


@given(st.sampled_from(sorted(FIELDS)), anything)
@settings(max_examples=400, deadline=None)
def test_any_value_is_coerced_or_rejected_naming_the_key(key, value):
    try:
        cfg = RunConfig.from_dict({key: value})
    except ConfigError as exc:
        assert repr(key) in str(exc)
        return
    got = getattr(cfg, key)
    assert conforms(got, HINTS[key]), (key, value, got)
    assert same(got, value), (key, value, got)


@given(
    st.dictionaries(text | st.integers() | st.booleans(), anything, min_size=1, max_size=3).filter(
        lambda d: any(k not in FIELDS for k in d)
    )
)
@settings(max_examples=200, deadline=None)
def test_unknown_keys_are_rejected_by_name(values):
    with pytest.raises(ConfigError, match="unknown config key") as info:
        RunConfig.from_dict(values)
    for key in values:
        if key not in FIELDS:
            assert str(key) in str(info.value)


@given(valid_configs, valid_configs)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_from_yaml_overrides_win_and_none_overrides_are_ignored(file_values, overrides):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "c.yaml"
        path.write_text(yaml.safe_dump(file_values))
        with warnings.catch_warnings():  # (resume or overwrite in the file: ignored, said)
            warnings.simplefilter("ignore")
            cfg = RunConfig.from_yaml(path, **overrides)
    given = {k: v for k, v in overrides.items() if v is not None}
    # a phase given on the command line replaces the file's, in either form (share or epochs)
    replaced = {other for share, epochs in PHASES.items()
                for key, other in ((share, epochs), (epochs, share)) if key in given}  # fmt: skip
    replaced |= set(COMMAND_LINE_ONLY)  # only the command line resumes or overwrites a run
    expected = {**{k: v for k, v in file_values.items() if k not in replaced}, **given}
    assert cfg == RunConfig.from_dict(expected)


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"batch_size": True}, "batch_size"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"batch_size": "64"}, "batch_size"),
        ({"target_flops": False}, "target_flops"),
        ({"target_flops": "0.5"}, "target_flops"),
        ({"epochs": 10**400}, "epochs"),
        ({"augment": 1}, "augment"),
        ({"augment": "yes"}, "augment"),
        ({"model": 20}, "model"),
        ({"data_root": 3}, "data_root"),
        ({"width_step": 1.5}, "width_step"),
        ({"round_to": "8"}, "round_to"),
        ({"ignored_layers": "conv1"}, "ignored_layers"),
        ({"ignored_layers": ["conv1", 2]}, "ignored_layers"),
        ({"model_kwargs": ["width", 4]}, "model_kwargs"),
        ({"model_kwargs": {4: "width"}}, "model_kwargs"),
    ],
)
def test_wrong_types_are_rejected_naming_the_key(values, key):
    with pytest.raises(ConfigError, match=repr(key)):
        RunConfig.from_dict(values)


def test_exponent_without_dot_gets_a_hint(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\n")  # YAML 1.1 (PyYAML) reads this as a string
    with pytest.raises(ConfigError, match="'lr'.*1.0e-3"):
        RunConfig.from_yaml(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"model: [unclosed\n", "is not valid YAML"),
        (b"model: \xff\xfe\n", "is not valid YAML"),
        (b"- a list\n- not a mapping\n", "must hold a mapping"),
        (b"", "holds no settings"),
        (b"# every setting commented out\n", "holds no settings"),
        (b"1: 2\nmodell: resnet20\n", "unknown config key(s) 1, modell"),
        (b"batch_size: many\n", "config key 'batch_size'"),
    ],
)
def test_bad_config_files_exit_2_with_a_message(tmp_path, capsys, content, message):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    out = tmp_path / "out"
    assert main(["prune", "--config", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("s2hpruner: error:") and message in err, err
    assert not out.exists()


NUMERIC = [n for n in FIELDS if HINTS[n] in (int, float, bool)]


@given(
    st.fixed_dictionaries(
        {},
        optional={
            n: st.booleans()
            if HINTS[n] is bool
            else (st.integers(0, 10**6) if HINTS[n] is int else finite)
            for n in NUMERIC
        },
    )
)
@settings(max_examples=100, deadline=None)
def test_command_line_flags_fill_the_same_fields_as_a_config_dict(values):
    argv = ["prune"]
    for name, value in values.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv.append(f"{flag}={value!r}")
    args = build_parser().parse_args(argv)
    try:
        expected = RunConfig.from_dict(values).validate()
    except ConfigError as exc:  # an invalid combination: the flags are refused the same way
        with pytest.raises(ConfigError, match=re.escape(str(exc))):
            config_from_args(args)
    else:
        assert config_from_args(args) == expected


def test_unknown_hard_layout_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="hard_layout must be one of auto, model, contiguous"):
        RunConfig(hard_layout="nhwc").validate()
    RunConfig(hard_layout="contiguous").validate()


def test_unknown_latency_predictor_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="latency_predictor must be one of auto, tables, flops"):
        RunConfig(target_latency=0.5, latency_predictor="params").validate()
    cfg = config_from_args(build_parser().parse_args(
        ["prune", "--target-latency", "0.5", "--latency-predictor", "flops"]))  # fmt: skip
    assert cfg.latency_predictor == "flops"


@pytest.mark.parametrize("key", ["width_step", "round_to"])
def test_channel_steps_below_one_are_rejected(key):
    with pytest.raises(ConfigError, match=key):
        RunConfig(**{key: 0}).validate()
    RunConfig(**{key: 8}).validate()


def test_balance_scope_reaches_the_trainer_and_unknown_scopes_are_refused():
    from s2hpruner import S2HPruner
    from s2hpruner.app.models import create_model
    from s2hpruner.app.run import build_trainer

    with pytest.raises(ConfigError, match="balance must be one of global, per_group"):
        RunConfig(balance="per-layer").validate()
    cfg = RunConfig(balance="per_group", target_flops=0.5)
    cfg.validate()
    model = create_model("resnet20", num_classes=10, in_chans=1, width=4)
    pruner = S2HPruner(model, torch.zeros(1, 1, 16, 16), target_flops=0.5)
    trainer, _ = build_trainer(cfg, model, pruner, total_steps=4)
    assert trainer.balancer.scope == "per_group"
    args = build_parser().parse_args(["prune", "--balance", "per_group"])
    assert config_from_args(args).balance == "per_group"


def test_descent_reaches_the_trainer_and_contradictions_are_refused():
    from s2hpruner import S2HPruner
    from s2hpruner.app.models import create_model
    from s2hpruner.app.run import build_trainer

    with pytest.raises(ConfigError, match="descent is a fraction"):
        RunConfig(descent=1.5).validate()
    with pytest.raises(ConfigError, match="search_start 'uniform' starts it at the budget"):
        RunConfig(descent=0.5, search_start="uniform").validate()
    cfg = config_from_args(build_parser().parse_args(["prune", "--descent", "0.5",
                                                      "--target-flops", "0.5"]))  # fmt: skip
    assert cfg.descent == 0.5
    model = create_model("resnet20", num_classes=10, in_chans=1, width=4)
    pruner = S2HPruner(model, torch.zeros(1, 1, 16, 16), target_flops=0.5)
    trainer, _ = build_trainer(cfg, model, pruner, total_steps=10)
    assert trainer.descent == 0.5 and trainer.aim(0) == {"flops": 1.0}
    assert trainer.aim(5) == {"flops": 0.5}


def test_cosine_mask_lr_follows_the_weights_schedule():
    from s2hpruner import S2HPruner
    from s2hpruner.app.models import create_model
    from s2hpruner.app.optim import set_mask_lr
    from s2hpruner.app.run import build_trainer

    with pytest.raises(ConfigError, match="mask_lr_schedule must be one of constant, cosine"):
        RunConfig(mask_lr_schedule="step").validate()
    model = create_model("resnet20", num_classes=10, in_chans=1, width=4)
    pruner = S2HPruner(model, torch.zeros(1, 1, 16, 16), target_flops=0.5)
    lrs = {}
    for kind in ("constant", "cosine"):
        cfg = RunConfig(mask_lr=0.2, mask_lr_schedule=kind, lr_warmup_steps=2)
        trainer, schedule = build_trainer(cfg, model, pruner, total_steps=10)
        lrs[kind] = [trainer.mask_optimizer.param_groups[0]["lr"]]
        for _ in range(10):
            trainer.optimizer.step()
            schedule.step()
            set_mask_lr(trainer.mask_optimizer, cfg, schedule)
            lrs[kind].append(trainer.mask_optimizer.param_groups[0]["lr"])
    assert lrs["constant"] == [0.2] * 11
    # warm-up 0.1, 0.2; then cosine from 0.2 down to 0 over the other 8 steps
    expected = [0.1, 0.2] + [0.1 * (1 + math.cos(math.pi * t / 8)) for t in range(9)]
    assert lrs["cosine"] == pytest.approx(expected, abs=1e-12)


def test_the_starting_weights_can_teach_the_last_phase(tmp_path):
    """--freeze-teacher start: a fixed copy of the --init weights, rebuilt from their file
    (so a resumed run gets the same teacher); without starting weights it is refused."""
    from s2hpruner import S2HPruner
    from s2hpruner.app.data import dataset_spec
    from s2hpruner.app.models import create_model
    from s2hpruner.app.run import build_trainer

    with pytest.raises(ConfigError, match="starts from random ones; give --init"):
        RunConfig(freeze_teacher="start").validate()
    with pytest.raises(ConfigError, match="soft, none, start"):
        RunConfig(freeze_teacher="init").validate()
    torch.manual_seed(0)
    trained = create_model("resnet20", num_classes=10, in_chans=1, width=4)
    torch.save(trained.state_dict(), tmp_path / "trained.pt")
    with pytest.raises(SystemExit):  # argparse names the choices
        build_parser().parse_args(["prune", "--freeze-teacher", "init"])
    args = build_parser().parse_args(["prune", "--freeze-teacher", "start", "--init",
                                      str(tmp_path / "trained.pt"), "--dataset", "digits"])
    cfg = config_from_args(args)
    cfg.model_kwargs = {"width": 4}
    cfg.validate()
    assert cfg.freeze_teacher == "start"
    model = create_model("resnet20", num_classes=10, in_chans=1, width=4)
    model.load_state_dict(trained.state_dict())
    pruner = S2HPruner(model, torch.zeros(1, 1, 8, 8), target_flops=0.5)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # training moves the model, not the teacher
    trainer, _ = build_trainer(cfg, model, pruner, total_steps=4, spec=dataset_spec("digits"))
    teacher = trainer.freeze_teacher
    assert isinstance(teacher, torch.nn.Module) and teacher is not model
    for k, v in trained.state_dict().items():
        assert torch.equal(teacher.state_dict()[k], v), k


def test_default_epochs_give_a_small_data_set_enough_steps_and_given_epochs_stay():
    """With no --epochs a run trains 4 epochs, or as many as make 1,000 steps: digits has 10
    steps per epoch at batch 128, and 4 epochs (40 steps) left it at 47% top-1."""
    fmnist, digits = RunConfig(), RunConfig(dataset="digits")
    assert fmnist.validate().epochs is None  # resolved once the data set's size is known
    assert fmnist.resolve_epochs(421) == 4.0  # Fashion-MNIST at batch 128
    assert digits.resolve_epochs(10) == 100.0 and digits.epochs == 100.0  # saved with the run
    assert RunConfig(dataset="digits", epochs=2).resolve_epochs(10) == 2  # the user's word wins
    assert RunConfig(epochs=0.5).resolve_epochs(7) == 0.5


def test_absolute_phases_are_checked_against_the_default_epochs_once_known():
    cfg = RunConfig(freeze_epochs=3.0, warmup_epochs=1.0).validate()  # epochs not known yet
    assert cfg.resolve_epochs(421) == 8.0  # the default 4 yields: the phases take half
    with pytest.raises(ConfigError, match=r"warm-up \(1 epochs\).*\(3 epochs\).*epochs=4"):
        RunConfig(freeze_epochs=3.0, warmup_epochs=1.0, epochs=4.0).validate()  # given: refused
    assert RunConfig(freeze_epochs=3.0, warmup_epochs=1.0).resolve_epochs(10) == 100.0
    with pytest.raises(ConfigError, match=r"warm-up \(0.5 of the run\).*\(0.5\).*the run"):
        RunConfig(warmup=0.5, freeze=0.5).validate()


ROOT = Path(__file__).resolve().parents[1]


def from_command_line(*argv: str) -> RunConfig:
    return config_from_args(build_parser().parse_args(["prune", *argv]))


def test_a_phase_flag_replaces_the_config_files_phase_in_whichever_form():
    """--warmup 0.1 on the command line wins over a file's warmup_epochs (epochs would win
    over a share otherwise), and the shipped configs give their phases as shares, so a short
    --epochs keeps them valid."""
    paper = str(ROOT / "configs/paper/cifar100_resnet50_35.yaml")
    assert from_command_line("--config", paper, "--warmup", "0.1").phase_fractions()[0] == 0.1
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "phases.yaml"
        path.write_text("epochs: 8\nfreeze_epochs: 2\n")
        assert from_command_line("--config", str(path), "--freeze", "0.5").phase_fractions() \
            == (0.0, 0.5)  # fmt: skip
        path.write_text("epochs: 8\nfreeze: 0.5\n")
        assert from_command_line("--config", str(path), "--freeze-epochs", "1").phase_fractions() \
            == (0.0, 0.125)  # fmt: skip
    with pytest.raises(ConfigError, match="both set the phase"):
        from_command_line("--freeze", "0.5", "--freeze-epochs", "1")
    for shipped in sorted((ROOT / "configs").rglob("*.yaml")):
        assert from_command_line("--config", str(shipped), "--epochs", "1").epochs == 1


@pytest.mark.parametrize(("field", "value", "named"), [
    ("lr", -0.1, "lr must be a finite number >= 0"),
    ("weight_decay", -1.0, "weight_decay must be a finite number >= 0"),
    ("mask_lr", float("nan"), "mask_lr must be a finite number >= 0"),
    ("momentum", 1.0, "momentum must be in [0, 1)"),
    ("label_smoothing", 1.5, "label_smoothing must be in [0, 1)"),
    ("seed", -1, "seed must be in [0, 2**32)"),
    ("split_seed", 2**32, "split_seed must be in [0, 2**32)"),
    ("lr_warmup_steps", -5, "lr_warmup_steps must be >= 0"),
])  # fmt: skip
def test_numbers_torch_or_numpy_would_refuse_late_are_refused_at_validation(field, value, named):
    with pytest.raises(ConfigError, match=re.escape(named)):
        RunConfig(**{field: value}).validate()


def test_a_key_given_twice_in_a_config_file_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("lr: 0.1\nepochs: 2\nlr: 0.01\n")
    with pytest.raises(ConfigError, match="lr given more than once"):
        RunConfig.from_yaml(path)


def test_yaml_merge_keys_still_work(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("model_kwargs:\n  <<: {width: 4}\n  depth: 20\n")
    assert RunConfig.from_yaml(path).model_kwargs == {"width": 4, "depth": 20}


def test_digits_with_a_data_root_is_refused_not_ignored(tmp_path):
    from s2hpruner.app.data import DataOptionError, build_datasets

    with pytest.raises(DataOptionError, match="reads no files"):
        build_datasets("digits", str(tmp_path), val_size=None)


def test_default_epochs_leave_room_for_phases_given_in_epochs():
    """--freeze-epochs 4 alone: the default 4 epochs would leave no search, so they yield."""
    cfg = RunConfig(freeze_epochs=4.0).validate()
    assert cfg.resolve_epochs(steps_per_epoch=500) == 8.0
    assert cfg.phase_fractions() == (0.0, 0.5)
    assert RunConfig(freeze_epochs=1.0).resolve_epochs(steps_per_epoch=500) == 4.0  # as before


def test_the_default_freeze_yields_to_a_long_warmup_the_user_gave():
    """--warmup 0.8 alone: the default frozen-width share (0.25) would leave no search, so it
    takes half of what the warm-up leaves; a freeze the user gave is still checked."""
    assert RunConfig().validate().phase_fractions() == (0.0, 0.25)
    assert from_command_line("--warmup", "0.8").validate().phase_fractions() \
        == pytest.approx((0.8, 0.1))  # fmt: skip
    assert RunConfig(warmup=0.4).validate().phase_fractions() == (0.4, 0.25)  # as before
    cfg = RunConfig(epochs=10.0, warmup_epochs=9.0).validate()
    assert cfg.phase_fractions() == pytest.approx((0.9, 0.05))
    with pytest.raises(ConfigError, match="joint search phase"):
        from_command_line("--warmup", "0.8", "--freeze", "0.25").validate()
    with pytest.raises(ConfigError, match="joint search phase"):
        RunConfig(warmup=1.0).validate()
