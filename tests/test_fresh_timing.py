"""The report's latency is timed in a fresh process, which leaves the caller's allocator alone
(core.fresh_timing), and falls back to the caller's process, with a warning, when it must."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from fabricate import learnable_fashion_mnist, one_thread_run, tiny_config
from torch import nn

from s2hpruner.app.config import ConfigError, RunConfig
from s2hpruner.core import fresh_timing, measure


def _pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    full = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3))
    pruned = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 32, 3))
    return full, pruned


def _held_here(*args, **kwargs):
    raise AssertionError("the caller's process timed (and so held its allocator)")


def test_timing_runs_in_a_child_and_leaves_this_process_alone(monkeypatch):
    # were this process to time or hold its allocator, these would raise
    monkeypatch.setattr(fresh_timing, "latency_speedup", _held_here)
    monkeypatch.setattr(measure, "hold_freed_cpu_memory", _held_here)
    full, pruned = _pair()
    speed = fresh_timing.latency_speedup_in_fresh_process(
        full, pruned, torch.randn(1, 1, 16, 16), repeats=5, batch_sizes=(1, 4), rounds=1)
    assert set(speed) == {f"b{b}{s}" for b in (1, 4)
                          for s in ("", "_rounds", "_full_seconds", "_pruned_seconds")}
    assert speed["b1"] > 0 and speed["b4_full_seconds"] > 0 and len(speed["b4_rounds"]) == 1


def test_a_model_the_child_cannot_load_is_timed_here_with_a_warning(monkeypatch):
    # a class importable in this process only (as one defined in a notebook would be)
    module = types.ModuleType("s2h_user_module_only_here")

    class UserNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)

        def forward(self, x):
            return self.conv(x)

    UserNet.__qualname__, UserNet.__module__ = "UserNet", module.__name__
    module.UserNet = UserNet
    monkeypatch.setitem(sys.modules, module.__name__, module)
    here = []
    monkeypatch.setattr(fresh_timing, "latency_speedup",
                        lambda *a, **k: here.append(a) or {"b1": 2.0})  # fmt: skip
    with pytest.warns(UserWarning, match="the timing process failed.*s2h_user_module_only_here"):
        speed = fresh_timing.latency_speedup_in_fresh_process(
            UserNet(), UserNet(), torch.randn(1, 1, 8, 8), repeats=1)
    assert speed == {"b1": 2.0} and len(here) == 1


def test_a_model_that_cannot_be_saved_is_timed_here_with_a_warning(monkeypatch):
    class Local(nn.Module):  # a local class: pickle cannot name it
        def forward(self, x):
            return x

    monkeypatch.setattr(fresh_timing, "latency_speedup", lambda *a, **k: {"b1": 3.0})
    with pytest.warns(UserWarning, match="the models cannot be saved"):
        speed = fresh_timing.latency_speedup_in_fresh_process(Local(), Local(), torch.zeros(1))
    assert speed == {"b1": 3.0}


def test_latency_process_is_checked():
    with pytest.raises(ConfigError, match="latency_process must be one of fresh, same"):
        RunConfig(latency_process="child").validate()


def test_a_run_reports_latency_timed_in_a_child(tmp_path, monkeypatch):
    monkeypatch.setattr("s2hpruner.app.run.latency_speedup", _held_here)  # the in-process one
    monkeypatch.setattr(measure, "hold_freed_cpu_memory", _held_here)
    root, out = learnable_fashion_mnist(tmp_path / "fmnist"), tmp_path / "run"
    assert one_thread_run(tiny_config(tmp_path), root, out, "--target-flops", "0.5", "--epochs",
                          "1", "--batch-size", "50", "--train-subset", "200", "--val-size",
                          "100", "--latency-repeats", "2", "--no-progress") == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["latency_speedup_b1"] > 0 and report["latency_speedup_b64"] > 0
