"""Latency resource: tables, interpolation, gradient, cache. Table timings are faked (a known
function of the cell's widths) so that nothing asserts wall-clock values."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from s2hpruner.core.resources import latency
from s2hpruner.core.resources.latency import LatencyModel, bilinear, measure_latency, monotone
from s2hpruner.core.structure import find_groups


def tiny_net() -> nn.Sequential:
    """conv -> depthwise -> strided conv -> flatten -> linear -> linear (a flattened map).

    The depthwise conv alone has a 5x5 kernel: at width 1 it is an ordinary 1->1 conv, and the
    fake timer tells it apart by its kernel."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 5, padding=2, groups=16), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 24), nn.ReLU(), nn.Linear(24, 10),
    )  # fmt: skip


def setup(model: nn.Module | None = None):
    model = model or tiny_net()
    example = torch.randn(2, 3, 8, 8)
    groups, _ = find_groups(model, example, None, (), 32)
    return model, example, [g for g in groups if len(g.candidates) > 1]


def cell_widths(cell: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(in, out) widths of a timed cell; 0 input width for a depthwise conv (one axis)."""
    layer = cell[0] if isinstance(cell, nn.Sequential) else cell
    cin = x.shape[-1] if isinstance(layer, nn.Linear) else x.shape[1]
    depthwise = getattr(layer, "kernel_size", None) == (5, 5)
    return 0 if depthwise else cin, layer.weight.shape[0]


def smooth_time(cin: float, cout: float) -> float:
    """Bilinear in (cin, cout), so bilinear interpolation reproduces it everywhere."""
    return 1e-6 * (1 + cin + 2 * cout + cin * cout / 8)


class FakeTimer:
    def __init__(self, fn=smooth_time):
        self.fn, self.calls = fn, 0

    def __call__(self, cell, x, repeats):
        self.calls += 1
        return self.fn(*cell_widths(cell, x))


@pytest.fixture
def fake(monkeypatch, tmp_path):
    timer = FakeTimer()
    monkeypatch.setattr(latency, "_time_cell", timer)
    monkeypatch.setattr(latency, "measure_latency", lambda *args, **kwargs: 1.0)
    monkeypatch.setenv("S2HPRUNER_CACHE", str(tmp_path))
    return timer


def build(example_model=None, **kwargs) -> LatencyModel:
    model, example, groups = setup(example_model)
    options = {"batch_size": 4, "grid_points": 3, "repeats": 3, "rounds": 1} | kwargs
    return LatencyModel(model, example, groups, **options)


def widths_of(model, groups, a, b, c) -> torch.Tensor:
    """Group widths from the widths of conv 0 (and the depthwise), conv 6 and linear 10."""
    by_producer = {p.module_name: i for i, g in enumerate(groups) for p in g.producers}
    widths = torch.zeros(len(groups), dtype=torch.float64)
    widths[by_producer["0"]], widths[by_producer["6"]], widths[by_producer["10"]] = a, b, c
    return widths


def test_interpolation_exact_at_grid_points_and_linear_between():
    torch.manual_seed(0)
    in_grid = torch.tensor([1.0, 3.0, 7.0, 16.0], dtype=torch.float64)
    out_grid = torch.tensor([2.0, 5.0, 9.0], dtype=torch.float64)
    table = torch.rand(4, 3, dtype=torch.float64)
    ins, outs = torch.meshgrid(in_grid, out_grid, indexing="ij")
    at_points = bilinear(in_grid, out_grid, table, ins.flatten(), outs.flatten())
    torch.testing.assert_close(at_points, table.flatten(), rtol=0, atol=1e-15)
    for t in (0.25, 0.5, 0.9):  # linear along an edge, bilinear inside a cell
        x, y = torch.tensor([3 + 4 * t]), torch.tensor([5 + 4 * t])
        edge = bilinear(in_grid, out_grid, table, x, torch.tensor([5.0]))
        torch.testing.assert_close(edge, (1 - t) * table[1, 1:2] + t * table[2, 1:2])
        inside = bilinear(in_grid, out_grid, table, x, y)
        corners = table[1:3, 1:3]
        expected = ((1 - t) * (1 - t) * corners[0, 0] + (1 - t) * t * corners[0, 1]
                    + t * (1 - t) * corners[1, 0] + t * t * corners[1, 1])  # fmt: skip
        torch.testing.assert_close(inside, expected.reshape(1))


def test_cost_follows_the_tables_at_any_width(fake):
    model, _, groups = setup()
    lm = build()
    assert lm.correction == 1.0 and lm.measured_full == 1.0
    sigs = [json.loads(key) for key in lm.signatures]
    assert [s["grids"][0] for s in sigs if s["depthwise"]] == [[16]]  # one axis: in == out
    flat = next(s["grids"][0] for s in sigs if s["in"] == 512)
    assert all(v % 16 == 0 for v in flat) and flat[-1] == 512  # snapped to reachable widths

    def tables(a, b, c):  # conv0, depthwise, conv6, flattened linear, last linear
        terms = [(3, a), (0, a), (a, b), (16 * b, c), (c, 10)]
        return sum(smooth_time(i, o) for i, o in terms)

    def activations(a, b, c):  # output elements at batch 4: 8x8, 8x8, 4x4, 1, 1 positions
        return 4 * (64 * a + 64 * a + 16 * b + c + 10)

    fixed = 1.0 - tables(16, 32, 24)  # the measured whole model takes 1 s
    for a, b, c in [(16, 32, 24), (1, 1, 1), (8, 16, 12), (5.5, 20.25, 3.7)]:
        cost = lm.cost(widths_of(model, groups, a, b, c))
        scaled = fixed * activations(a, b, c) / activations(16, 32, 24)
        assert float(cost) == pytest.approx(tables(a, b, c) + scaled, rel=1e-12)
    assert float(lm.cost(lm.channels)) == pytest.approx(lm.full, rel=1e-12)
    assert float(lm.ratio(lm.channels)) == pytest.approx(1.0, rel=1e-12)
    assert all(lm.is_monotone)


def test_correction_when_layers_alone_exceed_the_model(monkeypatch, fake):
    monkeypatch.setattr(latency, "measure_latency", lambda *args, **kwargs: 1e-9)
    lm = build()
    assert lm.fixed_part == 0.0 and lm.correction < 1.0
    assert lm.full == pytest.approx(1e-9, rel=1e-12)
    assert float(lm.cost(lm.channels / 2)) < lm.full


def test_gradient_and_monotone_tables(fake):
    model, _, groups = setup()
    lm = build()
    widths = widths_of(model, groups, 6.3, 11.1, 9.9).requires_grad_()
    lm.cost(widths).backward()
    assert torch.isfinite(widths.grad).all() and (widths.grad > 0).all()
    low, high = widths_of(model, groups, 4, 10, 8), widths_of(model, groups, 12, 30, 20)
    for g in range(len(groups)):  # monotone tables: raising any one width never costs less
        raised = low.clone()
        raised[g] = high[g]
        assert float(lm.cost(raised)) >= float(lm.cost(low))


def test_non_monotone_table_keeps_values_but_gives_non_negative_gradient(monkeypatch, fake):
    def bumpy(cin, cout):  # output width 16 measured faster than 8: an alignment effect
        return smooth_time(cin, cout) + (5e-5 if cout == 8 else 0.0)

    monkeypatch.setattr(latency, "_time_cell", FakeTimer(bumpy))
    model, _, groups = setup()
    lm = build()
    assert not all(lm.is_monotone)
    k = lm.is_monotone.index(False)
    raw, smooth = getattr(lm, f"table_{k}")
    assert (smooth.diff(dim=0) >= 0).all() and (smooth.diff(dim=1) >= 0).all()
    assert torch.equal(monotone(smooth), smooth)
    widths = widths_of(model, groups, 12.0, 20.0, 12.0).requires_grad_()
    lm.cost(widths).backward()
    assert torch.isfinite(widths.grad).all() and (widths.grad >= 0).all()


def stair_timer(jump: float):
    """Kernels that handle 16 channels at once: the strided conv costs ``jump`` more from 17
    output channels on; everything else is linear in the widths."""

    def timer(cell, x, repeats):
        layer = cell[0] if isinstance(cell, nn.Sequential) else cell
        cin, cout = cell_widths(cell, x)
        edge = jump if getattr(layer, "stride", None) == (2, 2) and cout > 16 else 0.0
        return 1e-6 * (1 + cin + cout) + edge

    return timer


def test_a_staircase_prices_the_step_a_kept_width_takes_not_the_edge_of_a_stair(
    monkeypatch, fake, tmp_path
):
    """With kept widths moving by 8, narrowing the strided conv from 16 or from 24 channels
    saves jump / 16 per channel over a step either side. The tables' slope says the whole
    jump (charged to channel 17) at 16, and nothing at 24: a search led by it cuts the one
    far harder than a step saves and never cuts the other."""
    model, _, groups = setup()
    g = next(i for i, grp in enumerate(groups) if grp.producers[0].module_name == "6")
    jump, grads = 1e-3, {}
    for j in (0.0, jump):
        monkeypatch.setattr(latency, "_time_cell", stair_timer(j))
        lm = build(grid_points=8, cache=tmp_path / f"{j}.json")
        sigs = [json.loads(key) for key in lm.signatures]
        strided = next(sig for sig in sigs if sig.get("stride") == [2, 2])
        assert {16, 17, 24} <= set(strided["grids"][1])  # the stair's edge is on the grid
        for steps in (None, [8] * len(groups)):
            lm.price_steps(steps)
            for b in (16, 24):
                widths = widths_of(model, groups, 12, b, 16).requires_grad_()
                value = lm.table_sum(widths)
                value.backward()
                grads[j, steps is None, b] = float(widths.grad[g])
                lm.price_steps(None)
                assert float(value) == float(lm.table_sum(widths.detach()))  # value unchanged
                lm.price_steps(steps)
    stair = {key: grads[(jump, *key)] - grads[(0.0, *key)] for key in
             [(True, 16), (True, 24), (False, 16), (False, 24)]}  # fmt: skip
    assert stair[True, 16] == pytest.approx(jump, rel=1e-6)  # the slope: all on one channel
    assert stair[True, 24] == pytest.approx(0.0, abs=1e-12)
    assert stair[False, 16] == pytest.approx(jump / 16, rel=1e-6)  # the step's price
    assert stair[False, 24] == pytest.approx(jump / 16, rel=1e-6)


def test_the_pruner_prices_latency_by_the_step_its_kept_widths_take(fake, monkeypatch):
    from s2hpruner import S2HPruner

    monkeypatch.setattr(LatencyModel, "measure_ratio", fake_truth)
    net, example, groups = setup()
    table = LatencyModel(net, example, groups, batch_size=4, grid_points=3, repeats=3, rounds=1)
    pruner = S2HPruner(net, example, target_latency=0.9, latency_model=table, round_to=4)
    expected = [4 if g.kind == "channels" else g.step for g in pruner.groups]
    assert pruner.latency.steps.tolist() == expected


def test_cache_is_reused_and_keyed(fake, tmp_path):
    build()
    assert fake.calls > 0 and (tmp_path / "latency.json").exists()
    first = fake.calls
    again = build()
    assert fake.calls == first  # every table came from the cache
    assert not list(tmp_path.glob("*.tmp"))
    build(batch_size=8)
    assert fake.calls > first  # another batch size is another key
    data = json.loads((tmp_path / "latency.json").read_text())
    assert {json.loads(key)["batch"] for key in data} == {4, 8}
    elsewhere = build(cache=tmp_path / "sub" / "own.json")
    assert (tmp_path / "sub" / "own.json").exists()
    assert elsewhere.full == again.full


def test_real_timings(tmp_path, monkeypatch):
    monkeypatch.setenv("S2HPRUNER_CACHE", str(tmp_path))
    model, example, groups = setup()
    seconds = measure_latency(model, example, batch_size=4, repeats=3)
    assert isinstance(seconds, float) and seconds > 0
    lm = LatencyModel(model, example, groups, batch_size=4, grid_points=3, repeats=3, rounds=1,
                      progress=True)  # fmt: skip
    assert lm.measured_full > 0 and lm.correction > 0
    assert float(lm.cost(lm.channels)) == pytest.approx(lm.full, rel=1e-9)
    widths = (lm.channels / 2).float().requires_grad_()
    cost = lm.cost(widths)
    cost.backward()
    assert torch.isfinite(widths.grad).all() and math.isfinite(cost.detach().item())
    report = lm.validate(model, lm.channels)
    assert report["measured"] > 0 and report["predicted"] == pytest.approx(lm.full)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cost_on_cuda(fake):
    lm = build().cuda()
    widths = (lm.channels / 2).float().requires_grad_()
    lm.cost(widths).backward()
    assert torch.isfinite(widths.grad).all()


def test_latency_state_round_trips_for_resume(fake, monkeypatch):
    """The whole-model timing travels with the tables in the state dict, so a resumed run
    keeps the same cost function even if the machine times differently now."""
    first = build()
    state = first.state_dict()
    monkeypatch.setattr(latency, "measure_latency", lambda *args, **kwargs: 3.0)
    second = build()
    assert second.measured_full == 3.0
    second.load_state_dict(state)
    assert second.measured_full == first.measured_full and second.full == first.full
    w = torch.tensor([float(g.channels) / 2 for g in setup()[2]], dtype=torch.float64)
    assert torch.equal(second.cost(w), first.cost(w))


class StepLatency(nn.Module):
    """A latency model whose table has an alignment bump: a 16-channel group at 9-12 costs more
    than at 16 (as a 9-channel conv can, on a vector unit 8 or 16 channels wide)."""

    def __init__(self, channels: list[int], bumped: int):
        super().__init__()
        self.full, self.bumped = float(sum(channels)), bumped

    def cost(self, widths: torch.Tensor) -> torch.Tensor:
        w = widths[self.bumped]
        return widths.sum() + ((w >= 9) & (w <= 12)).to(widths.dtype) * 20.0


def test_slow_widths_are_skipped_and_export_stays_exact():
    from s2hpruner import S2HPruner
    from s2hpruner.app.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1).eval()
    x = torch.randn(4, 1, 16, 16)

    def table(model, example, groups):
        bumped = next(i for i, g in enumerate(groups) if g.channels == 16)
        return StepLatency([g.channels for g in groups], bumped)

    pruner = S2HPruner(model, x[:1], target_latency=0.6, latency_model=table)
    first = pruner.groups[pruner.latency.bumped]
    assert pruner.slow_widths == {first.name: [9, 10, 11, 12]}
    with torch.no_grad():  # expected width 10 for group 0: its hard width skips to 13
        for g, u in zip(pruner.groups, pruner.mask_parameters(), strict=True):
            u.fill_(-30.0)
            u[g.candidates.index(10) if g is first else -1] = 30.0
    assert pruner.kept_widths()[first.name] == 13
    with pruner.mode("hard"):
        hard = model(x)
    assert torch.allclose(pruner.export().eval()(x), hard, atol=1e-5)
    unskipped = S2HPruner(model, x[:1], target_latency=0.6, latency_model=table,
                          skip_slow_widths=False)  # fmt: skip
    assert unskipped.slow_widths == {}


def bumped_time(cin: float, cout: float) -> float:
    """smooth_time, with an alignment bump: the linear layer's 24-wide output (``cout`` of the
    last group) is slower at 12 channels than at 24."""
    return smooth_time(cin, cout) + (5e-3 if cin == 32 * 4 * 4 and cout == 12 else 0.0)


@pytest.mark.parametrize("predictor", ["auto", "tables", "flops"])
def test_the_tables_skip_slow_widths_whatever_feature_steers_the_search(
    fake, monkeypatch, predictor
):
    """A FLOPs-shaped cost is monotone, so it would never skip a width; the tables see the
    bump and skip it under every ``--latency-predictor``."""
    from s2hpruner import S2HPruner

    monkeypatch.setattr(latency, "_time_cell", FakeTimer(bumped_time))
    # the whole network no slower than its table layers: no untimed part to hide the bump
    monkeypatch.setattr(latency, "measure_latency", lambda *args, **kwargs: 1e-6)
    monkeypatch.setattr(LatencyModel, "measure_ratio", fake_truth)
    net, example, groups = setup()
    linear = next(g for g in groups if g.producers[0].module_name == "10")
    table = LatencyModel(net, example, groups, batch_size=4, grid_points=3, repeats=3, rounds=1,
                         predictor=predictor)  # fmt: skip
    pruner = S2HPruner(net, example, target_latency=0.8, latency_model=table)
    if predictor != "auto":  # (auto follows this fake device's FLOPs-like latency)
        assert pruner.latency.predictor == predictor
    skipped = pruner.slow_widths.get(linear.name, [])
    assert 12 in skipped and 1 not in skipped and 24 not in skipped


def test_fit_through_measured_networks(fake):
    """One measured network: the refitted cost predicts it exactly and keeps the full one.
    More: the slope is their median, so one wild timing barely moves it."""
    model, _, groups = setup()
    lm = build()
    half = lm.channels / 2
    before = float(lm.ratio(half))
    result = lm.fit(half, before + 0.1)  # the network measured slower than the tables say
    assert result["predicted_ratio_before"] == pytest.approx(before)
    assert float(lm.ratio(half)) == pytest.approx(before + 0.1, rel=1e-9)
    assert float(lm.cost(lm.channels)) == pytest.approx(lm.measured_full, rel=1e-12)
    quarter = lm.channels / 4
    lm.fit(quarter, float(lm.ratio(quarter)))  # agrees with the line: same slope
    lm.fit(half, 5.0)  # a wild timing (slower than the full network): one of three points
    assert float(lm.ratio(half)) == pytest.approx(before + 0.1, rel=1e-9)
    widths = (lm.channels / 3).requires_grad_()
    lm.cost(widths).backward()
    assert (widths.grad >= 0).all() and widths.grad.sum() > 0  # narrower is still cheaper


def test_fit_never_makes_the_smallest_network_free(fake):
    lm = build()
    lm.fit(lm.channels / 2, 0.01)  # a timing glitch
    assert float(lm.ratio(torch.ones_like(lm.channels))) > 0.0
    lm.fit(lm.channels / 2, 1.5)  # narrower slower than full: slope kept positive
    assert float(lm.ratio(lm.channels / 2)) < 1.0


def exported_flops_ratio(full: nn.Module, pruned: nn.Module) -> float:
    from s2hpruner import count_flops

    x = torch.randn(1, 3, 8, 8)
    return count_flops(pruned, x) / count_flops(full, x)


def fake_truth(self, full, pruned, rounds=5):
    """A device whose latency has a fixed part the per-layer tables do not see."""
    return 0.45 + 0.55 * exported_flops_ratio(full, pruned)


def test_measured_feedback_meets_a_latency_the_tables_mispredict(fake, monkeypatch):
    """The device's true latency (faked: 0.45 + 0.55 x the exported network's FLOPs ratio, a
    fixed cost the per-layer tables do not see) differs from the tables' prediction. With
    measured feedback (before the search, during it, and when the widths freeze) the
    exported network meets the budget in the true latency; the tables alone miss it."""
    from s2hpruner import S2HPruner, S2HTrainer

    truth = fake_truth
    monkeypatch.setattr(LatencyModel, "measure_ratio", truth)
    model, example, groups = setup()
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))

    def run(feedback: bool) -> tuple[float, S2HPruner]:
        torch.manual_seed(0)
        net = tiny_net()
        table = LatencyModel(net, example, setup(net)[2], batch_size=4, grid_points=3,
                             repeats=3, rounds=1)  # fmt: skip
        if not feedback:  # the tables alone: nothing is measured but the full network
            monkeypatch.setattr(S2HPruner, "_calibrate_latency", lambda self: None)
        pruner = S2HPruner(net, example, target_latency=0.7, latency_model=table)
        trainer = S2HTrainer(net, pruner, torch.optim.SGD(net.parameters(), lr=0.01), 30,
                             latency_feedback=3 if feedback else 0)  # fmt: skip
        trainer.latency_feedback = feedback
        for _ in range(30):
            trainer.step(x, y)
        return truth(None, net, trainer.export()), pruner

    measured, pruner = run(feedback=True)
    assert measured == pytest.approx(0.7, abs=0.02)
    assert pruner.ratio("hard", "latency") == pytest.approx(measured, abs=0.05)  # the model
    whens = [c["when"] for c in pruner.latency_calibration]
    assert whens.count("search") == 3 and "build" in whens and "freeze" in whens
    assert pruner.latency_floor == pytest.approx(0.45 + 0.55 * pruner.min_ratio("flops"))
    open_loop, _ = run(feedback=False)
    assert abs(open_loop - 0.7) > 0.05  # the check above could fail


@pytest.mark.parametrize("flops", [0.4, 0.8])
def test_latency_with_flops_budget_meets_both(fake, monkeypatch, flops):
    """Latency and FLOPs together: whichever binds is met, the other is not exceeded (the
    latency in the device's measured terms, faked as above)."""
    from s2hpruner import S2HPruner, S2HTrainer

    monkeypatch.setattr(LatencyModel, "measure_ratio", fake_truth)
    torch.manual_seed(0)
    net, example = tiny_net(), torch.randn(2, 3, 8, 8)
    table = LatencyModel(net, example, setup(net)[2], batch_size=4, grid_points=3, repeats=3,
                         rounds=1)  # fmt: skip
    pruner = S2HPruner(net, example, target_latency=0.75, target_flops=flops,
                       latency_model=table)  # fmt: skip
    trainer = S2HTrainer(net, pruner, torch.optim.SGD(net.parameters(), lr=0.01), 10)
    trainer.freeze_widths()
    exported = trainer.export()
    latency, flops_ratio = fake_truth(None, net, exported), exported_flops_ratio(net, exported)
    assert latency <= 0.75 + 0.02 and flops_ratio <= flops + 0.02
    if flops == 0.4:  # FLOPs bind (0.4 FLOPs is 0.67 latency on this device)
        assert flops_ratio == pytest.approx(0.4, abs=0.02) and latency < 0.72
    else:
        assert latency == pytest.approx(0.75, abs=0.02) and flops_ratio < 0.7


def test_latency_budget_aligns_widths_by_default_and_falls_back_when_it_cannot(
    fake, monkeypatch, tmp_path
):
    """The application's default under a latency budget: kept widths are multiples of 8.
    A target only unaligned widths can reach builds unaligned, with a warning (an error is
    for a contradiction the user wrote: an explicit --round-to 8 at that target)."""
    from s2hpruner import count_flops
    from s2hpruner.app.config import RunConfig
    from s2hpruner.app.data import dataset_spec
    from s2hpruner.app.run import LATENCY_ROUND_TO, build_model, build_pruner
    from s2hpruner.core.errors import BudgetError

    def truth(self, full, pruned, rounds=5):  # as fake_truth, on digits' 1-channel images
        x = torch.randn(1, 1, 8, 8)
        return 0.45 + 0.55 * count_flops(pruned, x) / count_flops(full, x)

    monkeypatch.setattr(LatencyModel, "measure_ratio", truth)
    spec, device = dataset_spec("digits"), torch.device("cpu")

    def pruner_at(target: float, resumed: dict | None = None, **changes):
        cfg = RunConfig(dataset="digits", target_latency=target, latency_batch=4,
                        latency_cache=str(tmp_path / "tables.json"), progress=False,
                        channels_last=False, **changes)  # fmt: skip
        torch.manual_seed(0)
        return build_pruner(cfg, build_model(cfg, spec, device), spec, device, resumed)

    aligned = pruner_at(0.8)
    assert aligned.round_to == LATENCY_ROUND_TO == 8
    widths = aligned.search.hard_candidates  # every width a kept (hard) group may take
    assert bool((widths % 8 == 0).all()) and widths.min() == 8, widths
    every = pruner_at(0.8, round_to=1)  # 1: every width allowed, down to a single channel
    assert every.latency_floor < aligned.latency_floor
    between = (every.latency_floor + aligned.latency_floor) / 2
    with pytest.warns(UserWarning, match="keeps unaligned widths"):
        fallback = pruner_at(between)
    assert fallback.round_to is None and fallback.latency_floor < between
    with pytest.raises(BudgetError, match="below"):
        pruner_at(between, round_to=8)
    # a resumed run keeps its checkpoint's alignment (its pruner's state dict, as saved),
    # whatever the timings say now, and loads that state
    for saved in (aligned, fallback):
        state = saved.state_dict()
        resumed = pruner_at(0.8, resumed=state)
        assert resumed.round_to == saved.round_to
        resumed.load_state_dict(state)


HOLD_PROBE = """
import ctypes, json, torch
from s2hpruner.core.measure import hold_freed_cpu_memory

class Info(ctypes.Structure):  # glibc's struct mallinfo2
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(n, ctypes.c_size_t) for n in names.split()]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info

def tensor_mmapped_and_kept():
    before = libc.mallinfo2()
    t = torch.empty(16 * 2**20)  # 64 MiB: above glibc's largest adaptive mmap threshold
    during = libc.mallinfo2()
    del t
    after = libc.mallinfo2()
    return during.hblkhd - before.hblkhd, after.fordblks - before.fordblks

out = {"default": tensor_mmapped_and_kept(), "held": hold_freed_cpu_memory()}
out["after"] = tensor_mmapped_and_kept()
print(json.dumps(out))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "confstr")
                    or "glibc" not in (__import__("os").confstr("CS_GNU_LIBC_VERSION") or ""),
                    reason="glibc's malloc only")  # fmt: skip
def test_held_cpu_memory_stays_in_the_heap_so_timings_do_not_depend_on_history():
    """By default glibc hands a large tensor its own mmap and gives it back when freed (so the
    next forward page-faults again, depending on the thresholds the past adapted); held, the
    tensor comes from the heap and its memory stays there for the next one."""
    import subprocess
    import sys

    out = json.loads(subprocess.run([sys.executable, "-c", HOLD_PROBE], capture_output=True,
                                    text=True, check=True).stdout)  # fmt: skip
    mmapped, kept = out["default"]
    assert mmapped >= 64 * 2**20 and kept < 2**20
    assert out["held"] is True
    mmapped, kept = out["after"]
    assert mmapped == 0 and kept > 48 * 2**20  # (free heap memory was there before too)


@pytest.mark.parametrize("truth", ["tables", "proxy"])
def test_fit_keeps_the_predictor_that_explains_the_measured_networks(fake, truth):
    """Networks measured on a device whose latency follows a proxy (a made-up cost, not the
    tables) make the fit switch to the proxy and then predict new networks by it; networks
    that follow the tables keep the tables. Resume keeps the choice."""
    lm = build()

    def proxy(w: torch.Tensor) -> torch.Tensor:
        return ((w / lm.channels) ** 2).mean()

    lm.add_proxy("proxy", proxy)
    gen = torch.Generator().manual_seed(0)

    def network() -> torch.Tensor:
        return (lm.channels * (0.2 + 0.7 * torch.rand(len(lm.channels), generator=gen))).round()

    def true_ratio(w: torch.Tensor) -> float:
        return 1.0 - 0.6 * (1.0 - float(lm.feature(w, "tables" if truth == "tables" else "proxy")))

    for _ in range(4):
        w = network()
        result = lm.fit(w, true_ratio(w))
    assert result["predictor"] == lm.predictor == truth
    for _ in range(5):  # networks it has not seen
        w = network()
        assert float(lm.ratio(w)) == pytest.approx(true_ratio(w), rel=1e-6)
    widths = (lm.channels / 2).requires_grad_()
    lm.cost(widths).backward()
    assert torch.isfinite(widths.grad).all() and widths.grad.sum() > 0
    again = build()
    again.add_proxy("proxy", proxy)
    again.load_state_dict(lm.state_dict())
    assert again.predictor == truth
    w = network()
    assert float(again.cost(w)) == pytest.approx(float(lm.cost(w)), rel=1e-12)


def test_a_checkpoint_from_before_the_proxies_resumes_with_the_same_cost(fake):
    """Older checkpoints stored ``correction`` per second of the uncorrected tables and the
    points as [shrink, measured] pairs; they load into the same cost function."""
    lm = build()
    lm.fit(lm.channels / 2, 0.7)
    state = lm.state_dict()
    key = next(k for k in state if k.endswith("_extra_state"))
    extra = dict(state[key])
    old = {k: v for k, v in extra.items() if k not in ("raw_full", "predictor", "points")}
    old["correction"] = extra["correction"] / extra["raw_full"]
    old["points"] = [[p["shrink"]["tables"], p["measured"]] for p in extra["points"]]
    again = build()
    again.load_state_dict({**state, key: old})
    w = lm.channels / 3
    assert float(again.cost(w)) == pytest.approx(float(lm.cost(w)), rel=1e-12)
    shrink = lm.points[0]["shrink"]["tables"]
    assert again.points == [{"measured": 0.7, "shrink": {"tables": shrink}}]


class _DriftingHost:
    """A fake clock on a host whose speed changes every ``period`` forwards (other tenants):
    a network's forward costs ``work`` units times the current slowdown."""

    def __init__(self, period: int = 20) -> None:
        self.now, self.forwards, self.period = 0.0, 0, period

    def perf_counter(self) -> float:
        return self.now

    def network(self, work: float) -> nn.Module:
        host = self

        class Timed(nn.Module):
            def forward(self, x):
                host.forwards += 1
                host.now += work * (3.0 if (host.forwards // host.period) % 2 else 1.0)
                return x

        return Timed()


def test_latency_ratio_cancels_a_drifting_host(monkeypatch):
    """Timed in blocks, a network run while the host is slow looks 3x slower than the other;
    alternating forwards pair each full forward with a pruned one at the same host speed."""
    from s2hpruner.core import measure

    host = _DriftingHost()
    monkeypatch.setattr(measure, "time", host)
    full, pruned = host.network(2.0), host.network(1.0)
    ratio, rounds, full_s, pruned_s = measure.latency_ratio(full, pruned, torch.zeros(1),
                                                            repeats=10, rounds=5)  # fmt: skip
    assert ratio == pytest.approx(0.5)
    assert len(rounds) == 5 and all(r == pytest.approx(0.5) for r in rounds)
    assert 2.0 <= full_s <= 6.0 and 1.0 <= pruned_s <= 3.0
    # the same host timed network by network (each a median of 10 forwards): rounds off by 3x
    blocked = [measure.median_latency(pruned, torch.zeros(1), 10)
               / measure.median_latency(full, torch.zeros(1), 10) for _ in range(5)]  # fmt: skip
    assert max(blocked) / min(blocked) >= 3.0


@pytest.mark.parametrize("fixed", ["tables", "proxy"])
def test_a_fixed_predictor_is_kept_whatever_the_measured_networks_follow(fake, fixed):
    """``predictor=`` fixes the cost's shape (``--latency-predictor``): networks that follow the
    other feature move its scale, never its shape; ``auto`` would have switched."""
    lm = build(predictor=fixed)

    def proxy(w: torch.Tensor) -> torch.Tensor:
        return ((w / lm.channels) ** 2).mean()

    lm.add_proxy("proxy", proxy)
    other = "proxy" if fixed == "tables" else "tables"
    gen = torch.Generator().manual_seed(0)
    assert float(lm.ratio(lm.channels)) == pytest.approx(1.0)
    for _ in range(4):  # a device whose latency follows the other feature
        w = (lm.channels * (0.2 + 0.7 * torch.rand(len(lm.channels), generator=gen))).round()
        result = lm.fit(w, 1.0 - 0.6 * (1.0 - float(lm.feature(w, other))))
    assert result["predictor"] == lm.predictor == fixed
    w = (lm.channels / 2).round()
    slope = (1.0 - float(lm.ratio(w))) / (1.0 - float(lm.feature(w, fixed)))
    for _ in range(3):  # the line through the full network, along the fixed feature
        w = (lm.channels * (0.2 + 0.7 * torch.rand(len(lm.channels), generator=gen))).round()
        assert 1.0 - float(lm.ratio(w)) == pytest.approx(
            slope * (1.0 - float(lm.feature(w, fixed))), rel=1e-9)


def test_an_unknown_latency_predictor_is_refused_early(fake):
    from s2hpruner import S2HPruner

    model, example, _ = setup()
    with pytest.raises(ValueError, match="latency predictor 'params' is not offered"):
        S2HPruner(model, example, target_latency=0.5,
                  latency_model=lambda m, x, g: LatencyModel(m, x, g, predictor="params",
                                                             batch_size=4, repeats=3, rounds=1))


def test_the_frozen_widths_aim_by_the_measured_slope_once_two_checks_exist():
    """The freeze checks' next aim: the last miss at first; then the miss scaled down by how
    far the measured ratio moved per unit of aim (a model whose slope is off would otherwise
    overshoot back and forth), never up; a pair that moved in opposite directions (noise)
    gives no slope; never more than a fifth of the target away from it."""
    from s2hpruner.core.trainer import next_latency_aim

    assert next_latency_aim([(0.5, 0.54)], 0.5) == pytest.approx(0.46)
    # the aim fell by 0.04 and the measured ratio by 0.21: aim 0.17 * 0.04 / 0.21 higher
    secant = next_latency_aim([(0.5, 0.54), (0.46, 0.33)], 0.5)
    assert secant == pytest.approx(0.46 + 0.17 * 0.04 / 0.21)
    assert next_latency_aim([(0.5, 0.46), (0.54, 0.45)], 0.5) == pytest.approx(0.59)
    # the measured ratio moved less than the aim (noise can fake that): one miss, no more
    assert next_latency_aim([(0.673, 0.676), (0.686, 0.679)], 0.7) == pytest.approx(0.707)
    assert next_latency_aim([(0.5, 0.2)], 0.5) == pytest.approx(0.6)
    assert next_latency_aim([(0.5, 0.95)], 0.5) == pytest.approx(0.4)


def test_a_cuda_timing_waits_for_the_timed_device(monkeypatch):
    """A model on cuda:1 is timed until cuda:1 is done, not the current device (cuda:0),
    which would time only the kernel launches."""
    from types import SimpleNamespace

    from s2hpruner.core import measure

    waited = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    x = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    measure._seconds(lambda inputs: None, x)
    assert waited == [torch.device("cuda", 1)]


class GroupedNet(nn.Module):
    """ResNeXt's pattern: a grouped 3x3 conv (4 groups) between 1x1 convs."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 1)
        self.bn0 = nn.BatchNorm2d(32)
        self.grouped = nn.Conv2d(32, 64, 3, padding=1, groups=4)
        self.bn1 = nn.BatchNorm2d(64)
        self.head = nn.Linear(64, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.grouped(torch.relu(self.bn0(self.stem(x))))))
        return self.head(x.mean((2, 3)))


def test_a_grouped_conv_is_timed_as_a_grouped_conv_at_widths_it_can_be_pruned_to(
    fake, monkeypatch
):
    """It was refused; its cells are now g-group convs with both widths multiples of g, and
    the model prices it from those tables like any other layer."""
    built = []
    real_cell = latency._cell
    monkeypatch.setattr(latency, "_cell", lambda *a: built.append(real_cell(*a)) or built[-1])
    torch.manual_seed(0)
    model = GroupedNet()
    lm = build(model)
    sig = next(json.loads(k) for k in lm.signatures if json.loads(k).get("groups"))
    assert sig["groups"] == 4 and not sig["depthwise"]
    assert all(v % 4 == 0 and v > 0 for grid in sig["grids"] for v in grid)
    assert sig["grids"][0][-1] == 32 and sig["grids"][1][-1] == 64 and len(sig["grids"][1]) > 1
    layers = [c[0] if isinstance(c, nn.Sequential) else c for c in built]
    convs = [c for c in layers if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3)]
    assert convs and all(c.groups == 4 for c in convs)
    assert {(c.in_channels, c.out_channels) for c in convs} == {
        (i, o) for i in sig["grids"][0] for o in sig["grids"][1]}  # fmt: skip
    assert float(lm.ratio(lm.channels)) == pytest.approx(1.0, rel=1e-12)
    assert float(lm.ratio(lm.channels / 2)) < 1.0


def test_a_latency_budget_prunes_a_grouped_conv_network_exactly(fake, monkeypatch):
    """The whole latency path (tables, measured feedback at the freeze, projection) on a
    grouped conv network: the exported network meets the budget in the device's terms
    (faked as above), is exactly the hard network, and its conv keeps its 4 groups."""
    from s2hpruner import S2HPruner, S2HTrainer

    monkeypatch.setattr(LatencyModel, "measure_ratio", fake_truth)
    torch.manual_seed(0)
    net, example = GroupedNet(), torch.randn(2, 3, 8, 8)
    table = LatencyModel(net, example, setup(net)[2], batch_size=4, grid_points=3, repeats=3,
                         rounds=1)  # fmt: skip
    pruner = S2HPruner(net, example, target_latency=0.8, latency_model=table)
    trainer = S2HTrainer(net, pruner, torch.optim.SGD(net.parameters(), lr=0.01), 10)
    trainer.freeze_widths()
    x = torch.randn(4, 3, 8, 8)
    with pruner.mode("hard"), torch.no_grad():
        hard = net.eval()(x)
    exported = trainer.export().eval()
    assert torch.allclose(exported(x), hard, atol=1e-5)
    assert exported.grouped.groups == 4 and exported.grouped.out_channels < 64
    assert fake_truth(None, net, exported) == pytest.approx(0.8, abs=0.02)


def test_real_timings_of_a_grouped_conv(tmp_path, monkeypatch):
    monkeypatch.setenv("S2HPRUNER_CACHE", str(tmp_path))
    model, example, groups = setup(GroupedNet())
    lm = LatencyModel(model, example, groups, batch_size=4, grid_points=3, repeats=3, rounds=1)
    assert lm.measured_full > 0
    assert float(lm.cost(lm.channels)) == pytest.approx(lm.full, rel=1e-9)
    assert math.isfinite(float(lm.cost(lm.channels / 2)))


def test_slow_widths_per_conv_group_are_skipped(fake, monkeypatch):
    """Grouped kernels run conv group by conv group: in NCHW on this CPU a group of 15
    channels took 2.8x one of 16 (``benchmarks/results/grouped_widths.json``). The tables
    sample the width per conv group on a staircase (the aligned widths and the next after
    each), so widths a conv group cannot run fast are priced above the full width and never
    kept (faked here: a conv group whose width is not a multiple of 8 costs 20x)."""
    from s2hpruner import S2HPruner

    def timer(cell, x, repeats):
        layer = cell[0] if isinstance(cell, nn.Sequential) else cell
        cin = x.shape[-1] if isinstance(layer, nn.Linear) else x.shape[1]
        cost = smooth_time(cin, layer.weight.shape[0])
        if getattr(layer, "groups", 1) == 4 and (layer.out_channels // 4) % 8:
            cost *= 20
        return cost

    monkeypatch.setattr(latency, "_time_cell", timer)
    monkeypatch.setattr(latency, "measure_latency", lambda *args, **kwargs: 7e-4)  # ~ tables
    monkeypatch.setattr(LatencyModel, "measure_ratio", fake_truth)
    torch.manual_seed(0)
    net, example = GroupedNet(), torch.randn(2, 3, 8, 8)
    table = LatencyModel(net, example, setup(net)[2], batch_size=4, grid_points=8, repeats=3,
                         rounds=1)  # fmt: skip
    sig = next(json.loads(k) for k in table.signatures if json.loads(k).get("groups"))
    assert {8 * 4, 9 * 4, 16 * 4} <= set(sig["grids"][1])  # per conv group: 8, 9 and 16
    pruner = S2HPruner(net, example, target_latency=0.8, latency_model=table)
    out = next(g for g in pruner.groups if g.name == "grouped")
    assert out.kind == "grouped" and out.channels == 16  # 16 block positions of 4 channels
    assert set(pruner.slow_widths[out.name]) == set(range(1, 16)) - {8}
    assert pruner.kept_widths()[out.name] in (8, 16)


def test_a_pruned_network_is_timed_in_the_full_models_layout(fake, monkeypatch):
    """torch-pruning exports NCHW weights, and a greyscale stem (or a 1x1 kernel) is laid out
    alike in NCHW and channels_last. The layout used to be read from the first 4-D weight
    alone, so the export of a channels_last model with a grey stem read as channels_last and
    was timed in NCHW against the full model in channels_last (RegNet: 1.5x the full model's
    latency at 15 of 16 channels a conv group). Both are timed in the full model's now."""
    from s2hpruner import S2HPruner
    from s2hpruner.core.measure import memory_format_of

    cl = torch.channels_last
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))
    net = net.to(memory_format=cl)
    example = torch.randn(1, 1, 8, 8)
    assert memory_format_of(net) == cl
    pruned = S2HPruner(net, example, target_flops=0.5).export()
    assert memory_format_of(pruned) == torch.contiguous_format  # not read off the grey stem
    seen = []

    def ratio(full, other, x, repeats, rounds):
        seen.append([p.is_contiguous(memory_format=cl) for m in (full, other)
                     for p in m.parameters() if p.dim() == 4])  # fmt: skip
        return 1.0, [1.0], 1.0, 1.0

    monkeypatch.setattr(latency, "latency_ratio", ratio)
    groups, _ = find_groups(net, example, None, (), 32)
    table = LatencyModel(net, example, groups, batch_size=4, grid_points=3, repeats=3, rounds=1)
    assert table.memory_format == cl
    table.measure_ratio(net, pruned)
    assert seen and all(seen[-1])


def test_the_layout_is_read_off_the_strides_even_where_is_contiguous_cannot_tell():
    """A grey stem, a depthwise and a 1x1 weight are "contiguous" in both layouts by
    ``is_contiguous`` (it ignores size-1 dimensions), yet their strides differ and oneDNN
    picks its kernel by them: MobileNetV3 on greyscale images has no other kind of weight."""
    from s2hpruner.core.measure import in_memory_format, layout_of, memory_format_of

    cl = torch.channels_last
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 4, 1))
    assert all(p.is_contiguous() and p.is_contiguous(memory_format=cl)
               for p in net.parameters() if p.dim() == 4)  # fmt: skip
    assert memory_format_of(net) == torch.contiguous_format
    net = net.to(memory_format=cl)
    assert memory_format_of(net) == cl and in_memory_format(net, cl)
    assert not in_memory_format(net, torch.contiguous_format)
    export = nn.Sequential(*(nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size,
                                       groups=c.groups) for c in net))  # fmt: skip
    assert memory_format_of(export) == torch.contiguous_format and not in_memory_format(export, cl)
    assert layout_of(nn.Conv2d(4, 1, 1).weight) == torch.contiguous_format
    assert layout_of(torch.zeros(3, 1, 1, 1)) is None  # the same strides in both
    conv3d = nn.Conv3d(2, 4, 3)
    assert in_memory_format(conv3d, torch.contiguous_format)
    assert not in_memory_format(conv3d, torch.channels_last_3d)


def test_a_resumed_latency_model_times_in_the_layout_its_tables_were_timed_in(fake):
    """The layout travels in the state: a run resumed after its model moved to another
    memory format times its refits as the tables and measured points were timed, not in a
    layout whose timings the cost function never saw."""
    first = build()
    assert first.memory_format == torch.contiguous_format
    state = first.state_dict()
    model, _, _ = setup()
    second = build(model.to(memory_format=torch.channels_last))
    assert second.memory_format == torch.channels_last
    second.load_state_dict(state)
    assert second.memory_format == torch.contiguous_format
    older = {k: v for k, v in state.items() if not k.endswith("_extra_state")}
    older["_extra_state"] = {k: v for k, v in state["_extra_state"].items()
                             if k != "memory_format"}  # fmt: skip
    third = build(setup()[0].to(memory_format=torch.channels_last))
    third.load_state_dict(older)  # a checkpoint from before: the model's layout, as then
    assert third.memory_format == torch.channels_last
