"""Own-step pricing of the compute budget (``compute_pricing: own-steps``): a baseline's
compute budget counts full-model epochs of wall time, and each of its steps is priced at its
own network's cost, timed against the full model's, as S2HPruner's last phase on its pruned
network is priced by the side-by-side timing. Rounds 6-34 charged every baseline step as a
full-model step, which gave the baselines less wall time than S2HPruner."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a package beside src/, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import baselines, compare  # noqa: E402

TINY = dict(dataset="digits", model_kwargs={"width": 4}, batch_size=32, val_size=100,
            train_subset=320, progress=False, init=None)  # fmt: skip
ONCE = baselines.BaselineOptions(pretrain_fraction=0.0, flops_tolerance=0.03)


def _config(tmp_path: Path, method: str, name: str, tuned: bool = False):
    """A benchmark run's config; ``tuned``: as the profiles run, the pruned network's layout
    timed (tunes_pruned_layout), else the run's own layout (reproducible bit for bit)."""
    profile = dataclasses.replace(compare.FROM_TRAINED_DESCENT, **TINY)
    cfg = compare.run_config(profile, compare.RunSpec(method, 0.35, 0, "compute"), 2.0,
                             tmp_path / name)  # fmt: skip
    assert baselines.tunes_pruned_layout(cfg), "the profiles time the pruned layout"
    return cfg if tuned else dataclasses.replace(cfg, hard_layout="model")


def _run(tmp_path: Path, method: str, options: baselines.BaselineOptions, name: str) -> dict:
    return baselines.run_baseline(method, _config(tmp_path, method, name), options)


@pytest.mark.parametrize("method", ["l1-ft", "random"])
def test_pricing_changes_the_steps_and_nothing_else(tmp_path, monkeypatch, method):
    """Priced at one full step per step, a run trains exactly as the unpriced run (the timing
    trains copies, with torch's RNG forked); priced at half, it trains twice the steps."""
    plain = _run(tmp_path, method, ONCE, "plain")
    priced = dataclasses.replace(ONCE, own_step_pricing=True, pricing_turns=1)
    monkeypatch.setattr(baselines, "mean_step_cost", lambda method, options, cost: 1.0)
    same = _run(tmp_path, method, priced, "same")
    assert same["top1_hard"] == plain["top1_hard"] and same["val_top1"] == plain["val_top1"]
    assert same["stages"][-1]["steps"] == plain["stages"][-1]["steps"] == 20
    pricing = same["own_step_pricing"]
    assert pricing["full_model_epochs"] == 2.0 and pricing["full_model_steps"] == 20
    assert len(pricing["pair_ratios"]) == 1 and pricing["ratio"] > 0
    monkeypatch.setattr(baselines, "mean_step_cost", lambda method, options, cost: 0.5)
    twice = _run(tmp_path, method, priced, "twice")
    assert twice["stages"][-1]["steps"] == 40 and twice["epochs"] == 4.0
    assert abs(twice["flops_ratio"] - plain["flops_ratio"]) < 1e-9, "the same network"


def test_the_proxy_is_the_network_l1_prunes_at_once(tmp_path):
    """From the starting weights, L1 at once prunes the network the proxy was timed on."""
    plain = _run(tmp_path, "l1-ft", ONCE, "plain")
    cfg = _config(tmp_path, "l1-ft", "proxy")
    model, data, full = _start(cfg)
    proxy, layout = baselines.pruned_proxy("l1-ft", model, data.example, 0.35, cfg, ONCE, full)
    assert layout == baselines.torch.channels_last  # the run's own: cfg.channels_last
    widths = {n: m.out_channels for n, m in proxy.named_modules()
              if isinstance(m, baselines.nn.Conv2d)}  # fmt: skip
    assert widths == plain["conv_out_channels"]


def _start(cfg):
    device = baselines.pick_device(cfg.device)
    baselines.seed_everything(cfg.seed)
    data = baselines.load_data(cfg, device)
    model = baselines.build_model(cfg, data)
    return model, data, baselines.count_flops(model, data.example)


def test_iterative_l1s_proxy_follows_its_schedule_of_prunes(tmp_path, monkeypatch):
    """Pruned once, aligned widths can stop far above a low target (round 36: 0.344 for
    0.15), so the proxy of iterative L1 prunes as the run does: to each aim in turn."""
    iterative = dataclasses.replace(ONCE, l1_steps=4, l1_descent=0.5)
    assert baselines.pruning_aims("l1-ft", iterative, 0.2) == pytest.approx([0.8, 0.6, 0.4, 0.2])
    assert baselines.pruning_aims("l1-ft", ONCE, 0.2) == [0.2]
    assert baselines.pruning_aims("group-sl", iterative, 0.2) == [0.2]
    cfg = _config(tmp_path, "l1-ft", "proxy")
    model, data, full = _start(cfg)
    aims = []
    real = baselines.prune_to_flops
    monkeypatch.setattr(baselines, "prune_to_flops",
                        lambda net, ex, f, aim, *a, **k: aims.append(aim) or real(
                            net, ex, f, aim, *a, **k))  # fmt: skip
    proxy, _ = baselines.pruned_proxy("l1-ft", model, data.example, 0.35, cfg, iterative, full)
    assert aims == pytest.approx(baselines.pruning_aims("l1-ft", iterative, 0.35))
    assert abs(baselines.count_flops(proxy, data.example) / full - 0.35) <= 0.03


@pytest.mark.parametrize("faster", ["contiguous_format", "channels_last"])
def test_a_pruned_network_trains_and_is_priced_in_the_layout_timed_faster(
        tmp_path, monkeypatch, faster):  # fmt: skip
    """S2HPruner's pruned last phase trains in the faster of NCHW and channels_last, timed
    (the benchmark's hard_layout "auto"): a baseline's pruned network gets the same choice,
    in training and in its price, or it pays for a layout S2HPruner is spared (an unaligned
    pruned resnet20 trains at 1.25 full-model steps in channels_last, 0.89 in NCHW). L1 at
    once from the starting weights trains its proxy itself: one timing decides both."""
    layout = getattr(baselines.torch, faster)
    timed = []
    monkeypatch.setattr(baselines, "tune_module_layout",
                        lambda module, x, forward=None: timed.append(x.shape) or layout)
    priced = dataclasses.replace(ONCE, own_step_pricing=True, pricing_turns=1)
    cfg = _config(tmp_path, "l1-ft", "tuned", tuned=True)
    record = baselines.run_baseline("l1-ft", cfg, priced)
    assert [s["layout"] for s in record["stages"]] == [str(layout)]
    assert record["own_step_pricing"]["proxy_layout"] == str(layout)
    assert len(timed) == 1 and timed[0][0] == cfg.batch_size  # the proxy's timing, once
    iterative = dataclasses.replace(priced, l1_steps=2, l1_descent=0.5)
    record = baselines.run_baseline("l1-ft", cfg, iterative)
    assert len(timed) == 1 + 3, "the proxy, then each of the run's two prunes"
    assert {s["layout"] for s in record["stages"][1:]} == {str(layout)}
    fixed = baselines.run_baseline("l1-ft", dataclasses.replace(cfg, hard_layout="model"),
                                   priced)  # fmt: skip
    assert len(timed) == 4, "no timing when the run's layout is fixed"
    assert fixed["stages"][0]["layout"] == str(baselines.torch.channels_last)
    given = baselines.run_baseline("l1-ft", dataclasses.replace(cfg, hard_layout="contiguous"),
                                   priced)  # fmt: skip
    assert given["stages"][0]["layout"] == str(baselines.torch.contiguous_format)


def test_a_pruned_networks_narrow_shortcuts_take_the_nchw_detour(tmp_path, monkeypatch):
    """Strided 1x1 convs narrower than 16 inputs run in NCHW in every forward of a pruned
    network, in its layout timing and its training alike, as S2HPruner's pruned network
    (oneDNN issue 6035: see s2hpruner.core.sliced). resnet20 at full width has none: its
    shortcuts are narrow only once pruned."""
    from s2hpruner.core import sliced

    calls = []
    real = sliced._nchw_input
    monkeypatch.setattr(sliced, "_nchw_input", lambda m, i: calls.append(m) or real(m, i))
    cfg = dataclasses.replace(_config(tmp_path, "l1-ft", "narrow", tuned=True), model_kwargs={})
    model, data, full = _start(cfg)
    assert not sliced.narrow_pointwise(dict(model.named_modules()))

    def tune(module, x, forward):
        forward(x.contiguous(memory_format=baselines.torch.channels_last))
        return baselines.torch.channels_last

    monkeypatch.setattr(baselines, "tune_module_layout", tune)
    proxy, _ = baselines.pruned_proxy("l1-ft", model, data.example, 0.15, cfg, ONCE, full)
    narrow = sliced.narrow_pointwise(dict(proxy.named_modules()))
    assert narrow and len(calls) == len(narrow), "the timed forward took the detour"
    calls.clear()
    baselines.train(proxy, data, cfg, 0, 2, layout=baselines.torch.channels_last)
    assert len(calls) == 2 * len(narrow), "and so did each training step"


def test_mean_step_cost_prices_each_stage_by_its_network():
    o = baselines.BaselineOptions
    assert baselines.mean_step_cost("l1", o(), 0.4) == 1.0
    assert baselines.mean_step_cost("random", o(), 0.4) == 0.4
    assert baselines.mean_step_cost("l1-ft", o(pretrain_fraction=0.0), 0.4) == 0.4
    assert baselines.mean_step_cost("l1-ft", o(pretrain_fraction=0.5), 0.4) == pytest.approx(0.7)
    assert baselines.mean_step_cost("group-sl", o(sparse_fraction=0.25), 0.4) == pytest.approx(
        0.25 + 0.75 * 0.4)
    # iterative, 5 pieces over a half: pieces cost 1, 0.88, 0.76, 0.64, 0.52 (mean 0.76)
    iterative = o(pretrain_fraction=0.0, l1_steps=5, l1_descent=0.5)
    assert baselines.mean_step_cost("l1-ft", iterative, 0.4) == pytest.approx(
        0.5 * 0.76 + 0.5 * 0.4)


def test_own_steps_profiles_change_only_the_pricing():
    for name, profile in compare.OWN_STEPS.items():
        base = next(b for b in compare.OWN_STEPS_BASES if f"{b.name}-own-steps" == name)
        assert profile.compute_pricing == "own-steps" and base.compute_pricing == "full-model"
        assert dataclasses.replace(profile, name=base.name, compute_pricing="full-model") == base
        assert compare.PROFILES[name] is profile


def test_reuse_keeps_s2hpruner_and_the_ratios_and_reruns_the_baselines_compute_runs(
        tmp_path, monkeypatch):  # fmt: skip
    monkeypatch.setattr(compare, "checkpoint_record", lambda profile: {})
    base = dataclasses.replace(compare.FROM_TRAINED_ITERATIVE_015, init=None)
    settings = compare.settings(base)
    run = {"target_flops": 0.15, "seed": 0}
    stored = {
        "settings": settings,
        "runs": [{**run, "method": "s2h", "budget": "epochs"},
                 {**run, "method": "l1-ft", "budget": "epochs"},
                 {**run, "method": "l1-ft", "budget": "compute"}],
        "tuning": [{**run, "budget": "epochs", "method": "l1-ft", "candidate": "x",
                    "hyper": settings["search"]["l1-ft"][0]}],
        "compute_ratios": {"t0.15-s0": {"ratio": 0.87}},
    }  # fmt: skip
    source = tmp_path / "base.json"
    source.write_text(json.dumps(stored))
    priced = dataclasses.replace(compare.OWN_STEPS[f"{base.name}-own-steps"], init=None)
    results = compare.open_results(tmp_path / "new.json", priced, "cmd", False, False,
                                   reuse=source)  # fmt: skip
    assert sorted((r["method"], r["budget"]) for r in results["runs"]) == [
        ("l1-ft", "epochs"), ("s2h", "epochs")]
    assert results["compute_ratios"] == {"t0.15-s0": {"ratio": 0.87}}
    assert len(results["tuning"]) == 1
    with pytest.raises(ValueError, match="compute_pricing"):
        dataclasses.replace(priced, compute_pricing="flops")


def test_reuse_drops_the_choice_of_a_method_whose_search_changed(tmp_path, monkeypatch):
    """Its finished candidates still offered are kept, but it chooses again among the new
    ones: a stored choice would be taken up by the other seeds before the search re-ran."""
    monkeypatch.setattr(compare, "checkpoint_record", lambda profile: {})
    base = dataclasses.replace(compare.FROM_TRAINED_ITERATIVE_015, init=None)
    settings = compare.settings(base)
    entry = {"target_flops": 0.15, "seed": 0, "budget": "epochs", "candidate": "x",
             "chosen": True}  # fmt: skip
    stored = {"settings": settings, "runs": [], "tuning": [
        {**entry, "method": m, "hyper": settings["search"][m][0]} for m in ("s2h", "l1-ft")]}
    source = tmp_path / "base.json"
    source.write_text(json.dumps(stored))
    wider = dataclasses.replace(base, search={**base.search, "l1-ft": (
        *base.search["l1-ft"], {"lr": 0.5})})  # fmt: skip
    results = compare.open_results(tmp_path / "new.json", wider, "cmd", False, False,
                                   reuse=source)  # fmt: skip
    assert {t["method"]: t["chosen"] for t in results["tuning"]} == {"s2h": True,
                                                                      "l1-ft": False}



def test_aligned_l1_keeps_widths_in_multiples_of_its_step(tmp_path):
    """``l1_round_to``: torch-pruning's round_to, as S2HPruner's round_to keeps widths."""
    options = dataclasses.replace(ONCE, l1_round_to=2, l1_global=False)
    record = _run(tmp_path, "l1-ft", options, "aligned")
    widths = record["conv_out_channels"]
    assert all(w % 2 == 0 for w in widths.values()), widths
    assert abs(record["flops_ratio"] - 0.35) < 0.1


def test_the_aligned_l1_profile_changes_only_l1s_search():
    profile = compare.FROM_TRAINED_OWN_STEPS_ALIGNED_L1
    base = compare.OWN_STEPS["from-trained-group-aligned-short-own-steps"]
    assert dataclasses.replace(profile, name=base.name, search=base.search) == base
    assert {c["l1_round_to"] for c in profile.search["l1-ft"]} == {8}
    assert {(c["lr"], c["l1_global"]) for c in profile.search["l1-ft"]} == {
        (c["lr"], c["l1_global"]) for c in compare.FROM_TRAINED.search["l1-ft"]}


@pytest.mark.parametrize("name", sorted(compare.ALIGNED_L1))
def test_the_aligned_l1_profiles_align_every_l1_candidate_and_change_nothing_else(name):
    profile = compare.PROFILES[name]
    base = compare.OWN_STEPS[name.removesuffix("-aligned-l1")]
    assert [{**c, "l1_round_to": 8} for c in base.search["l1-ft"]] == \
        list(profile.search["l1-ft"])  # fmt: skip
    assert dataclasses.replace(profile, name=base.name, search=base.search) == base


def test_a_new_benchmark_sets_earlier_runs_aside_and_never_deletes_them(tmp_path):
    """Two --overwrite in a row: the first one's set-aside folder (the only copy of the
    earlier benchmark's checkpoints once its JSON was replaced) used to be deleted."""
    profile = dataclasses.replace(compare.PROFILES["quick"], init=None)
    runs = tmp_path / "runs" / profile.name
    for n in ("first", "second"):
        (runs / "s2h").mkdir(parents=True)
        (runs / "s2h" / "mark").write_text(n)
        compare.open_results(tmp_path / "quick.json", profile, "cmd", False, True)
        assert not runs.exists()
    aside = sorted(runs.parent.glob(f"{profile.name}.replaced-*"))
    assert [(a / "s2h" / "mark").read_text() for a in aside] == ["first", "second"]


def test_a_rerun_reuses_the_price_its_first_attempt_measured(tmp_path, monkeypatch):
    """A timing is never the same twice: a run redone after a crash would train another
    number of steps. It reuses the price stored in its folder, if made for the same options."""
    priced = dataclasses.replace(ONCE, own_step_pricing=True, pricing_turns=1)
    cfg = _config(tmp_path, "l1-ft", "cfg")
    first = baselines.run_baseline("l1-ft", cfg, priced, tmp_path / "run")
    timed = []
    monkeypatch.setattr(baselines, "own_step_cost",
                        lambda *args, **kwargs: timed.append(1) or {"ratio": 0.5})  # fmt: skip
    again = baselines.run_baseline("l1-ft", cfg, priced, tmp_path / "run")
    assert not timed
    assert again["own_step_pricing"]["ratio"] == first["own_step_pricing"]["ratio"]
    assert (again["epochs"], again["top1_hard"]) == (first["epochs"], first["top1_hard"])
    uniform = dataclasses.replace(priced, l1_global=False)
    baselines.run_baseline("l1-ft", cfg, uniform, tmp_path / "run")
    assert timed == [1]  # another network: priced again
    baselines.run_baseline("l1-ft", cfg, uniform, tmp_path / "run")
    assert timed == [1]  # (and that price stored)
    price_file = tmp_path / "run" / "own_step_price.json"
    stored = json.loads(price_file.read_text())
    assert stored["proxy"] == baselines.PROXY_VERSION and stored["tuned_layout"] is False
    price_file.write_text(json.dumps({**stored, "proxy": baselines.PROXY_VERSION - 1}))
    baselines.run_baseline("l1-ft", cfg, uniform, tmp_path / "run")
    assert timed == [1, 1]  # priced by an older proxy: priced again
    baselines.run_baseline("l1-ft", dataclasses.replace(cfg, hard_layout="auto"), uniform,
                           tmp_path / "run")  # fmt: skip
    assert timed == [1, 1, 1]  # the layout now timed: priced again
