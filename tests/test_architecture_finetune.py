"""benchmarks.architecture_finetune: a run's kept widths are cut from its starting weights by
L1 rank, and every run's architecture is fine-tuned by one recipe."""

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a package beside src/, not installed
    sys.path.insert(0, str(ROOT))

from benchmarks import architecture_finetune as A  # noqa: E402
from s2hpruner.app.config import RunConfig  # noqa: E402
from s2hpruner.app.models import create_model  # noqa: E402

WIDTHS = {"conv1": 2, "layer1.0.conv1": 4, "layer1.1.conv1": 2, "layer1.2.conv1": 4,
          "layer2.0.shortcut.0": 8, "layer2.0.conv1": 8, "layer2.1.conv1": 4,
          "layer2.2.conv1": 2, "layer3.0.shortcut.0": 8, "layer3.0.conv1": 16,
          "layer3.1.conv1": 8, "layer3.2.conv1": 4}  # fmt: skip


def _run_dir(tmp_path: Path) -> Path:
    """A finished run as the CLI leaves it (config.yaml, report.json), from a tiny resnet20
    checkpoint for digits."""
    torch.manual_seed(123)
    model = create_model("resnet20", num_classes=10, in_chans=1, image_size=8, width=4)
    ckpt = tmp_path / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    cfg = RunConfig(model="resnet20", dataset="digits", model_kwargs={"width": 4},
                    init=str(ckpt), target_latency=0.5, batch_size=32, val_size=100,
                    train_subset=64, lr=0.01, progress=False)  # fmt: skip
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    report = {"kept_widths": WIDTHS, "top1_hard": 50.0, "target_latency": 0.5,
              "latency_ratio": 0.5}  # fmt: skip
    (run / "report.json").write_text(json.dumps(report))
    return run


def test_the_cut_keeps_the_runs_widths_and_each_groups_largest_channels(tmp_path):
    run = _run_dir(tmp_path)
    cfg = RunConfig.from_yaml(run / "config.yaml")
    start = create_model("resnet20", num_classes=10, in_chans=1, image_size=8, width=4)
    start.load_state_dict(torch.load(cfg.init))
    net = A.cut(cfg, WIDTHS, torch.device("cpu"))
    convs = dict(net.named_modules())
    for name, width in WIDTHS.items():
        assert convs[name].out_channels == width, name
    # layer3.0.conv1 sums into no residual, and its input (stage 2's residual) is kept whole:
    # its kept rows are rows of the start's weight, those of the largest L1 norm
    full = start.layer3[0].conv1.weight.detach()
    kept = net.layer3[0].conv1.weight.detach()
    rows = [next(i for i in range(len(full)) if torch.equal(full[i], row)) for row in kept]
    norms = full.abs().flatten(1).sum(1)
    assert sorted(rows) == sorted(norms.argsort(descending=True)[: len(kept)].tolist())
    with pytest.raises(ValueError, match="group 'conv1' cannot keep 5 channels"):
        A.cut(cfg, {**WIDTHS, "conv1": 5}, torch.device("cpu"))
    with pytest.raises(ValueError, match="no width for group.s. conv1; are they the widths"):
        A.cut(cfg, {k: v for k, v in WIDTHS.items() if k != "conv1"}, torch.device("cpu"))


def test_every_run_is_fine_tuned_alike_and_reported_with_a_picture(tmp_path):
    run = _run_dir(tmp_path)
    out = tmp_path / "arch.json"
    assert A.main([str(run), str(run), "--epochs", "1", "--json", str(out)]) == 0
    records = json.loads(out.read_text())["runs"]
    assert len(records) == 2 and out.with_suffix(".png").stat().st_size > 0
    for r in records:
        assert r["budget"] == {"flops": None, "params": None, "latency": 0.5}
        assert r["kept_widths"] == WIDTHS and r["lr"] == 0.01 and r["epochs"] == 1.0
        assert 0.0 < r["flops_ratio"] < 0.5 and 0.0 <= r["test_top1"] <= 100.0
    # one recipe, the same batches: the same architecture twice gives the same network
    assert records[0]["test_top1"] == records[1]["test_top1"]
    assert records[0]["val_top1"] == records[1]["val_top1"]


def test_uniform_adds_the_l1_baselines_allocation_at_the_runs_flops_target(tmp_path):
    """``--uniform``: also the widths uniform L1 pruning keeps at the runs' FLOPs target (one
    record per start and target), cut and fine-tuned like the runs' own."""
    run = _run_dir(tmp_path)
    report = json.loads((run / "report.json").read_text())
    report.update(target_latency=None, latency_ratio=None, target_flops=0.5)
    (run / "report.json").write_text(json.dumps(report))
    out = tmp_path / "arch.json"
    assert A.main([str(run), str(run), "--uniform", "--json", str(out)]) == 0
    records = json.loads(out.read_text())["runs"]
    assert [r.get("uniform", False) for r in records] == [False, False, True]
    uniform = records[-1]
    assert uniform["budget"] == {"flops": 0.5, "params": None, "latency": None}
    # (one channel of the stem's 4 is a quarter of its width: the FLOPs steps are coarse)
    assert abs(uniform["flops_ratio"] - 0.5) <= 0.1 and uniform["kept_widths"] != WIDTHS
    # every layer keeps about the same share (the stem and stage widths are 4, 8 and 16)
    shares = [w / {"conv1": 4, "layer1": 4, "layer2": 8, "layer3": 16}[n.split(".")[0]]
              for n, w in uniform["kept_widths"].items()]  # fmt: skip
    assert max(shares) - min(shares) <= 0.25
    (tmp_path / "latency").mkdir()
    latency_run = _run_dir(tmp_path / "latency")
    with pytest.raises(ValueError, match="--uniform needs runs with a FLOPs budget"):
        A.main([str(latency_run), "--uniform", "--json", str(tmp_path / "latency.json")])
