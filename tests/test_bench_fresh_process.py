"""Timings of a compute budget in a fresh process (``timing_process: fresh``): an S2HPruner
run's report pins glibc's allocator in the benchmark's process, and a pruned network timed
there afterwards trained at 1.03 full-model steps instead of 0.86 (round 41). A timing in a
newly spawned process starts from the state a user's training process starts in, whatever
ran before it."""

import dataclasses
import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a package beside src/, not installed
    sys.path.insert(0, str(ROOT))

from test_bench_own_steps import ONCE, TINY  # noqa: E402  (a tiny run, L1 pruned at once)

from benchmarks import baselines, compare  # noqa: E402
from benchmarks.fresh_process import in_fresh_process  # noqa: E402


def test_a_fresh_process_is_another_process_with_the_same_threads():
    assert in_fresh_process(os.getpid) != os.getpid()
    assert in_fresh_process(torch.get_num_threads) == torch.get_num_threads()
    with pytest.raises(ValueError, match="invalid literal"):
        in_fresh_process(int, "not a number")  # the child's error reaches the caller


def _config(tmp_path: Path, name: str):
    profile = dataclasses.replace(compare.FROM_TRAINED_DESCENT, **TINY)
    cfg = compare.run_config(profile, compare.RunSpec("l1-ft", 0.35, 0, "compute"), 2.0,
                             tmp_path / name)  # fmt: skip
    return dataclasses.replace(cfg, hard_layout="model")  # the run's layout: bit for bit


@pytest.mark.parametrize("method", ["l1-ft", "random"])
def test_a_price_timed_in_a_fresh_process_is_of_the_same_network(tmp_path, monkeypatch,
                                                                 method):  # fmt: skip
    """The child builds the run's proxy from the same seed, so it times the network the run
    trains; the run itself trains as an unpriced one when a step is priced at one."""
    monkeypatch.setattr(baselines, "mean_step_cost", lambda method, options, cost: 1.0)
    here = dataclasses.replace(ONCE, own_step_pricing=True, pricing_turns=1)
    fresh = dataclasses.replace(here, price_in_fresh_process=True)
    plain = baselines.run_baseline(method, _config(tmp_path, "plain"), ONCE)
    same = baselines.run_baseline(method, _config(tmp_path, "same"), here)
    away = baselines.run_baseline(method, _config(tmp_path, "fresh"), fresh)
    assert same["own_step_pricing"]["process_id"] == os.getpid()
    assert away["own_step_pricing"]["process_id"] != os.getpid()
    assert away["own_step_pricing"]["proxy_flops_ratio"] == pytest.approx(
        same["own_step_pricing"]["proxy_flops_ratio"], abs=1e-12)
    assert away["own_step_pricing"]["ratio"] > 0
    assert away["top1_hard"] == plain["top1_hard"] and away["val_top1"] == plain["val_top1"]
    assert away["conv_out_channels"] == plain["conv_out_channels"]


def test_a_fresh_profile_times_s2hpruner_in_a_fresh_process(tmp_path, monkeypatch):
    """The side-by-side timing of S2HPruner's step runs in the child too (a real, tiny one)."""
    profile = dataclasses.replace(compare.FROM_TRAINED_CHEAP_TIMED, **TINY, seeds=(0,),
                                  compute_timing_turns=1, timing_process="fresh")  # fmt: skip
    hyper = profile.search["s2h"][0]
    results = {"runs": [{"method": "s2h", "target_flops": 0.35, "seed": 0, "budget": "epochs",
                         "hyper": hyper}], "compute_ratios": {}}  # fmt: skip
    seen = []
    real = compare.in_fresh_process
    monkeypatch.setattr(compare, "in_fresh_process",
                        lambda fn, *a, **k: seen.append(fn) or real(fn, *a, **k))  # fmt: skip
    spec = compare.RunSpec("l1-ft", 0.35, 0, "compute")
    epochs, extra = compare.budget_epochs(spec, profile, results, tmp_path)
    assert seen == [compare.time_side_by_side]
    ratio = results["compute_ratios"]["t0.35-s0"]
    assert ratio["timing"] == "side by side" and ratio["ratio"] > 0
    assert extra == {"compute_ratio": ratio["ratio"]} and epochs == round(ratio["ratio"], 2)
    options = compare.run_options(profile, {})
    assert not options.price_in_fresh_process  # set per compute run by run_one


def test_reuse_across_timing_processes_retimes_and_reprices(tmp_path, monkeypatch):
    """A profile that changes only where timings run keeps every run but those a timing
    sized: the compute ratios and the baselines' compute runs are made again."""
    monkeypatch.setattr(compare, "checkpoint_record", lambda profile: {})
    base = dataclasses.replace(compare.REPLICATE["from-trained-replicate-015"], init=None)
    settings = compare.settings(base)
    assert settings["timing_process"] == "same"
    run = {"target_flops": 0.15, "seed": 0}
    stored = {
        "settings": {k: v for k, v in settings.items() if k != "timing_process"},  # older
        "runs": [{**run, "method": "s2h", "budget": "epochs"},
                 {**run, "method": "l1-ft", "budget": "epochs"},
                 {**run, "method": "l1-ft", "budget": "compute"}],
        "compute_ratios": {"t0.15-s0": {"ratio": 0.92}},
    }  # fmt: skip
    source = tmp_path / "base.json"
    source.write_text(json.dumps(stored))
    fresh = dataclasses.replace(base, timing_process="fresh")
    results = compare.open_results(tmp_path / "new.json", fresh, "cmd", False, False,
                                   reuse=source)  # fmt: skip
    assert sorted((r["method"], r["budget"]) for r in results["runs"]) == [
        ("l1-ft", "epochs"), ("s2h", "epochs")]
    assert results["compute_ratios"] == {}
    again = compare.open_results(tmp_path / "same.json", base, "cmd", False, False,
                                 reuse=source)  # fmt: skip
    assert len(again["runs"]) == 3 and again["compute_ratios"] == stored["compute_ratios"]
    with pytest.raises(ValueError, match="timing_process"):
        dataclasses.replace(base, timing_process="elsewhere")


def test_the_fresh_profiles_change_only_where_timings_run():
    for base in compare.FRESH_BASES:
        name = f"{base.name.removesuffix('-width-step')}-fresh"
        profile = compare.PROFILES[name]
        assert profile.timing_process == "fresh" and base.timing_process == "same"
        assert dataclasses.replace(profile, name=base.name, timing_process="same") == base
