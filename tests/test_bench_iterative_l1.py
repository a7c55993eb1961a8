"""Iterative L1 (``BaselineOptions.l1_steps``/``l1_descent``): the gradual schedule offered to
``l1-ft`` where S2HPruner's candidates include its slower descent; and ``--reuse-from``, which
seeds a profile that only widens one method's search with the other methods' stored runs."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a package beside src/, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import baselines, compare  # noqa: E402
from s2hpruner.app.config import RunConfig  # noqa: E402
from s2hpruner.app.optim import build_weight_optimizer  # noqa: E402

TINY = dict(dataset="digits", model_kwargs={"width": 4}, batch_size=32, val_size=100,
            train_subset=320, progress=False, init=None)  # fmt: skip


def _run(tmp_path: Path, options: baselines.BaselineOptions, name: str) -> dict:
    profile = dataclasses.replace(compare.FROM_TRAINED_DESCENT, **TINY)
    spec = compare.RunSpec("l1-ft", 0.35, 0, "epochs")
    cfg = compare.run_config(profile, spec, 2.0, tmp_path / name)
    return baselines.run_baseline("l1-ft", cfg, options)


def test_iterative_l1_descends_in_equal_steps_and_ends_on_the_target(tmp_path):
    """Five prunes, each to its share of the way from the full model to the target, spread
    over the first half of the fine-tuning with training between, then the rest at the end."""
    options = baselines.BaselineOptions(pretrain_fraction=0.0, flops_tolerance=0.03,
                                        l1_steps=5, l1_descent=0.5)  # fmt: skip
    record = _run(tmp_path, options, "iterative")
    steps = record["pruning_steps"]
    assert [round(s["aim"], 6) for s in steps] == [0.87, 0.74, 0.61, 0.48, 0.35]
    for s in steps:  # each prune met its own aim, relative to the unpruned model
        assert abs(s["flops_ratio"] - s["aim"]) <= 0.03, s
    assert abs(record["flops_ratio"] - 0.35) <= 0.03
    total = sum(stage["steps"] for stage in record["stages"])  # 2 epochs of 10 batches
    assert total == 20
    assert [s["step"] for s in steps] == [2, 4, 6, 8, 10]
    assert [stage["steps"] for stage in record["stages"]] == [2, 2, 2, 2, 2, 10]
    assert [stage["network"] for stage in record["stages"]] == [
        "unpruned", *["partly pruned"] * 4, "pruned"]
    assert record["dense_seconds_per_epoch"] is None, "a few unpruned steps time no plain epoch"


def test_pruning_at_once_is_unchanged_by_the_new_options(tmp_path):
    """The default is one prune before the fine-tuning, as every stored benchmark ran."""
    record = _run(tmp_path, baselines.BaselineOptions(pretrain_fraction=0.0,
                                                      flops_tolerance=0.03), "once")  # fmt: skip
    assert "pruning_steps" not in record and isinstance(record["pruning_ratio"], float)
    assert [stage["name"] for stage in record["stages"]] == ["finetune"]


def test_a_piece_of_the_schedule_continues_one_cosine():
    """Rebuilding the optimizer after a prune must not restart the learning rate."""
    cfg = RunConfig(lr=0.1)
    whole_model, piece_model = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optimizer, schedule = build_weight_optimizer(whole_model, cfg, 20)
    expected = []
    for _ in range(20):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    seen = []
    for offset, steps in ((0, 7), (7, 13)):
        optimizer, schedule = build_weight_optimizer(piece_model, cfg, 20)
        schedule.last_epoch = offset
        for group, base, factor in zip(optimizer.param_groups, schedule.base_lrs,
                                       schedule.lr_lambdas, strict=True):  # fmt: skip
            group["lr"] = base * factor(offset)
        for _ in range(steps):
            seen.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
    assert seen == pytest.approx(expected)


def test_train_jumps_the_schedule_to_its_piece(monkeypatch):
    """baselines.train's schedule_span gives the same learning rates as the loop above."""
    seen = []
    real = baselines.build_weight_optimizer

    def spy(model, cfg, steps):
        optimizer, schedule = real(model, cfg, steps)
        seen.append((steps, optimizer))
        return optimizer, schedule

    monkeypatch.setattr(baselines, "build_weight_optimizer", spy)
    profile = dataclasses.replace(compare.FROM_TRAINED_DESCENT, **TINY)
    cfg = compare.run_config(profile, compare.RunSpec("l1-ft", 0.35, 0, "epochs"), 1.0,
                             Path("unused"))  # fmt: skip
    data = baselines.load_data(cfg, torch.device("cpu"))
    model = baselines.build_model(cfg, data)
    baselines.train(model, data, cfg, 0, 3, schedule_span=(5, 10))
    steps, optimizer = seen[0]
    assert steps == 10
    expected = cfg.lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * 8 / 10)).item())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(expected)


@pytest.mark.parametrize("values, message", [
    ({"l1_steps": 0}, "l1_steps is 0"),
    ({"l1_descent": 1.0}, r"share in \[0, 1\)"),
    ({"l1_steps": 5}, "needs both"),
    ({"l1_descent": 0.2}, "needs both"),
])  # fmt: skip
def test_contradictory_iterative_options_are_refused(values, message):
    with pytest.raises(ValueError, match=message):
        baselines.BaselineOptions(**values)


def test_the_iterative_profiles_only_widen_l1s_search():
    for profile, base in ((compare.FROM_TRAINED_ITERATIVE_015, compare.FROM_TRAINED_DESCENT),
                          (compare.FROM_TRAINED_RESNET56_ITERATIVE_015,
                           compare.FROM_TRAINED_RESNET56_015)):  # fmt: skip
        assert dataclasses.replace(profile, name=base.name, search=base.search) == base
        assert profile.search["l1-ft"][:len(base.search["l1-ft"])] == base.search["l1-ft"]
        added = profile.search["l1-ft"][len(base.search["l1-ft"]):]
        assert {(c["l1_steps"], c["l1_descent"]) for c in added} == {(5, 0.12)}
        assert {(c["lr"], c["l1_global"]) for c in added} == {
            (c["lr"], c["l1_global"]) for c in base.search["l1-ft"]}


def _stored(profile: compare.Profile) -> dict:
    settings = compare.settings(profile)
    run = {"target_flops": 0.15, "seed": 0, "budget": "epochs"}
    return {
        "settings": settings,
        "runs": [{**run, "method": m} for m in ("s2h", "l1-ft", "random", "dmp")]
        + [{**run, "method": "random", "budget": "compute"}],
        "tuning": [{**run, "method": m, "candidate": "x", "hyper": settings["search"][m][i]}
                   for m in ("s2h", "l1-ft") for i in (0, 1)],  # fmt: skip
        "compute_ratios": {"t0.15-s0": {"ratio": 0.87}},
    }


def test_reuse_copies_the_runs_of_methods_searched_alike(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "checkpoint_record", lambda profile: {})
    base = dataclasses.replace(compare.FROM_TRAINED_DESCENT, init=None)
    source = tmp_path / "base.json"
    source.write_text(json.dumps(_stored(base)))
    widened = dataclasses.replace(compare.FROM_TRAINED_ITERATIVE_015, init=None)
    path = tmp_path / "new.json"
    results = compare.open_results(path, widened, "cmd", False, False, reuse=source)
    assert sorted(r["method"] for r in results["runs"]) == ["dmp", "random", "random", "s2h"]
    # l1-ft's finished candidates are still offered: kept, its choice made again
    assert [t["method"] for t in results["tuning"]] == ["s2h", "s2h", "l1-ft", "l1-ft"]
    assert results["compute_ratios"] == {"t0.15-s0": {"ratio": 0.87}}
    assert results["reused_from"]["methods"] == ["dmp", "random", "s2h"]
    assert json.loads(path.read_text())["runs"] == results["runs"], "written at once"

    # S2HPruner searched otherwise: its runs, the ablations borrowing its choice and the
    # compute ratios (timed with its recipe) all run again
    s2h_widened = dataclasses.replace(base, search={**base.search, "s2h": ({"lr": 0.5},)})
    results = compare.open_results(tmp_path / "s2h.json", s2h_widened, "cmd", False, False,
                                   reuse=source)  # fmt: skip
    # ... and so do the compute budgets of the others, sized by the old ratio
    assert sorted((r["method"], r["budget"]) for r in results["runs"]) == [
        ("l1-ft", "epochs"), ("random", "epochs")]
    assert [t["method"] for t in results["tuning"]] == ["l1-ft", "l1-ft"]
    assert results["compute_ratios"] == {}


def test_reuse_refuses_other_settings_and_an_existing_file(tmp_path, monkeypatch):
    monkeypatch.setattr(compare, "checkpoint_record", lambda profile: {})
    base = dataclasses.replace(compare.FROM_TRAINED_DESCENT, init=None)
    source = tmp_path / "base.json"
    source.write_text(json.dumps(_stored(base)))
    other = dataclasses.replace(base, lr=0.5)
    with pytest.raises(SystemExit, match="other settings \\(lr\\)"):
        compare.open_results(tmp_path / "a.json", other, "cmd", False, False, reuse=source)
    (tmp_path / "b.json").write_text("{}")
    with pytest.raises(SystemExit, match="seeds a new benchmark"):
        compare.open_results(tmp_path / "b.json", base, "cmd", True, False, reuse=source)
