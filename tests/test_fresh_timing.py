"""The report's latency is timed in a fresh process, which leaves the caller's allocator alone
(core.fresh_timing), and falls back to the caller's process, with a warning, when it must."""

from __future__ import annotations

import json
import sys
import types
import warnings

import pytest
import torch
from fabricate import learnable_fashion_mnist, one_thread_run, tiny_config
from torch import nn

from s2hpruner.app.config import ConfigError, RunConfig
from s2hpruner.app.models import load_factory
from s2hpruner.core import fresh_timing, measure


@pytest.fixture(autouse=True)
def process_that_has_not_timed(monkeypatch):
    """As in a process that holds nothing yet (an earlier test in this worker may have timed)."""
    monkeypatch.setattr(measure, "_allocator_held", False)


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
    with pytest.warns(UserWarning, match="the timing process failed .exit code 1: "
                      "ModuleNotFoundError.*s2h_user_module_only_here"):
        speed = fresh_timing.latency_speedup_in_fresh_process(
            UserNet(), UserNet(), torch.randn(1, 1, 8, 8), repeats=1)
    assert speed == {"b1": 2.0} and len(here) == 1


def test_a_model_that_cannot_be_saved_is_timed_here_with_a_warning(monkeypatch):
    class Local(nn.Module):  # a local class: pickle cannot name it
        def forward(self, x):
            return x

    monkeypatch.setattr(fresh_timing, "latency_speedup", lambda *a, **k: {"b1": 3.0})
    with pytest.warns(UserWarning, match="could not run in a new process.*Local"):
        speed = fresh_timing.latency_speedup_in_fresh_process(Local(), Local(), torch.zeros(1))
    assert speed == {"b1": 3.0}


def test_a_model_from_a_file_loads_from_that_file_in_the_child(tmp_path, monkeypatch, request):
    # as `--model path/to/net.py:Net` loads it: under a name the import path does not give
    (tmp_path / "net.py").write_text(
        "from torch import nn\n\n\nclass Net(nn.Sequential):\n    def __init__(self, c=8):\n"
        "        super().__init__(nn.Conv2d(1, c, 3), nn.ReLU(), nn.Conv2d(c, 4, 3))\n")
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_factory appends the file's folder
    net = load_factory(f"{tmp_path / 'net.py'}:Net")
    request.addfinalizer(lambda: sys.modules.pop(net.__module__, None))
    assert net.__module__.startswith("s2hpruner_user_net_")
    monkeypatch.setattr(fresh_timing, "latency_speedup", _held_here)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        speed = fresh_timing.latency_speedup_in_fresh_process(
            net(), net(2), torch.randn(1, 1, 12, 12), repeats=3, batch_sizes=(1,), rounds=1)
    assert speed["b1"] > 0


@pytest.mark.parametrize("why", ["off glibc", "held already"])
def test_where_nothing_would_be_held_the_timing_runs_here(monkeypatch, why):
    if why == "off glibc":
        monkeypatch.setattr(fresh_timing, "can_hold_freed_cpu_memory", lambda: False)
    else:  # as in a latency budget's run, which timed its tables in its own process
        monkeypatch.setattr(measure, "_allocator_held", True)
    monkeypatch.setattr(fresh_timing.subprocess, "run", _held_here)  # no child is started
    monkeypatch.setattr(fresh_timing, "latency_speedup", lambda *a, **k: {"b1": 4.0})
    assert fresh_timing.latency_speedup_in_fresh_process(*_pair(), torch.zeros(1)) == {"b1": 4.0}


def test_latency_process_is_checked():
    with pytest.raises(ConfigError, match="latency_process must be one of fresh, same"):
        RunConfig(latency_process="child").validate()


def _tiny_run(tmp_path, out, *flags: str) -> dict:
    """One epoch of the tiny resnet20 on fabricated Fashion-MNIST; its report."""
    root = learnable_fashion_mnist(tmp_path / "fmnist")
    assert one_thread_run(tiny_config(tmp_path), root, out, "--target-flops", "0.5", "--epochs",
                          "1", "--batch-size", "50", "--train-subset", "200", "--val-size",
                          "100", "--no-progress", *flags) == 0  # fmt: skip
    return json.loads((out / "report.json").read_text())


def test_a_run_reports_latency_timed_in_a_child(tmp_path, monkeypatch):
    monkeypatch.setattr("s2hpruner.app.run.latency_speedup", _held_here)  # the in-process one
    monkeypatch.setattr(measure, "hold_freed_cpu_memory", _held_here)
    out = tmp_path / "run"
    report = _tiny_run(tmp_path, out, "--latency-repeats", "2")
    assert report["latency_speedup_b1"] > 0 and report["latency_speedup_b64"] > 0
    # saved in the layout it was timed in: the full model's (channels_last by default), not
    # the mix of layouts torch-pruning's slicing leaves
    pruned = torch.load(out / "model_pruned.pt", weights_only=False)
    assert measure.in_memory_format(pruned, torch.channels_last)


def test_a_run_can_time_in_its_own_process(tmp_path, monkeypatch):
    timed_here = []
    monkeypatch.setattr("s2hpruner.app.run.latency_speedup_in_fresh_process", _held_here)
    monkeypatch.setattr("s2hpruner.app.run.latency_speedup",
                        lambda *a, **k: timed_here.append(a) or {"b1": 1.5, "b64": 2.5})
    report = _tiny_run(tmp_path, tmp_path / "run", "--latency-process", "same")
    assert (report["latency_speedup_b1"], report["latency_speedup_b64"]) == (1.5, 2.5)
    assert len(timed_here) == 1 and measure.in_memory_format(timed_here[0][1], torch.channels_last)
