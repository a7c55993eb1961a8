"""What a latency budget's timings decided (the tables, the whole-model timing, the
calibration, the widths skipped as slow) is the run's, not the machine's of the moment:

* a pruner restored from its state (resume, ``export``, ``eval``) times nothing and keeps the
  widths its run skipped, so its hard network is the one the run trained;
* under torchrun only rank 0 times, and every rank searches with rank 0's cost function;
* timing the tables leaves the global random streams alone.

Timings are faked (test_latency.py's timers), so nothing here depends on the machine."""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import free_port
from test_latency import FakeTimer, bumped_time, fake_truth, setup, smooth_time

from s2hpruner import S2HPruner
from s2hpruner.app.config import RunConfig
from s2hpruner.app.run import build_pruner
from s2hpruner.core.resources import latency
from s2hpruner.core.resources.latency import LatencyModel

TABLE = {"batch_size": 4, "grid_points": 3, "repeats": 3, "rounds": 1}
SPEC = SimpleNamespace(in_chans=3, image_size=8)  # test_latency's tiny_net


def bumped_at_16(cin: float, cout: float) -> float:
    """bumped_time's device, the bump on a width the app's alignment (8) keeps: the linear
    layer's 24-wide output is slower at 16 channels than at 24."""
    return smooth_time(cin, cout) + (5e-3 if cin == 32 * 4 * 4 and cout == 16 else 0.0)


def untimed(*args, **kwargs):
    raise AssertionError("a restored pruner timed something")


@pytest.fixture
def bumpy_device(monkeypatch, tmp_path):
    """A device whose linear layer is slower at 12 output channels than at 24 (so the search
    skips that width) and whose whole-network latency has a fixed part."""
    monkeypatch.setenv("S2HPRUNER_CACHE", str(tmp_path))
    monkeypatch.setattr(latency, "_time_cell", FakeTimer(bumped_time))
    monkeypatch.setattr(latency, "measure_latency", lambda *args, **kwargs: 1e-6)
    monkeypatch.setattr(LatencyModel, "measure_ratio", fake_truth)


def on_a_skipped_width(pruner: S2HPruner) -> str:
    """Point the first group with a skipped width at it (the others at full width); its name."""
    name, skipped = next(iter(pruner.slow_widths.items()))
    with torch.no_grad():
        for g, u in zip(pruner.groups, pruner.mask_parameters(), strict=True):
            u.fill_(-30.0)
            u[g.candidates.index(skipped[0]) if g.name == name else -1] = 30.0
    return name


def test_a_restored_pruner_times_nothing_and_keeps_the_widths_its_run_skipped(
    bumpy_device, monkeypatch, tmp_path
):
    net, example, groups = setup()
    trained = S2HPruner(net, example, target_latency=0.8,
                        latency_model=LatencyModel(net, example, groups, **TABLE))  # fmt: skip
    name = on_a_skipped_width(trained)
    state = copy.deepcopy(trained.state_dict())
    kept = trained.kept_widths()
    assert kept[name] not in trained.slow_widths[name]  # the hard width stepped over them

    for target in (latency, LatencyModel):  # from here on, any timing fails the test
        for attr in ("_time_cell", "measure_latency", "measure_ratio"):
            if hasattr(target, attr):
                monkeypatch.setattr(target, attr, untimed)
    net2, _, groups2 = setup()
    restored = S2HPruner(net2, example, target_latency=0.8,
                         latency_model=LatencyModel(net2, example, groups2, measure=False,
                                                    **TABLE))  # fmt: skip
    restored.load_state_dict(state)
    assert restored.slow_widths == trained.slow_widths
    assert torch.equal(restored.search.hard_candidates, trained.search.hard_candidates)
    assert restored.kept_widths() == kept
    assert restored.latency_floor == trained.latency_floor
    assert restored.latency_calibration == trained.latency_calibration
    widths = torch.tensor([g.channels * 0.6 for g in groups], dtype=torch.float64)
    assert torch.equal(restored.latency.cost(widths), trained.latency.cost(widths))
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(restored.export().eval()(x), trained.export().eval()(x))


def test_a_pruner_timed_again_elsewhere_takes_the_skipped_widths_from_its_state(
    bumpy_device, monkeypatch, tmp_path
):
    """A library user rebuilding the pruner as at first (timing on another machine, where
    nothing is slow) gets the run's widths once the state is loaded."""
    net, example, groups = setup()
    trained = S2HPruner(net, example, target_latency=0.8,
                        latency_model=LatencyModel(net, example, groups, **TABLE))  # fmt: skip
    on_a_skipped_width(trained)
    state = copy.deepcopy(trained.state_dict())
    monkeypatch.setattr(latency, "_time_cell", FakeTimer(smooth_time))
    net2, _, groups2 = setup()
    elsewhere = S2HPruner(net2, example, target_latency=0.8, latency_model=LatencyModel(
        net2, example, groups2, cache=tmp_path / "elsewhere.json", **TABLE))  # fmt: skip
    assert elsewhere.slow_widths != trained.slow_widths  # this machine would skip otherwise
    elsewhere.load_state_dict(state)
    assert elsewhere.slow_widths == trained.slow_widths
    assert elsewhere.kept_widths() == trained.kept_widths()


def run_config(cache: Path) -> RunConfig:
    return RunConfig(target_latency=0.8, latency_batch=4, latency_cache=str(cache))


def test_resume_export_and_eval_rebuild_the_pruner_without_timing(bumpy_device, monkeypatch,
                                                                  tmp_path):  # fmt: skip
    """``build_pruner`` with a checkpoint's pruner state (what ``--resume``, ``export`` and
    ``eval`` do): nothing timed, so a floor measured higher today cannot refuse the run."""
    monkeypatch.setattr(latency, "_time_cell", FakeTimer(bumped_at_16))
    cfg = run_config(tmp_path / "tables.json")
    net, _, _ = setup()
    pruner = build_pruner(cfg, net, SPEC, torch.device("cpu"))
    on_a_skipped_width(pruner)
    state = copy.deepcopy(pruner.state_dict())
    for target in (latency, LatencyModel):
        for attr in ("_time_cell", "measure_latency", "measure_ratio"):
            if hasattr(target, attr):
                monkeypatch.setattr(target, attr, untimed)
    net2, _, _ = setup()
    restored = build_pruner(cfg, net2, SPEC, torch.device("cpu"), resumed=state)
    restored.load_state_dict(state)
    assert restored.kept_widths() == pruner.kept_widths()
    assert restored.round_to == pruner.round_to


def test_a_checkpoint_from_before_the_skipped_widths_were_saved_is_timed_again(
    bumpy_device, monkeypatch, tmp_path
):
    """No ``slow_widths`` in the state (round 31 and before): rebuilt by timing, as then."""
    monkeypatch.setattr(latency, "_time_cell", FakeTimer(bumped_at_16))
    cfg = run_config(tmp_path / "tables.json")
    net, _, _ = setup()
    pruner = build_pruner(cfg, net, SPEC, torch.device("cpu"))
    state = copy.deepcopy(pruner.state_dict())
    del state["_extra_state"]["slow_widths"]
    timed = []
    monkeypatch.setattr(latency, "measure_latency", lambda *args, **kwargs: timed.append(1) or 1e-6)
    net2, _, _ = setup()
    restored = build_pruner(cfg, net2, SPEC, torch.device("cpu"), resumed=state)
    restored.load_state_dict(state)
    assert timed and restored.latency.measured
    assert restored.slow_widths == pruner.slow_widths  # (the same device, faked)


def test_a_latency_model_never_given_its_timings_is_refused_by_the_trainer(bumpy_device):
    from s2hpruner import S2HTrainer

    net, example, groups = setup()
    pruner = S2HPruner(net, example, target_latency=0.8, latency_model=LatencyModel(
        net, example, groups, measure=False, **TABLE))  # fmt: skip
    with pytest.raises(ValueError, match="load the run's pruner state"):
        S2HTrainer(net, pruner, torch.optim.SGD(net.parameters(), lr=0.1), 8)


def test_timing_the_tables_leaves_the_random_streams_alone(bumpy_device):
    """Cells get random weights and inputs; only a cold cache draws them, which must not
    change a run's data order or initialisation."""
    net, example, groups = setup()
    torch.manual_seed(3)
    before = torch.get_rng_state()
    LatencyModel(net, example, groups, **TABLE)
    assert torch.equal(torch.get_rng_state(), before)


def ranks_worker(rank: int, port: int, folder: str) -> None:
    """Rank 0 times a bumpy device; rank 1 must time nothing at all."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)  # fmt: skip
    try:
        torch.set_num_threads(1)
        if rank == 0:
            latency._time_cell = FakeTimer(bumped_at_16)
            latency.measure_latency = lambda *args, **kwargs: 1e-6
            latency.latency_ratio = lambda full, pruned, *args: (fake_truth(None, full, pruned),)
        else:
            latency._time_cell = latency.measure_latency = latency.latency_ratio = untimed
        cfg = run_config(Path(folder) / f"cache{rank}.json")
        net, _, _ = setup()
        pruner = build_pruner(cfg, net, SPEC, torch.device("cpu"))
        torch.save({"state": pruner.state_dict(), "slow": pruner.slow_widths,
                    "hard": pruner.search.hard_candidates},
                   Path(folder) / f"rank{rank}.pt")  # fmt: skip
    finally:
        dist.destroy_process_group()


def test_under_torchrun_only_rank_0_times_and_every_rank_searches_alike(tmp_path):
    mp.spawn(ranks_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    zero, one = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert zero["slow"] and zero["slow"] == one["slow"]
    assert torch.equal(zero["hard"], one["hard"])
    assert zero["state"].keys() == one["state"].keys()
    for key, value in zero["state"].items():
        if torch.is_tensor(value):
            assert torch.equal(value, one["state"][key]), key
        else:
            assert value == one["state"][key], key


def test_a_latency_budget_missed_at_the_freeze_is_warned_about(bumpy_device, monkeypatch):
    """A device that measures every frozen network at 0.95 of the full model's latency
    (target 0.8): the closest check is kept, and the user is told the budget is missed."""
    from s2hpruner import S2HTrainer

    net, example, groups = setup()
    pruner = S2HPruner(net, example, target_latency=0.8,
                       latency_model=LatencyModel(net, example, groups, **TABLE))  # fmt: skip
    monkeypatch.setattr(LatencyModel, "measure_ratio", lambda *args, **kwargs: 0.95)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    trainer = S2HTrainer(net, pruner, optimizer, 8)
    with pytest.warns(UserWarning, match="latency budget is missed: .* measured 0.950"):
        trainer._meet_measured_latency()
