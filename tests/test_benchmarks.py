"""The benchmark end to end on fabricated data: every method meets the FLOPs target, the
JSON has the documented structure, and a resumed benchmark runs nothing twice."""

import json
import sys
from pathlib import Path

import pytest
from fabricate import learnable_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a package beside src/, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import compare  # noqa: E402

RUN_KEYS = {"method", "target_flops", "seed", "epochs", "budget", "top1_hard", "top1_soft",
            "gap", "flops_ratio", "params_ratio", "wall_seconds"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = learnable_fashion_mnist(tmp_path_factory.mktemp("fmnist"))
    out = tmp_path_factory.mktemp("bench") / "results"
    argv = [
        "--profile", "quick", "--out", str(out), "--data-root", str(root),
        "--methods", "l1,group-sl,random,s2h", "--targets", "0.35", "--seeds", "0",
        "--epochs", "1", "--freeze-epochs", "0.5", "--batch-size", "32", "--val-size", "50",
        "--train-subset", "64", "--no-progress",
    ]
    with pytest.MonkeyPatch.context() as mp:
        # s2hpruner's latency timing is tested with s2hpruner; here it would only cost a minute
        fake = lambda *args, **kwargs: {"b1": 1.0, "b64": 1.0}  # noqa: E731
        mp.setattr("s2hpruner.app.run.latency_speedup", fake, raising=False)
        assert compare.main(argv) == 0
    return argv, out


def test_json_structure_and_budget(smoke):
    _, out = smoke
    data = json.loads((out / "quick.json").read_text())
    assert data["profile"] == "quick"
    assert data["command"].startswith("python -m benchmarks.compare")
    assert {"cpu", "cores", "torch", "torch_pruning", "python"} <= set(data["machine"])
    runs = {r["method"]: r for r in data["runs"]}
    assert set(runs) == {"l1", "group-sl", "random", "s2h"}
    for run in data["runs"]:
        assert set(run) >= RUN_KEYS, run["method"]
        assert abs(run["flops_ratio"] - 0.35) <= 0.01, (run["method"], run["flops_ratio"])
        assert 0.0 <= run["top1_hard"] <= 100.0
        assert run["budget"] == "epochs" and run["epochs"] == 1
    assert runs["s2h"]["top1_soft"] is not None
    assert runs["s2h"]["gap"] == pytest.approx(runs["s2h"]["top1_soft"] - runs["s2h"]["top1_hard"])
    for method in ("l1", "group-sl", "random"):
        assert runs[method]["top1_soft"] is None and runs[method]["gap"] is None
    assert runs["l1"]["dense_seconds_per_epoch"] > 0, "the compute ratio needs plain timing"


def test_compute_budget_scales_by_measured_seconds_per_epoch():
    def run(method, target, **seconds):
        return {"method": method, "target_flops": target, "seed": 0, "budget": "epochs", **seconds}

    results = {"compute_ratios": {}, "runs": [
        run("s2h", 0.35, train_seconds_per_epoch=300.0),
        run("l1", 0.35, dense_seconds_per_epoch=120.0),
        run("s2h", 0.15, train_seconds_per_epoch=310.0),
    ]}
    ratio = compare.compute_ratio(results, 0.35, 0)
    assert ratio["ratio"] == pytest.approx(2.5) and ratio["plain_method"] == "l1"
    assert results["compute_ratios"]["t0.35-s0"] is ratio, "stored, so a resume reuses it"
    assert compare.compute_ratio(results, 0.15, 0) is None, "no plain run at 0.15"
    profile = compare.Profile("t", targets=(0.15, 0.35), methods=("s2h", "l1"),
                              compute_methods=("l1",), seeds=(0,))
    budgets = [(s.target, s.method, s.budget) for s in compare.plan_runs(profile)]
    assert budgets == [(0.15, "s2h", "epochs"), (0.15, "l1", "epochs"), (0.15, "l1", "compute"),
                       (0.35, "s2h", "epochs"), (0.35, "l1", "epochs"), (0.35, "l1", "compute")]


def test_reports_exist(smoke):
    _, out = smoke
    assert (out / "quick.png").stat().st_size > 0
    text = (out.parent / "RESULTS.md").read_text()
    assert "Target 0.35, epochs budget" in text and "`group-sl`" in text
    assert "Intel" in text or "cores" in text


def test_resume_runs_nothing_new(smoke, monkeypatch):
    argv, out = smoke
    before = (out / "quick.json").read_bytes()

    def fail(*args, **kwargs):
        raise AssertionError("a finished run ran again")

    monkeypatch.setattr(compare, "execute", fail)
    assert compare.main([*argv, "--resume"]) == 0
    assert (out / "quick.json").read_bytes() == before


def test_refuses_to_clobber_or_mix_settings(smoke):
    argv, _ = smoke
    with pytest.raises(SystemExit, match="--resume"):
        compare.main(argv)
    with pytest.raises(SystemExit, match="other settings"):
        compare.main([*argv, "--resume", "--lr", "0.05"])


def test_latency_budget_plot_pairs_the_runs_of_a_seed(tmp_path):
    """benchmarks.latency_budget's picture: one panel per model (and model_kwargs), both
    budgets, an infeasible run (no top-1) left out."""
    from benchmarks import latency_budget

    def run(model, budget, seed, latency, top1, **extra):
        return {"model": model, "budget": budget, "seed": seed, "latency_ratio": latency,
                "top1_hard": top1, "target_latency": 0.5, **extra}  # fmt: skip

    results = {"runs": [
        run("resnet20", "latency", 0, 0.49, 89.0), run("resnet20", "flops", 0, 0.50, 89.9),
        run("resnet20", "latency", 1, 0.47, 89.1), run("resnet20", "flops", 1, 0.45, 89.6),
        run("mobilenet_v3_small", "latency", 0, 0.5, 80.0, model_kwargs={"cifar_stem": True}),
        {"model": "mobilenet_v3_small", "budget": "latency", "seed": 0, "infeasible": "floor"},
    ]}  # fmt: skip
    path = tmp_path / "latency.png"
    latency_budget.plot(results, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    latency_budget.plot({"runs": results["runs"][-1:]}, tmp_path / "none.png")  # nothing to draw
    assert not (tmp_path / "none.png").exists()


def test_equal_latency_plot_draws_a_panel_per_model_with_side_by_side_timings(tmp_path):
    """Only runs timed side by side are drawn; a seed without a bracket has no diamond."""
    from benchmarks import latency_budget

    side = latency_budget.SIDE_BY_SIDE
    attempts = [{"top1_hard": 88.0, side: 0.45}, {"top1_hard": 90.0, side: 0.55}]
    results = {"runs": [
        {"model": "resnet20", "budget": "latency", "seed": 0, "top1_hard": 89.5, side: 0.5},
        {"model": "resnet20", "budget": "flops", "seed": 0, "top1_hard": 88.0,
         "flops_attempts": attempts, "top1_hard_at_equal_latency": 89.0},
        {"model": "resnet20", "budget": "latency", "seed": 1, "top1_hard": 89.0, side: 0.6},
        {"model": "resnet20", "budget": "flops", "seed": 1, "top1_hard": 88.0,
         "flops_attempts": attempts[:1], "top1_hard_at_equal_latency": None},
    ]}  # fmt: skip
    path = tmp_path / "equal.png"
    latency_budget.plot_equal_latency(results, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    untimed = {"runs": [{**r, side: None} for r in results["runs"]]}
    latency_budget.plot_equal_latency(untimed, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


def test_latency_budget_reads_the_flops_target_off_the_calibration_curve():
    """The FLOPs target for a latency ratio: interpolated on the measured curve (whatever the
    order of its points), clamped at the grid's ends (the retry stops there)."""
    from benchmarks.latency_budget import flops_target_for

    points = [(0.3, 0.60), (0.1, 0.40), (0.2, 0.50)]
    assert flops_target_for(points, 0.45) == pytest.approx(0.15)
    assert flops_target_for(points, 0.30) == 0.1 and flops_target_for(points, 0.9) == 0.3


def test_flops_arm_top1_is_interpolated_at_the_latency_runs_latency_between_attempts():
    """Linear in measured latency between the nearest attempt on each side; None unless the
    attempts lie on both sides; untimed attempts do not count."""
    from benchmarks.latency_budget import top1_at_latency

    def attempt(latency, top1):
        return {"latency_ratio_side_by_side": latency, "top1_hard": top1}

    attempts = [attempt(0.43, 80.0), attempt(0.48, 85.0), attempt(0.53, 88.0)]
    assert top1_at_latency(attempts, 0.50) == pytest.approx(85.0 + 0.4 * 3.0)
    assert top1_at_latency(attempts, 0.45) == pytest.approx(82.0)
    assert top1_at_latency(attempts, 0.48) == pytest.approx(85.0)
    assert top1_at_latency(attempts[:2], 0.50) is None  # all faster: no bracket
    assert top1_at_latency([*attempts[:2], {"top1_hard": 90.0}], 0.50) is None


def test_bracketing_target_aims_past_the_latency_run_on_the_missing_side():
    """Every attempt slower than the latency run: the next one aims ``margin`` faster, read
    off the calibration curve moved by the nearest attempt's miss; and the other way round."""
    from benchmarks.latency_budget import bracketing_target

    points = [(0.1, 0.40), (0.2, 0.50), (0.3, 0.60)]  # latency = 0.3 + FLOPs target
    # trained at 0.2 it measured 0.52 (curve: 0.50); the latency run measured 0.49
    slower = [{"target_flops": 0.2, "latency_ratio_side_by_side": 0.52},
              {"target_flops": 0.3, "latency_ratio_side_by_side": 0.63}]  # fmt: skip
    assert bracketing_target(slower, 0.49, points) == pytest.approx(0.14)  # aims at 0.46
    faster = [{"target_flops": 0.2, "latency_ratio_side_by_side": 0.47}]
    assert bracketing_target(faster, 0.49, points) == pytest.approx(0.25)  # aims at 0.52


def test_latency_remeasure_finds_the_run_directories_latency_budget_wrote():
    from benchmarks.latency_remeasure import run_dir

    root = Path("runs/latency_budget")
    run = {"model": "mobilenet_v3_small", "model_kwargs": {"cifar_stem": True}, "seed": 1,
           "budget": "flops"}  # fmt: skip
    assert run_dir(root, run) == root / "mobilenet_v3_small_cifar_stem-True_s1_flops"
    assert run_dir(root, {"model": "resnet20", "budget": "latency"}) == root / "resnet20_latency"
    retried = {**run, "out": "runs/x/mobilenet_v3_small_cifar_stem-True_s1_flops_2"}
    assert run_dir(root, retried) == Path(retried["out"])  # the attempt that was kept


def test_latency_remeasure_side_by_side_times_a_seeds_runs_in_one_process(tmp_path,
                                                                         monkeypatch):
    """One worker per model and seed gets all of that seed's exported networks; each run gets
    the median of its own values back."""
    import argparse
    import json
    import subprocess
    import types

    from benchmarks import latency_remeasure

    def exported(name):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_pruned.pt").write_bytes(b"")
        return str(tmp_path / name)

    runs = []
    for seed in (0, 1):
        latency = {"model": "resnet20", "seed": seed, "budget": "latency", "top1_hard": 90.0,
                   "out": exported(f"resnet20_s{seed}_latency"), "latency_ratio": 0.5}
        # the FLOPs run is a copy of its second attempt: the network is timed once
        attempts = [{"out": exported(f"resnet20_s{seed}_flops"), "top1_hard": 88.0,
                     "latency_ratio": 0.6},
                    {"out": exported(f"resnet20_s{seed}_flops_2"), "top1_hard": 89.0,
                     "latency_ratio": 0.5}]  # fmt: skip
        runs += [latency, {"model": "resnet20", "seed": seed, "budget": "flops",
                           **attempts[1], "flops_attempts": attempts}]  # fmt: skip
    calls = []

    def fake_run(command, **kwargs):
        exported = command[command.index("--worker-side-by-side") + 4:]
        calls.append(exported)
        values = [[0.4 + 0.1 * i, 0.6 + 0.1 * i, 0.5 + 0.1 * i] for i in range(len(exported))]
        return types.SimpleNamespace(stdout=json.dumps(values) + "\n")

    monkeypatch.setattr(subprocess, "run", fake_run)
    args = argparse.Namespace(runs=tmp_path, latency_batch=64, turns=3,
                              json=tmp_path / "results.json")  # fmt: skip
    latency_remeasure.side_by_side(args, {"runs": runs}, {})
    assert [len(c) for c in calls] == [3, 3]  # one process per seed, every network in it
    assert all("_s0_" in c for c in calls[0]) and all("_s1_" in c for c in calls[1])
    # medians in the order timed: latency run 0.5, the FLOPs run (= attempt 2) 0.6, attempt 1 0.7
    assert [r["latency_ratio_side_by_side"] for r in runs] == pytest.approx([0.5, 0.6] * 2)
    saved = json.loads(args.json.read_text())["runs"][1]
    assert [a["latency_ratio_side_by_side"] for a in saved["flops_attempts"]] \
        == pytest.approx([0.7, 0.6])
    assert saved["latency_ratio_side_by_side_values"] == pytest.approx([0.5, 0.7, 0.6])
    # both attempts are slower than the latency run (0.5): no top-1 at equal latency
    assert saved["equal_latency"] == 0.5 and saved["top1_hard_at_equal_latency"] is None


def test_latency_predictors_refit_error_favours_the_predictor_the_device_follows():
    """Networks whose measured ratio is a line in their FLOPs: refitted on a few of them, the
    FLOPs line predicts the others exactly and the tables (here unrelated noise) do not."""
    import numpy as np

    from benchmarks.latency_predictors import refit_errors

    rng = np.random.default_rng(0)
    rows = []
    for _ in range(20):
        flops = float(rng.uniform(0.2, 0.8))
        rows.append({"flops": flops, "tables": float(rng.uniform(0.2, 0.8)),
                     "measured": 1.0 - 0.7 * (1.0 - flops)})  # fmt: skip
    errors = refit_errors(rows, k=3, trials=20)
    assert errors["flops"]["median"] < 1e-9 and errors["flops"]["p90"] < 1e-9
    assert errors["tables"]["median"] > 0.05
