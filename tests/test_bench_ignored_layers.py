"""A layer kept whole (``RunConfig.ignored_layers``) is offered to every method alike: the
baselines keep its torch-pruning group at full width, as S2HPruner keeps its channel group.
And ``benchmarks.probe``, the single run that tries such a setting first."""

import copy
import dataclasses
import json
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a package beside src/, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import baselines, compare, report  # noqa: E402
from s2hpruner import count_flops  # noqa: E402
from s2hpruner.app.models import create_model  # noqa: E402

# resnet20's stem and the layers that add into the first stage's residual stream: one group
STREAM = ("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2")


def _widths(model: nn.Module) -> dict[str, int]:
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@pytest.mark.parametrize("global_pruning", [True, False], ids=["global", "uniform"])
def test_l1_pruning_keeps_the_ignored_layers_group_whole_and_meets_the_target(global_pruning):
    torch.manual_seed(0)
    example = torch.zeros(1, 1, 28, 28)
    factory = partial(baselines.l1_pruner, global_pruning=global_pruning)
    kept = create_model("resnet20", in_chans=1)
    cut = copy.deepcopy(kept)
    full = count_flops(kept, example)
    baselines.prune_to_flops(kept, example, factory, 0.35, ignored_layers=["conv1"])
    baselines.prune_to_flops(cut, example, factory, 0.35)
    assert all(_widths(kept)[name] == 16 for name in STREAM)
    assert _widths(cut)["conv1"] < 16, "without the list the stream is pruned (the control)"
    assert abs(count_flops(kept, example) / full - 0.35) <= 0.005
    assert _widths(kept)["layer2.0.conv1"] < _widths(cut)["layer2.0.conv1"], \
        "the FLOPs come off elsewhere"  # fmt: skip


def test_random_widths_keep_the_ignored_layers_group_whole():
    torch.manual_seed(0)
    kept, cut = (baselines.random_architecture(
        create_model("resnet20", in_chans=1), torch.zeros(1, 1, 28, 28), 0.35, seed=0,
        logit_std=3.0, ignored_layers=ignored)[0] for ignored in (["conv1"], []))  # fmt: skip
    assert all(_widths(kept)[name] == 16 for name in STREAM)
    assert _widths(cut)["conv1"] < 16, "the control: random widths cut the stream here"


def test_group_sls_regulariser_leaves_the_ignored_layers_group_alone():
    """Group-SL's sparse training must not shrink a group its pruning will keep whole."""
    model, example = create_model("resnet20", in_chans=1), torch.zeros(1, 1, 28, 28)
    for extra, regularised in (([], True), (["conv1"], False)):
        ignored = baselines.ignored_names(model, example, extra)
        pruner = baselines.make_pruner(baselines.group_sl_pruner, model, example, 0.0, ignored)
        groups = list(pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers))
        held = any(dep.target.module is model.conv1 for group in groups for dep, _ in group)
        assert held == regularised, extra


def test_an_unknown_ignored_layer_or_a_container_is_refused():
    """A container would mean its children to torch-pruning and nothing to S2HPruner."""
    model = create_model("resnet20", in_chans=1)
    with pytest.raises(ValueError, match=r"\['stem'\] are not modules"):
        baselines.ignored_names(model, torch.zeros(1, 1, 28, 28), ["stem"])
    with pytest.raises(ValueError, match=r"\['layer1'\] hold other modules"):
        baselines.ignored_names(model, torch.zeros(1, 1, 28, 28), ["layer1"])


def test_a_search_candidate_keeps_layers_whole_for_every_method(tmp_path):
    """The candidate reaches S2HPruner's and the baselines' configs alike, and its name and
    RESULTS.md text say what it keeps."""
    hyper = {"lr": 0.03, "ignored_layers": ["conv1"]}
    profile = compare.FROM_TRAINED_ALL
    for method in ("s2h", "l1-ft", "random", "group-sl"):
        spec = compare.RunSpec(method, 0.55, 0, "epochs")
        assert compare.run_config(profile, spec, 1.0, tmp_path, hyper).ignored_layers == ["conv1"]
        assert compare.run_config(profile, spec, 1.0, tmp_path).ignored_layers == []
    assert compare.candidate_name(hyper) == "lr0.03-keep-conv1"
    assert compare.candidate_name({"ignored_layers": []}) == "keep-none"
    assert report._hyper_text({"ignored_layers": ["conv1"]}) == \
        "the channel group of conv1 kept whole"  # fmt: skip


@pytest.mark.parametrize("method", ["l1-ft", "random", "group-sl"])
def test_a_baseline_run_keeps_the_configs_ignored_layers_whole(tmp_path, method, monkeypatch):
    """End to end: the run's exported model keeps the stream at the full width (4 channels
    in this resnet20 of width 4), at the target FLOPs; every torch-pruning pruner of the run
    (group-sl's sparse regulariser too) is built with the list."""
    built = []
    make_pruner = baselines.make_pruner

    def spy(factory, model, example, ratio, ignored):
        built.append(list(ignored))
        return make_pruner(factory, model, example, ratio, ignored)

    monkeypatch.setattr(baselines, "make_pruner", spy)
    profile = dataclasses.replace(
        compare.FROM_TRAINED_ALL, dataset="digits", model_kwargs={"width": 4}, batch_size=32,
        val_size=100, train_subset=64, progress=False, init=None,
    )  # fmt: skip
    spec = compare.RunSpec(method, 0.55, 0, "epochs")
    options = baselines.BaselineOptions(pretrain_fraction=0.0, flops_tolerance=0.03)
    records = []
    for ignored in (["conv1"], []):
        cfg = compare.run_config(profile, spec, 1.0, tmp_path / str(ignored),
                                 {"ignored_layers": ignored})  # fmt: skip
        records.append(baselines.run_baseline(method, cfg, options))
        if ignored:  # every pruner of this run got the list (random widths build none)
            assert all("conv1" in names for names in built), built
            assert (len(built) > 0) == (method != "random")
    assert all(records[0]["conv_out_channels"][name] == 4 for name in STREAM)
    assert records[1]["conv_out_channels"]["conv1"] < 4, "the control: the stream is cut"
    assert all(abs(r["flops_ratio"] - 0.55) <= 0.03 for r in records)


def test_the_stem_profile_keeps_the_stream_whole_for_s2hpruner_and_l1_alike():
    """`from-trained-resnet56-055-stem` is `from-trained-resnet56-055` with both methods
    keeping conv1's group whole, each at its earlier choice otherwise."""
    stem, base = compare.FROM_TRAINED_RESNET56_055_STEM, compare.FROM_TRAINED_RESNET56_055
    assert dataclasses.replace(
        stem, name=base.name, methods=base.methods, compute_methods=base.compute_methods,
        search=base.search,
    ) == base  # fmt: skip
    for method in ("s2h", "l1-ft"):
        assert all(c["ignored_layers"] == ["conv1"] for c in stem.search[method])
    assert {c["l1_global"] for c in stem.search["l1-ft"]} == {True, False}
    assert {s.method for s in compare.plan_runs(stem)} == {"s2h", "l1-ft"}


def test_a_probe_is_the_profiles_run_with_the_settings_changed(tmp_path, monkeypatch):
    """benchmarks.probe: the candidate's recipe, then --set on top, in one run."""
    from benchmarks import probe

    monkeypatch.setattr("s2hpruner.app.run.latency_speedup", lambda *a, **k: {"b1": 1.0,
                                                                          "b64": 1.0})
    monkeypatch.setattr("s2hpruner.app.run.save_program", lambda *a, **k: None)
    tiny = {"dataset": "digits", "model_kwargs": {"width": 4}, "init": None, "batch_size": 32,
            "val_size": 100, "train_subset": 64, "latency_repeats": 1}  # fmt: skip
    result = probe.main([
        "--profile", "from-trained-width-step-055", "--target", "0.55", "--seed", "1",
        "--hyper", '{"lr": 0.03, "freeze": 0.85, "round_to": 4}',
        "--set", json.dumps({**tiny, "ignored_layers": ["conv1"]}),
        "--out", str(tmp_path / "probe"),
    ])  # fmt: skip
    saved = (tmp_path / "probe" / "config.yaml").read_text()
    for line in ("lr: 0.03", "round_to: 4", "freeze: 0.85", "seed: 1", "- conv1",
                 "dataset: digits"):  # fmt: skip
        assert line in saved, line
    assert "conv1" not in result["kept_widths"], "kept whole: no longer a searched group"
    assert abs(result["flops_ratio"] - 0.55) <= 0.02 and result["val_top1"] is not None
    base = ["--profile", "from-trained-width-step-055", "--target", "0.55"]
    with pytest.raises(SystemExit, match="holds a finished run"):
        probe.main([*base, "--out", str(tmp_path / "probe")])
    with pytest.raises(SystemExit, match=r"put \['temperature'\] in --set"):
        probe.main([*base, "--hyper", '{"temperature": 2}', "--out", str(tmp_path / "other")])
