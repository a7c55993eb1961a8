"""The from-trained benchmark profile end to end on a tiny model and the digits data set: every
method starts from one fabricated checkpoint, the search picks by validation top-1, other seeds
and budgets reuse the choice, and a resumed benchmark runs nothing twice."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a package beside src/, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import compare, report  # noqa: E402
from s2hpruner.app.models import create_model  # noqa: E402

RUN_KEYS = {"method", "target_flops", "seed", "epochs", "budget", "top1_hard", "top1_soft",
            "gap", "flops_ratio", "params_ratio", "wall_seconds", "init_sha256", "val_top1",
            "top1_start_val"}
TINY = {"dataset": "digits", "model_kwargs": {"width": 4}, "batch_size": 32, "val_size": 100,
        "train_subset": 64, "latency_repeats": 1, "dense_timing_steps": 2, "progress": False,
        "options": compare.BaselineOptions(pretrain_fraction=0.0, flops_tolerance=0.02,
                                           max_probes=8)}


def _checkpoint(path: Path) -> Path:
    """A tiny resnet20 (width 4) for digits' 8x8 grey images, random weights: a stand-in for
    benchmarks.pretrain's output (a state dict)."""
    torch.manual_seed(123)
    model = create_model("resnet20", num_classes=10, in_chans=1, image_size=8, width=4)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def _fast(mp: pytest.MonkeyPatch) -> None:
    # s2hpruner's latency timing and torch.export are tested with s2hpruner; here they would
    # only cost time
    mp.setattr("s2hpruner.app.run.latency_speedup", lambda *a, **k: {"b1": 1.0, "b64": 1.0})
    mp.setattr("s2hpruner.app.run.save_program", lambda *a, **k: None)


@pytest.fixture
def no_latency(monkeypatch):
    _fast(monkeypatch)


def _tiny_profile(**changes) -> compare.Profile:
    return dataclasses.replace(compare.FROM_TRAINED, **{**TINY, **changes})


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """targets 0.35, seeds 0 and 1, the epochs, compute and long budgets; s2h and l1-ft search
    two candidates each, the ablation borrows s2h's choice, random has no search (15 runs)."""
    tmp = tmp_path_factory.mktemp("from_trained")
    ckpt = _checkpoint(tmp / "cache" / "tiny.pt")
    out = tmp / "results"
    profile = _tiny_profile(
        methods=("s2h", "s2h-no-gs", "l1-ft", "random"),
        only_at={"s2h-no-gs": (0.35,)},
        search={
            "s2h": compare._grid(lr=(0.02, 0.01)),
            "l1-ft": compare._grid(l1_global=(True, False)),
        },
        compute_methods=("l1-ft",),
        long_methods=("l1-ft",),
        tune_budgets=("epochs", "compute"),  # also a search on the compute budget
    )
    argv = ["--profile", "from-trained", "--out", str(out), "--init", str(ckpt),
            "--targets", "0.35", "--budgets", "epochs,compute,long", "--no-progress"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(compare.PROFILES, "from-trained", profile)
        _fast(mp)
        assert compare.main(argv) == 0
    return argv, out, ckpt, profile


def test_full_profile_plan():
    """The shipped profile: the protocol of issue 15, 54 runs."""
    plan = compare.plan_runs(compare.FROM_TRAINED)
    assert len(plan) == len({s.key for s in plan}) == 54
    by = {(s.method, s.target, s.seed, s.budget) for s in plan}
    for target in (0.15, 0.35, 0.55):
        for method in compare.MAIN_METHODS:
            assert (method, target, 0, "epochs") in by
        for method in ("l1-ft", "group-sl", "random"):
            assert (method, target, 0, "compute") in by
    for method in compare.ABLATIONS:
        assert {t for m, t, _, _ in by if m == method} == {0.35}
    assert {t for _, t, seed, _ in by if seed == 1} == {0.35}
    assert {t for _, t, _, b in by if b.startswith("long")} == {0.35}
    assert {m for m, _, _, b in by if b == "long-compute"} == {"l1-ft", "group-sl", "random"}
    assert not {m for m, _, _, b in by if b in compare.COMPUTE} & set(compare.METHODS)
    s = compare.FROM_TRAINED.search
    assert len(s["dmp"]) == len(s["random"]) == 2
    assert len(s["s2h"]) == len(s["l1-ft"]) == len(s["group-sl"]) == 4
    assert [compare.candidate_name(c) for c in s["s2h"]] == [
        "lr0.02", "lr0.01", "lr0.02-teacher-none", "lr0.01-teacher-none"]
    assert s["s2h"][0] == {"lr": 0.02}, "the shipped recipe first (wins ties)"
    assert compare.FROM_TRAINED.split_seed == 0, "seed 1 validates on the checkpoint's split"


def test_resnet56_profile_transfers_every_methods_resnet20_choice():
    """The resnet56 profile: four methods at 0.35, both budgets, and for each method the one
    candidate that the stored resnet20 search chose on validation (the same rule for all)."""
    profile = compare.FROM_TRAINED_RESNET56
    plan = compare.plan_runs(profile)
    assert {(s.method, s.budget) for s in plan} == {
        *((m, "epochs") for m in ("s2h", "l1-ft", "group-sl", "random")),
        *((m, "compute") for m in ("l1-ft", "group-sl", "random"))}  # fmt: skip
    assert {(s.target, s.seed) for s in plan} == {(0.35, 0)}
    assert profile.model == "resnet56" and profile.init != compare.FROM_TRAINED.init
    assert f"--model resnet56 --epochs 5 --out {profile.init}" in profile.pretrain_command
    root = Path(__file__).resolve().parents[1]
    stored = json.loads((root / "benchmarks/results/from_trained.json").read_text())
    chosen = {t["method"]: t["hyper"] for t in stored["tuning"] if t["chosen"]}
    assert {m: list(c) for m, c in profile.search.items()} \
        == {m: [chosen[m]] for m in profile.search}
    assert {m: chosen[m] for m in compare.RESNET20_CHOICES} == compare.RESNET20_CHOICES


def test_all_profile_searches_every_method_alike_and_runs_ablations_at_035():
    """The whole #15 comparison in one benchmark: every method searched at 0.35, seed 0
    (four candidates for S2HPruner, L1 and Group-SL, two for random), DMP and the ablations on
    S2HPruner's choice, the baselines also on the compute budget, ablations only at 0.35."""
    profile = compare.FROM_TRAINED_ALL
    assert profile.compute_timing_turns > 0 and profile.init == compare.CHECKPOINT
    assert {m: len(c) for m, c in profile.search.items()} == {
        "s2h": 4, "l1-ft": 4, "group-sl": 4, "random": 2}
    assert all(profile.borrow[m] == "s2h" for m in ("dmp", *compare.ABLATIONS))
    plan = compare.plan_runs(profile)
    at = lambda target, seed: {(s.method, s.budget) for s in plan  # noqa: E731
                               if (s.target, s.seed) == (target, seed)}
    everything = {*((m, "epochs") for m in profile.methods),
                  *((m, "compute") for m in compare.SINGLE_NETWORK)}
    assert at(0.35, 0) == at(0.35, 2) == everything
    assert at(0.15, 0) == at(0.55, 0) == {
        b for b in everything if b[0] not in compare.ABLATIONS}
    assert at(0.15, 1) == at(0.55, 1) == set()
    spec = compare.RunSpec("s2h-no-gs", 0.35, 1, "epochs")
    assert compare.choice_source(spec, profile) == compare.RunSpec("s2h", 0.35, 0, "epochs")


def test_cheap_profile_gives_the_search_30_percent_and_the_hard_network_alone_the_rest():
    """The cheaper S2HPruner schedule: same checkpoint, lr and baselines' choices as the
    from-trained search made, widths frozen after 30% of the run and the hard network then
    trained without the soft teacher; only the baselines run on the compute budget."""
    profile = compare.FROM_TRAINED_CHEAP
    plan = compare.plan_runs(profile)
    assert {(s.method, s.budget) for s in plan} == {
        *((m, "epochs") for m in ("s2h", "l1-ft", "random")),
        *((m, "compute") for m in ("l1-ft", "random"))}  # fmt: skip
    assert {(s.target, s.seed) for s in plan} == {(0.35, 0), (0.35, 1), (0.35, 2)}
    assert profile.init == compare.FROM_TRAINED.init
    (s2h,) = profile.search["s2h"]
    cfg = compare.run_config(profile, compare.RunSpec("s2h", 0.35, 0, "epochs"), 1.0,
                             Path("unused"), s2h)  # fmt: skip
    assert (cfg.freeze, cfg.freeze_epochs, cfg.freeze_teacher) == (0.7, None, "none")
    assert cfg.lr == compare.RESNET20_CHOICES["s2h"]["lr"]
    for method in ("l1-ft", "random"):
        assert profile.search[method] == (compare.RESNET20_CHOICES[method],)


def test_searched_target_runs_first_and_lends_its_choice():
    """With tune_targets, each seed's plan starts with the searched target; the other targets
    search nothing and reuse the nearest searched target's choice, on the epochs budget."""
    profile = compare.FROM_TRAINED
    plan = compare.plan_runs(profile)
    assert plan[0].target == 0.35 and plan[0].seed == 0
    first_other = next(i for i, s in enumerate(plan) if s.target != 0.35)
    assert all(s.target == 0.35 for s in plan[:first_other])
    for spec in plan:
        searched = compare.search_candidates(spec, profile)
        assert bool(searched) == (spec.target == 0.35 and spec.seed == 0
                                  and spec.budget == "epochs" and spec.method in profile.search)
        source = compare.choice_source(spec, profile)
        if source is not None:
            assert (source.target, source.seed, source.budget) == (0.35, 0, "epochs")
    wide = dataclasses.replace(profile, tune_targets=(0.15, 0.55))
    spec = compare.RunSpec("l1-ft", 0.35, 1, "compute")
    assert compare.choice_source(spec, wide).target in (0.15, 0.55)
    assert compare.choice_source(compare.RunSpec("l1-ft", 0.5, 1, "epochs"), wide).target == 0.55
    assert compare.FROM_TRAINED.init == compare.CHECKPOINT


def test_missing_checkpoint_names_the_pretrain_command(tmp_path):
    args = compare.parse_args(["--profile", "from-trained", "--init", str(tmp_path / "no.pt")])
    with pytest.raises(SystemExit, match="benchmarks.pretrain --model resnet20 --epochs 5"):
        compare.resolve_profile(args)


def test_pick_uses_validation_only():
    entries = [
        {"candidate": "a", "val_top1": 80.0, "record": {"top1_hard": 99.0}},
        {"candidate": "b", "val_top1": 81.0, "record": {"top1_hard": 10.0}},
        {"candidate": "c", "val_top1": 81.0, "record": {"top1_hard": 50.0}},
    ]
    assert compare.pick(entries, ["a", "b", "c"])["candidate"] == "b"
    assert compare.pick(entries, ["c", "b", "a"])["candidate"] == "c", "ties: the earlier"


def test_pick_passes_over_candidates_that_miss_the_flops_budget():
    """Round 36: aligned one-shot L1 at 0.15 stopped at 0.42 of the FLOPs and won validation."""
    entries = [
        {"candidate": "over", "val_top1": 90.4, "target_flops": 0.15, "flops_ratio": 0.423},
        {"candidate": "near", "val_top1": 89.2, "target_flops": 0.15, "flops_ratio": 0.155},
        {"candidate": "met", "val_top1": 89.8, "target_flops": 0.15, "flops_ratio": 0.148},
    ]
    assert compare.pick(entries, ["over", "near", "met"])["candidate"] == "met"
    far = [dict(e, flops_ratio=r) for e, r in zip(entries, (0.42, 0.34, 0.5), strict=True)]
    assert compare.pick(far, ["over", "near", "met"])["candidate"] == "near", "the closest"


def test_json_schema_and_one_starting_checkpoint(smoke):
    _, out, ckpt, _ = smoke
    data = json.loads((out / "from_trained.json").read_text())
    assert data["profile"] == "from-trained"
    assert data["command"].startswith("python -m benchmarks.compare --profile from-trained")
    sha = compare.file_sha256(ckpt)
    assert data["checkpoint"]["sha256"] == sha == data["settings"]["init_sha256"]
    assert data["checkpoint"]["path"] == str(ckpt)
    assert 0.0 <= data["checkpoint"]["test_top1"] <= 100.0
    runs = data["runs"]
    planned = {("s2h", "epochs"), ("s2h-no-gs", "epochs"), ("l1-ft", "epochs"),
               ("random", "epochs"), ("l1-ft", "compute"), ("l1-ft", "long")}
    for seed in (0, 1):
        assert {(r["method"], r["budget"]) for r in runs if r["seed"] == seed} == planned
    for run in runs:
        assert set(run) >= RUN_KEYS, run["method"]
        assert run["init_sha256"] == sha, "every method starts from the same file"
        assert run["init"] == str(ckpt)
        assert abs(run["flops_ratio"] - 0.35) <= 0.03, (run["method"], run["flops_ratio"])
        assert run["epochs"] == {"epochs": 1.0, "long": 3.0}.get(
            run["budget"], round(run.get("compute_ratio", 0) * 1.0, 2))
    # split_seed 0: every seed validates on the images the checkpoint held out, so the same
    # weights score the same for both seeds
    assert len({r["top1_start_val"] for r in runs}) == 1
    seed0 = next(r for r in runs if r["seed"] == 0)
    assert seed0["top1_start_val"] == pytest.approx(data["checkpoint"]["val_top1"])
    l1 = next(r for r in runs if r["method"] == "l1-ft" and r["budget"] == "epochs")
    assert [s["name"] for s in l1["stages"]] == ["finetune"], "pruned at once, then fine-tuned"
    assert l1["top1_dense"] == pytest.approx(data["checkpoint"]["test_top1"])
    ratio = data["compute_ratios"]["t0.35-s0"]
    assert ratio["plain_timed_steps"] == 2 and ratio["ratio"] > 0


def test_search_picks_by_validation_and_is_reused(smoke):
    _, out, _, profile = smoke
    data = json.loads((out / "from_trained.json").read_text())
    tuning, runs = data["tuning"], data["runs"]
    keys = {compare.run_key(t) for t in tuning}
    assert keys == {("s2h", 0.35, 0, "epochs"), ("l1-ft", 0.35, 0, "epochs"),
                    ("l1-ft", 0.35, 0, "compute")}, "searched on seed 0, epochs and compute"
    for key in keys:
        entries = [t for t in tuning if compare.run_key(t) == key]
        assert len(entries) == 2
        assert sum(t["chosen"] for t in entries) == 1
        best = next(t for t in entries if t["chosen"])
        # the best on validation among the candidates at the FLOPs budget (or nearest to it)
        least = min(compare._budget_excess(t) for t in entries)
        assert compare._budget_excess(best) == least
        assert best["val_top1"] == max(t["val_top1"] for t in entries
                                       if compare._budget_excess(t) == least)  # fmt: skip
        run = next(r for r in runs if compare.run_key(r) == key)
        assert run["candidate"] == best["candidate"] and run["selected_by"] == "val_top1"
        assert run["top1_hard"] == best["record"]["top1_hard"]
        assert run["hyper"] == best["hyper"]
    chosen = {compare.run_key(t): t["hyper"] for t in tuning if t["chosen"]}
    for run in runs:
        source = compare.choice_source(compare.RunSpec(
            run["method"], run["target_flops"], run["seed"], run["budget"]), profile)
        if source is None:
            assert "hyper" not in run, run["method"]  # random: the base recipe
        elif compare.run_key(run) != source.key:
            assert run["hyper"] == chosen[source.key], (run["method"], run["budget"])
            assert run["hyper_from"] == source.name
    ablation = next(r for r in runs if r["method"] == "s2h-no-gs" and r["seed"] == 0)
    assert ablation["hyper_from"] == "s2h-epochs-t0.35-s0"


def test_reports(smoke):
    _, out, _, _ = smoke
    assert (out / "from_trained.png").stat().st_size > 0
    text = (out.parent / "RESULTS.md").read_text()
    for needle in ("## Profile `from-trained`", "Hyper-parameter search (validation split)",
                   "starts from the trained checkpoint", "Target 0.35, long budget",
                   "Target 0.35, compute budget", "Compute ratio", "uniform L1",
                   "## At a glance: S2HPruner against the strongest other method"):
        assert needle in text, needle


def test_resume_runs_nothing_new(smoke, monkeypatch):
    argv, out, _, profile = smoke
    before = (out / "from_trained.json").read_bytes()

    def fail(*args, **kwargs):
        raise AssertionError("a finished run ran again")

    monkeypatch.setitem(compare.PROFILES, "from-trained", profile)
    monkeypatch.setattr(compare, "run_one", fail)
    monkeypatch.setattr(compare, "checkpoint_record", fail)
    assert compare.main([*argv, "--resume"]) == 0
    assert (out / "from_trained.json").read_bytes() == before
    with pytest.raises(SystemExit, match="other settings"):
        compare.main([*argv, "--resume", "--lr", "0.05"])


def test_interrupted_search_resumes_its_candidates(tmp_path, monkeypatch, no_latency):
    ckpt = _checkpoint(tmp_path / "tiny.pt")
    profile = _tiny_profile(
        methods=("l1-ft",), compute_methods=(), long_methods=(), seeds=(0,), targets=(0.35,),
        search={"l1-ft": compare._grid(lr=(0.01, 0.03))}, budgets=("epochs",),
    )
    monkeypatch.setitem(compare.PROFILES, "from-trained", profile)
    argv = ["--profile", "from-trained", "--out", str(tmp_path / "results"), "--init", str(ckpt)]
    calls, real = [], compare.run_one

    def interrupted(spec, prof, epochs, hyper, run_dir, resume):
        calls.append(hyper)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(spec, prof, epochs, hyper, run_dir, resume)

    monkeypatch.setattr(compare, "run_one", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compare.main(argv)
    data = json.loads((tmp_path / "results" / "from_trained.json").read_text())
    assert [t["candidate"] for t in data["tuning"]] == ["lr0.01"] and data["runs"] == []

    calls.clear()
    monkeypatch.setattr(compare, "run_one", lambda *a: calls.append(a[3]) or real(*a))
    assert compare.main([*argv, "--resume", "--max-runs", "1"]) == 0
    assert calls == [{"lr": 0.03}], "only the unfinished candidate ran"
    data = json.loads((tmp_path / "results" / "from_trained.json").read_text())
    assert len(data["runs"]) == 1 and len(data["tuning"]) == 2
    assert data["resumed_by"] and "--resume" in data["resumed_by"][0]


def test_bn_recalibration_is_the_plain_average_over_the_batches():
    """benchmarks.bn_recalibration: the running mean becomes the average of the batches'
    means (momentum None), whatever it was; the weights are untouched."""
    from torch import nn

    from benchmarks.bn_recalibration import recalibrate

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 1, bias=False), nn.BatchNorm2d(4))
    model[1].running_mean.fill_(5.0)
    weight = model[0].weight.detach().clone()
    batches = [(torch.randn(8, 1, 3, 3) + i, None) for i in range(3)]
    recalibrate(model, batches, batches=2)
    with torch.no_grad():
        means = torch.stack([model[0](x).mean(dim=(0, 2, 3)) for x, _ in batches[:2]])
    assert torch.allclose(model[1].running_mean, means.mean(0), atol=1e-5)
    assert torch.equal(model[0].weight, weight) and not model.training


@pytest.mark.parametrize("prune_at_freeze", [False, True])
def test_side_by_side_timing_walks_the_search_and_holds_the_fixed_width_phase(
        tmp_path, monkeypatch, prune_at_freeze):  # fmt: skip
    """benchmarks.step_timing: the joint search is walked step by step (its cost follows the
    widths), the frozen-width phase is held at its first step; every S2HPruner block has a
    plain block on the same batches beside it, in plain-S2H / S2H-plain order. With
    ``prune_at_freeze`` the frozen steps time the pruned network's own step."""
    from benchmarks import step_timing
    from s2hpruner.core.trainer import S2HTrainer

    ckpt = _checkpoint(tmp_path / "tiny.pt")
    cfg = compare.run_config(_tiny_profile(init=str(ckpt), freeze=0.25),
                             compare.RunSpec("s2h", 0.35, 0, "epochs"), 2.0, tmp_path / "run",
                             {"lr": 0.01, "freeze_teacher": "none"})  # fmt: skip
    cfg.prune_at_freeze = prune_at_freeze
    seen, original, pruned = [], S2HTrainer.gradients, []

    def spy(self, x, y, phase):
        seen.append((phase, self.step_count))
        if phase == "freeze":
            pruned.append(self.pruned is not None)
        return original(self, x, y, phase)

    monkeypatch.setattr(S2HTrainer, "gradients", spy)
    timed = step_timing.time_side_by_side(cfg, turns=2, block=1)
    # 64 training images, batch 32: 2 steps an epoch, 4 in all, the last (25%) frozen
    assert timed["steps_per_epoch"] == 2
    assert {p: v["steps"] for p, v in timed["phases"].items()} == {"joint": 3, "freeze": 1}
    assert seen == [("joint", 0), ("joint", 1), ("joint", 2)] + [("freeze", 3)] * 5, \
        "the search walked in order; then one untimed frozen step and 2 turns of 2 blocks"
    assert pruned == [prune_at_freeze] * 5
    order = timed["order"]
    assert [side for side, _ in order] == ["plain", "s2h", "s2h", "plain", "plain", "s2h",
                                           *(["plain", "s2h", "s2h", "plain"] * 2)]
    for i in range(0, len(order), 2):
        assert order[i][1] == order[i + 1][1], "both blocks of a pair see the same batches"
    assert order[6][1] == order[8][1] and order[10][1] == order[12][1], "held: P S S P"
    assert timed["one_off_seconds"] > 0, "layout tuning and the projection are counted"
    assert timed["ratio"] == pytest.approx(step_timing.whole_run_ratio(
        timed["phases"], timed["one_off_seconds"], 4, timed["plain_seconds_per_epoch"] / 2))
    assert step_timing.phase_steps(0, 90, 129) == {"joint": 90, "freeze": 39}
    assert step_timing.phase_steps(10, 129, 129) == {"warmup": 10, "joint": 119}


def test_whole_run_ratio_weights_phases_by_their_steps_and_adds_one_off_work():
    from benchmarks.step_timing import whole_run_ratio

    phases = {"joint": {"fraction": 90 / 129, "ratio": 2.4},
              "freeze": {"fraction": 39 / 129, "ratio": 0.8}}  # fmt: skip
    # 129 steps of a 0.5 s plain step; 12.9 s of one-off work = 0.2 of the plain run
    assert whole_run_ratio(phases, 12.9, 129, 0.5) == pytest.approx(
        (90 * 2.4 + 39 * 0.8) / 129 + 0.2)


def test_timed_profile_gives_the_compute_budget_the_side_by_side_ratio(tmp_path, monkeypatch,
                                                                     no_latency):  # fmt: skip
    """With compute_timing_turns, the compute budget's epochs come from the side-by-side
    timing of the s2h run's own recipe (its chosen candidate), stored once in the JSON."""
    ckpt = _checkpoint(tmp_path / "cache" / "tiny.pt")
    full = compare.FROM_TRAINED_CHEAP_TIMED
    assert full.compute_timing_turns == 9 and full.freeze == 0.7
    assert [(h["lr"], h["freeze"], h["freeze_teacher"]) for h in full.search["s2h"]] == [
        (0.01, 0.7, "none"), (0.03, 0.7, "none"), (0.01, 0.85, "none"), (0.03, 0.85, "none")]
    # one candidate here, not the profile's base: the timing must take the run's own recipe
    profile = dataclasses.replace(full, **TINY, methods=("s2h", "l1-ft"), seeds=(0,),
                                  compute_timing_turns=1,
                                  search={**full.search, "s2h": (
                                      {"lr": 0.03, "freeze_teacher": "none", "freeze": 0.85},)})
    timed = []

    def fake(cfg, turns):
        timed.append((cfg.freeze, cfg.freeze_teacher, cfg.lr, turns))
        return {"ratio": 1.234, "timing": "side by side", "turns": turns,
                "phases": {"joint": {"ratio": 2.0, "fraction": 0.3}}, "one_off_seconds": 1.5,
                "s2h_seconds_per_epoch": 12.3, "plain_seconds_per_epoch": 10.0}  # fmt: skip

    monkeypatch.setattr(compare, "time_side_by_side", fake)
    monkeypatch.setitem(compare.PROFILES, profile.name, profile)
    argv = ["--profile", profile.name, "--out", str(tmp_path / "results"), "--init", str(ckpt),
            "--no-progress"]
    # the compute runs first: they reuse l1-ft's choice, not made yet, so they are skipped
    # before anything is timed
    assert compare.main([*argv, "--budgets", "compute"]) == 0
    assert timed == []
    assert compare.main([*argv, "--resume"]) == 0
    assert timed == [(0.85, "none", 0.03, 1)]
    data = json.loads((tmp_path / "results" / "from_trained_cheap_timed.json").read_text())
    assert data["settings"]["compute_timing_turns"] == 1
    assert data["compute_ratios"]["t0.35-s0"]["timing"] == "side by side"
    (l1,) = [r for r in data["runs"] if r["budget"] == "compute"]
    assert (l1["method"], l1["epochs"], l1["compute_ratio"]) == ("l1-ft", 1.23, 1.234)
    text = (tmp_path / "RESULTS.md").read_text()
    assert "timed side by side in one process" in text
    assert "joint 2.00 x 0.30, one-off 1.5 s" in text


# profiles that are `from-trained-all` with settings of the S2HPruner family changed:
# (profile, {setting: (its value there, its value in from-trained-all)})
ALIGNED = {"round_to": (8, None)}  # every width the family keeps a multiple of 8; the
# baselines keep any width (no round_to reaches them)
PRUNED = {"prune_at_freeze": (True, False)}  # the pruned network trained once widths freeze
UNIFORM_START = {"search_start": ("uniform", "full")}  # the search starts at uniform widths
GROUP_IMPORTANCE = {"importance": ("group", "producers")}  # channels ranked by the group
LONG = {"long_targets": (), "long_methods": compare.MAIN_METHODS}  # (that one also runs the
# long budget, for three of them)
ALL_SEEDS = {"seed_limits": compare.FROM_TRAINED_ALL.seed_limits}  # (these run every seed at
# every target)
FAMILY_SETTINGS = [
    (compare.FROM_TRAINED_ALIGNED, ALIGNED, {}),
    (compare.FROM_TRAINED_PRUNED, PRUNED, {}),
    (compare.FROM_TRAINED_ALIGNED_PRUNED, {**ALIGNED, **PRUNED}, LONG),
    (compare.FROM_TRAINED_UNIFORM_START, {**PRUNED, **UNIFORM_START}, {}),
    (compare.FROM_TRAINED_GROUP_IMPORTANCE, {**PRUNED, **GROUP_IMPORTANCE}, ALL_SEEDS),
    (compare.FROM_TRAINED_GROUP_ALIGNED, {**ALIGNED, **PRUNED, **GROUP_IMPORTANCE},
     {**LONG, **ALL_SEEDS}),
]


def test_resnet56_short_profile_runs_resnet20s_strongest_recipe_and_searches_every_method(
        tmp_path):
    """`from-trained-resnet56-short` is `from-trained-group-aligned-short` on resnet56 from its
    own checkpoint: every method searched on resnet56's validation split at 0.35 (S2HPruner
    at both width steps), group-sl left out; each run gets resnet56 and that checkpoint."""
    deep, short = compare.FROM_TRAINED_RESNET56_SHORT, compare.FROM_TRAINED_GROUP_ALIGNED_SHORT
    same = dict(name=short.name, model=short.model, init=short.init, targets=short.targets,
                tune_targets=short.tune_targets, seeds=short.seeds, methods=short.methods,
                compute_methods=short.compute_methods, search=short.search,
                borrow=short.borrow, pretrain_command=short.pretrain_command)  # fmt: skip
    assert dataclasses.replace(deep, **same) == short
    assert (deep.model, deep.init) == ("resnet56", compare.CHECKPOINT_RESNET56)
    assert {(s.method, s.budget) for s in compare.plan_runs(deep)} == {
        ("s2h", "epochs"), ("l1-ft", "epochs"), ("random", "epochs"),
        ("l1-ft", "compute"), ("random", "compute")}  # fmt: skip
    assert [c["round_to"] for c in deep.search["s2h"]] == [8, 4]
    assert {m: deep.search[m] for m in ("l1-ft", "random")} == \
        {m: short.search[m] for m in ("l1-ft", "random")}  # fmt: skip
    for method in ("s2h", "l1-ft", "random"):
        spec = compare.RunSpec(method, 0.35, 0, "epochs")
        assert compare.search_candidates(spec, deep) == deep.search[method]
        for hyper in deep.search[method]:
            cfg = compare.run_config(deep, spec, 1.0, tmp_path, hyper)
            assert (cfg.model, cfg.init) == ("resnet56", compare.CHECKPOINT_RESNET56)
            assert cfg.round_to == (hyper["round_to"] if method == "s2h" else None)


def test_resnet56_at_015_searches_every_method_at_015_with_resnet20s_015_recipe(tmp_path):
    """`from-trained-resnet56-015` is `from-trained-resnet56-short` at 0.15, searched at 0.15;
    S2HPruner's candidates are resnet20's 0.15 choice (the descent) at both width steps, and
    the baselines keep their grids."""
    at_015, short = compare.FROM_TRAINED_RESNET56_015, compare.FROM_TRAINED_RESNET56_SHORT
    same = dict(name=short.name, targets=short.targets, tune_targets=short.tune_targets,
                search=short.search)  # fmt: skip
    assert dataclasses.replace(at_015, **same) == short
    assert (at_015.targets, at_015.tune_targets) == ((0.15,), (0.15,))
    assert {m: at_015.search[m] for m in ("l1-ft", "random")} == \
        {m: short.search[m] for m in ("l1-ft", "random")}  # fmt: skip
    assert [(c["descent"], c["round_to"], c["freeze"]) for c in at_015.search["s2h"]] == [
        (0.8, 8, 0.85), (0.8, 4, 0.85)]  # fmt: skip
    assert {s.target for s in compare.plan_runs(at_015)} == {0.15}
    spec = compare.RunSpec("s2h", 0.15, 0, "epochs")
    for hyper in compare.search_candidates(spec, at_015):
        cfg = compare.run_config(at_015, spec, 1.0, tmp_path, hyper)
        assert (cfg.model, cfg.init, cfg.target_flops) == (
            "resnet56", compare.CHECKPOINT_RESNET56, 0.15)  # fmt: skip
        assert (cfg.descent, cfg.round_to) == (0.8, hyper["round_to"])


def test_resnet56_at_055_is_the_resnet56_short_profile_searched_at_055(tmp_path):
    """`from-trained-resnet56-055` changes only the target (and where the search runs) of
    `from-trained-resnet56-short`: S2HPruner keeps its two width steps, without the descent."""
    at_055, short = compare.FROM_TRAINED_RESNET56_055, compare.FROM_TRAINED_RESNET56_SHORT
    same = dict(name=short.name, targets=short.targets, tune_targets=short.tune_targets)
    assert dataclasses.replace(at_055, **same) == short
    assert (at_055.targets, at_055.tune_targets) == ((0.55,), (0.55,))
    assert {s.target for s in compare.plan_runs(at_055)} == {0.55}
    spec = compare.RunSpec("s2h", 0.55, 0, "epochs")
    candidates = compare.search_candidates(spec, at_055)
    assert [c["round_to"] for c in candidates] == [8, 4]
    for hyper in candidates:
        cfg = compare.run_config(at_055, spec, 1.0, tmp_path, hyper)
        assert (cfg.model, cfg.init, cfg.target_flops) == (
            "resnet56", compare.CHECKPOINT_RESNET56, 0.55)  # fmt: skip
        assert (cfg.descent, cfg.round_to, cfg.freeze) == (0.0, hyper["round_to"], 0.85)


def test_short_search_profile_changes_only_s2hpruners_search_share():
    """`from-trained-group-aligned-short` is `from-trained-group-aligned` with S2HPruner's one
    candidate the 15% search (freeze 0.85) at lr 0.03; every baseline keeps its grid."""
    short, aligned = compare.FROM_TRAINED_GROUP_ALIGNED_SHORT, compare.FROM_TRAINED_GROUP_ALIGNED
    assert short.search["s2h"] == ({"lr": 0.03, "freeze_teacher": "none", "freeze": 0.85},)
    assert dataclasses.replace(short, name=aligned.name, search=aligned.search) == aligned
    assert short.search["s2h"][0] in aligned.search["s2h"]  # one of the grid searched there
    cfg = compare.run_config(short, compare.RunSpec("s2h", 0.35, 0, "epochs"), 1.0, Path("x"),
                             short.search["s2h"][0])  # fmt: skip
    assert (cfg.freeze, cfg.freeze_epochs, cfg.lr) == (0.85, None, 0.03)


def test_descent_profile_searches_every_method_at_its_one_target():
    """`from-trained-descent` is the short profile at 0.15 alone, every method searched at 0.15
    itself, and S2HPruner's two candidates the short search without and with the descent; the
    descent reaches the run's config (and the trainer's aim: tests/test_search_options.py)."""
    descent, short = compare.FROM_TRAINED_DESCENT, compare.FROM_TRAINED_GROUP_ALIGNED_SHORT
    assert (descent.targets, descent.tune_targets) == ((0.15,), (0.15,))
    assert [c.pop("descent") for c in map(dict, descent.search["s2h"])] == [0.0, 0.8]
    assert all({k: v for k, v in c.items() if k != "descent"} == short.search["s2h"][0]
               for c in descent.search["s2h"])  # fmt: skip
    assert dataclasses.replace(descent, name=short.name, targets=short.targets,
                               tune_targets=short.tune_targets, search=short.search) == short
    for hyper in descent.search["s2h"]:
        cfg = compare.run_config(descent, compare.RunSpec("s2h", 0.15, 0, "epochs"), 1.0,
                                 Path("x"), hyper)  # fmt: skip
        assert (cfg.descent, cfg.freeze, cfg.target_flops) == (hyper["descent"], 0.85, 0.15)
    assert compare.candidate_name(descent.search["s2h"][1]).endswith("-descent0.8")
    assert report._hyper_text({"descent": 0.8}) == "descent over 80% of the search"
    assert report._hyper_text({"descent": 0.0}) == "no descent"


def test_the_055_profile_is_the_descent_profile_searched_at_055():
    """`from-trained-searched-055` changes only the target, where every method searches its
    grid (the other from-trained profiles search at 0.35 and reuse the choice at 0.55)."""
    at_055, descent = compare.FROM_TRAINED_SEARCHED_055, compare.FROM_TRAINED_DESCENT
    assert (at_055.targets, at_055.tune_targets) == ((0.55,), (0.55,))
    assert dataclasses.replace(at_055, name=descent.name, targets=descent.targets,
                               tune_targets=descent.tune_targets) == descent  # fmt: skip
    for method in ("s2h", "l1-ft", "random"):
        spec = compare.RunSpec(method, 0.55, 0, "epochs")
        assert compare.search_candidates(spec, at_055) == at_055.search[method]
        assert compare.choice_source(dataclasses.replace(spec, seed=1), at_055) == spec
    assert compare.search_candidates(compare.RunSpec("l1-ft", 0.55, 0, "epochs"),
                                     compare.FROM_TRAINED_GROUP_ALIGNED_SHORT) == ()  # fmt: skip


WIDTH_STEP = [  # (profile, the profile it changes, the descents of S2HPruner's recipes)
    (compare.FROM_TRAINED_WIDTH_STEP_055, compare.FROM_TRAINED_SEARCHED_055, (0.0,)),
    (compare.FROM_TRAINED_WIDTH_STEP_015, compare.FROM_TRAINED_DESCENT, (0.0, 0.8)),
]


@pytest.mark.parametrize(("steps", "base", "descents"), WIDTH_STEP,
                         ids=[p.name for p, _, _ in WIDTH_STEP])  # fmt: skip
def test_the_width_step_profiles_search_s2hpruners_alignment(tmp_path, steps, base, descents):
    """`from-trained-width-step-055` (-015) is `from-trained-searched-055`
    (`from-trained-descent`) with S2HPruner's recipes at two width steps (multiples of 8, the
    profile's, and of 4), chosen on validation; the candidate's step reaches S2HPruner's run
    and never a baseline's."""
    assert dataclasses.replace(steps, name=base.name, search=base.search) == base
    assert {m: c for m, c in steps.search.items() if m != "s2h"} == \
        {m: c for m, c in base.search.items() if m != "s2h"}  # fmt: skip
    recipes = [c for c in base.search["s2h"] if c["descent"] in descents]
    candidates = steps.search["s2h"]
    assert [c["round_to"] for c in candidates] == [8] * len(recipes) + [4] * len(recipes)
    assert [{"descent": 0.0, **{k: v for k, v in c.items() if k != "round_to"}}
            for c in candidates] == recipes * 2  # fmt: skip
    target = steps.targets[0]
    assert steps.tune_targets == (target,)
    spec = compare.RunSpec("s2h", target, 0, "epochs")
    assert compare.search_candidates(spec, steps) == candidates
    for hyper in candidates:
        assert compare.run_config(steps, spec, 1.0, tmp_path, hyper).round_to == hyper["round_to"]
    baseline = compare.RunSpec("l1-ft", target, 0, "epochs")
    for hyper in steps.search["l1-ft"]:
        assert compare.run_config(steps, baseline, 1.0, tmp_path, hyper).round_to is None
    # RESULTS.md says the step may be the search's, only where it is searched
    results = {"profile": steps.name, "command": "c", "runs": [], "machine": json.loads(
        (ROOT / "benchmarks/results/from_trained_searched_055.json").read_text())["machine"]}
    for profile, searched in ((steps, True), (base, False)):
        stored = compare.settings(dataclasses.replace(profile, init=None))  # no checkpoint here
        text = "\n".join(report.profile_markdown({**results, "settings": stored}, None))
        assert ("or the step the search below chooses" in text) == searched


@pytest.mark.parametrize(("profile", "settings", "others"), FAMILY_SETTINGS,
                         ids=[p.name for p, _, _ in FAMILY_SETTINGS])  # fmt: skip
def test_profiles_that_change_the_s2hpruner_family_only(tmp_path, profile, settings, others):
    """Each is `from-trained-all` with settings of the S2HPruner family changed (and
    ``others`` of the profile's plan): its runs get them, the baselines' runs do not."""
    defaults = {setting: default for setting, (_, default) in settings.items()}
    assert dataclasses.replace(profile, name="from-trained-all", **defaults, **others) == \
        compare.FROM_TRAINED_ALL  # fmt: skip
    for method in profile.methods:
        cfg = compare.run_config(profile, compare.RunSpec(method, 0.35, 0, "epochs"), 1.0,
                                 tmp_path)  # fmt: skip
        for setting, (value, default) in settings.items():
            expected = value if method in compare.METHODS else default
            assert getattr(cfg, setting) == expected, (method, setting)


def test_summary_pairs_seeds_and_names_the_strongest_method_at_equal_compute():
    """The at-a-glance table: S2HPruner's epochs runs against each compute run on the seeds
    both have (a seed only one of them ran never enters a mean), and per target the method
    S2HPruner leads least on test."""

    def run(method, budget, seed, test, val):
        return {"method": method, "budget": budget, "seed": seed, "target_flops": 0.35,
                "top1_hard": test, "val_top1": val, "compute_ratio": 1.5}  # fmt: skip

    results = {"profile": "p", "checkpoint": {"test_top1": 92.0}, "runs": [
        run("s2h", "epochs", 0, 91.0, 91.2), run("s2h", "epochs", 1, 91.4, 91.6),
        run("s2h", "epochs", 2, 80.0, 80.0),  # no baseline ran seed 2: left out of every mean
        run("l1-ft", "epochs", 0, 99.0, 99.0),  # equal epochs: not the equal-compute table
        run("l1-ft", "compute", 0, 91.3, 91.0), run("l1-ft", "compute", 1, 91.3, 91.0),
        run("random", "compute", 0, 90.5, 91.5),
    ]}  # fmt: skip
    results["runs"][3]["candidates"] = ["lr0.01", "lr0.03"]  # l1-ft's recipe searched here
    rows = {row["method"]: row for row in report.equal_compute_summary(results)}
    assert rows["l1-ft"]["seeds"] == [0, 1] and rows["random"]["seeds"] == [0]
    assert rows["l1-ft"]["s2h_test"] == pytest.approx(91.2)
    assert rows["l1-ft"]["other_test"] == pytest.approx(91.3)
    assert rows["random"]["s2h_val"] == pytest.approx(91.2)
    lines = report._summary_lines([results])
    (row,) = [line for line in lines if line.startswith("| `p`")]
    assert rows["l1-ft"]["seeds_ahead_test"] == 1  # 91.4 > 91.3 on seed 1, not on seed 0
    # seed-by-seed leads -0.3 and +0.1: standard deviation 0.283, standard error 0.2
    assert rows["l1-ft"]["lead_test_se"] == pytest.approx(0.2)
    assert rows["random"]["lead_test_se"] is None  # one seed: no spread to report
    assert ("`l1-ft` | 0, 1 | 1.50 | 91.20 / 91.30 (**-0.10** ± 0.20) | 1 of 2 | "
            "91.40 / 91.00 (**+0.40**)") in row  # fmt: skip
    assert "◊" not in row
    results["runs"][5]["flops_ratio"] = 0.3611  # a run off its budget (> 0.35 + slack)
    results["runs"][0]["flops_ratio"] = 0.3555  # within the slack
    assert report.equal_compute_summary(results)[0]["off_budget_other"] == 0.3611
    assert "`l1-ft` ◊ (FLOPs: it up to 0.361) | 0, 1" in report._summary_lines([results])[-2]
    del results["runs"][5]["flops_ratio"]
    priced = {**results, "settings": {"compute_pricing": "own-steps"}}
    for r in priced["runs"][4:6]:  # priced by own steps before round 37: untuned layout
        r["own_step_pricing"] = {"ratio": 1.2}
    assert "| 1.50 §¹ |" in report._summary_lines([priced])[-2]
    for r in priced["runs"][4:6]:
        r["own_step_pricing"] = {"ratio": 0.8, "proxy_layout": "torch.contiguous_format"}
    assert "| 1.50 § |" in report._summary_lines([priced])[-2]
    for r in priced["runs"][4:6]:
        del r["own_step_pricing"]
    del results["runs"][3]["candidates"]  # carried over from elsewhere: flagged
    results["runs"][0]["candidates"] = ["lr0.01", "lr0.03"]  # S2HPruner's searched here
    assert "`l1-ft` † | 0, 1" in report._summary_lines([results])[-2]
    del results["runs"][0]["candidates"]  # neither searched here: both carried over
    assert "`l1-ft` ° | 0, 1" in report._summary_lines([results])[-2]
    assert report._summary_lines([{**results, "checkpoint": None}]) == []  # from scratch
    # the long budget: S2HPruner's long runs against the long compute runs, a row of its own
    results["runs"] += [run("s2h", "long", 0, 92.0, 92.2),
                        run("l1-ft", "long-compute", 0, 91.5, 91.9),
                        run("l1-ft", "long", 0, 99.0, 99.0)]  # equal epochs: not compared
    (long,) = report.equal_compute_summary(results, "long-compute")
    assert long["method"] == "l1-ft" and long["lead_test"] == pytest.approx(0.5)
    assert "| `p` | 0.35 (3x) | `l1-ft` ° | 0 |" in report._summary_lines([results])[-2]
    assert "(3x)" not in report._summary_lines([results])[-3]  # the base budget's row first


def test_a_profile_of_fixed_recipes_says_it_searched_nothing():
    """One candidate per method is a fixed recipe, not a validation search of one: the
    profile's section names each recipe instead of a search table."""
    results = {"settings": {"search": {"s2h": ({"lr": 0.03, "descent": 0.8},),
                                       "l1-ft": ({"lr": 0.03, "l1_global": False},)}},
               "runs": [{"method": "s2h"}, {"method": "l1-ft"}]}  # fmt: skip
    lines = report._search_lines(results)
    assert lines[0] == "### Fixed recipes (no search)"
    assert "`s2h`: lr 0.03, descent over 80% of the search" in lines[2]
    assert "`l1-ft`: lr 0.03, uniform L1" in lines[2]
    results["settings"]["search"]["l1-ft"] += ({"lr": 0.01, "l1_global": False},)
    assert report._search_lines(results)[0] == "### Hyper-parameter search (validation split)"


@pytest.mark.parametrize(("stored", "with_group_sl"),
                         [("from_trained_all", True), ("from_trained_group_aligned_short", False)])
def test_a_profile_section_describes_only_the_baselines_that_ran(stored, with_group_sl):
    """RESULTS.md says what Group-SL did from the checkpoint only where Group-SL ran."""
    results = json.loads((ROOT / f"benchmarks/results/{stored}.json").read_text())
    text = "\n".join(report.profile_markdown(results, None))
    assert ("`group-sl` from a trained model" in text) == with_group_sl
    assert ("`group-sl` sparse-trains" in text) == with_group_sl
    assert "`l1-ft` from a trained model" in text and "`random` from a trained model" in text
