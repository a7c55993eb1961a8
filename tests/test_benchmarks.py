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
        "--methods", "l1,group-sl,random,s2h", "--compute-methods", "l1",
        "--targets", "0.35", "--seeds", "0", "--epochs", "1", "--freeze-epochs", "0.5",
        "--batch-size", "64", "--val-size", "100", "--train-subset", "256",
        "--latency-repeats", "2", "--no-progress",
    ]
    assert compare.main(argv) == 0
    return argv, out


def test_json_structure_and_budget(smoke):
    _, out = smoke
    data = json.loads((out / "quick.json").read_text())
    assert data["profile"] == "quick"
    assert data["command"].startswith("python -m benchmarks.compare")
    assert {"cpu", "cores", "torch", "torch_pruning", "python"} <= set(data["machine"])
    runs = {(r["method"], r["budget"]): r for r in data["runs"]}
    assert set(runs) == {
        ("l1", "epochs"),
        ("group-sl", "epochs"),
        ("random", "epochs"),
        ("s2h", "epochs"),
        ("l1", "compute"),
    }
    for run in data["runs"]:
        assert set(run) >= RUN_KEYS, run["method"]
        assert abs(run["flops_ratio"] - 0.35) <= 0.01, (run["method"], run["flops_ratio"])
        assert 0.0 <= run["top1_hard"] <= 100.0
    assert runs[("s2h", "epochs")]["top1_soft"] is not None
    for method in ("l1", "group-sl", "random"):
        assert runs[(method, "epochs")]["top1_soft"] is None
        assert runs[(method, "epochs")]["gap"] is None
        assert runs[(method, "epochs")]["epochs"] == 1
    ratio = data["compute_ratios"]["t0.35-s0"]["ratio"]
    assert runs[("l1", "compute")]["epochs"] == pytest.approx(round(ratio, 2))
    assert runs[("l1", "compute")]["compute_ratio"] == ratio


def test_reports_exist(smoke):
    _, out = smoke
    assert (out / "quick.png").stat().st_size > 0
    text = (out.parent / "RESULTS.md").read_text()
    assert "Target 0.35, epochs budget" in text and "Target 0.35, compute budget" in text
    assert "`group-sl`" in text


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
