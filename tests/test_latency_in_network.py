"""benchmarks.latency_in_network: every timed call of the tables is timed inside the whole
network, and set beside the tables' value at the same widths."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a package beside src/, not installed
    sys.path.insert(0, str(ROOT))

from test_architecture_finetune import WIDTHS, _run_dir  # noqa: E402

from benchmarks import latency_in_network as N  # noqa: E402
from s2hpruner.core.resources import latency  # noqa: E402


def test_each_table_call_is_timed_in_the_network_at_the_runs_widths(tmp_path, monkeypatch):
    monkeypatch.setenv("S2HPRUNER_CACHE", str(tmp_path / "cache"))
    # tables faked (a known function of the cell's output width); the network is timed for real
    monkeypatch.setattr(latency, "_time_cell", lambda cell, x, repeats: 1e-6 * (
        1 + (cell[0] if hasattr(cell, "__getitem__") else cell).weight.shape[0]))
    result = N.run_networks(_run_dir(tmp_path), repeats=3, vary={"layer3.0.conv1": [8]})
    nets = result["networks"]
    assert list(nets) == ["full", "kept", "kept, layer3.0.conv1=8"]
    assert nets["kept"]["widths"] == WIDTHS
    assert nets["kept, layer3.0.conv1=8"]["widths"]["layer3.0.conv1"] == 8
    convs = {row["call"] for row in nets["full"]["calls"]}
    assert {"conv1", "layer1.0.conv1", "layer3.2.conv2", "layer2.0.shortcut.0"} <= convs
    for net in nets.values():
        assert {row["call"] for row in net["calls"]} == convs
        assert all(row["in_network"] > 0 for row in net["calls"])
        assert net["calls_in_network"] == pytest.approx(
            sum(row["in_network"] for row in net["calls"]))
    # by the fake tables: each call costs 1e-6 x (1 + its output width), at the exported widths
    assert nets["full"]["calls_by_table"] > nets["kept"]["calls_by_table"]
    narrowed = nets["kept, layer3.0.conv1=8"]["calls"]
    kept = nets["kept"]["calls"]
    row = next(i for i, r in enumerate(kept) if r["call"] == "layer3.0.conv1")
    assert kept[row]["table"] - narrowed[row]["table"] == pytest.approx(1e-6 * (16 - 8))
    # linear fake tables: the secant over a step is the slope; every group has a price
    rows = nets["kept"]["prices"]
    assert {row["group"] for row in rows} == set(WIDTHS)
    for row in rows:
        assert row["width"] == WIDTHS[row["group"]]
        assert row["step"] == pytest.approx(row["slope"], rel=1e-9, abs=1e-15)
        assert row["step"] > 0 and row["flops"] > 0
