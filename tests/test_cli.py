"""End to end through the command line: prune, eval, export, report, and bad input."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from fabricate import learnable_fashion_mnist

import s2hpruner
from s2hpruner.app.cli import main
from s2hpruner.app.run import REPORT_KEYS


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    root = learnable_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=1200)
    out = tmp_path_factory.mktemp("runs") / "run"
    code = main([
        "prune", "--model", "resnet20", "--dataset", "fashion-mnist", "--data-root", str(root),
        "--target-flops", "0.5", "--epochs", "4", "--freeze-epochs", "1.5", "--batch-size", "50",
        "--val-size", "100", "--lr", "0.1", "--mask-lr", "0.1", "--out", str(out),
        "--no-progress", "--latency-repeats", "3", "--checkpoint-every", "4",
    ])
    assert code == 0
    return root, out


def test_prune_writes_a_complete_run_directory(finished_run):
    _, out = finished_run
    for name in ("config.yaml", "metrics.jsonl", "report.json", "model_pruned.pt2",
                 "model_pruned.pt", "accuracy.png", "flops.png", "widths.png",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (out / name).exists(), name
    assert any((out / "tensorboard").iterdir())
    report = json.loads((out / "report.json").read_text())
    assert set(REPORT_KEYS) <= set(report)
    assert report["s2hpruner"] == s2hpruner.__version__  # which release made this run
    assert abs(report["flops_ratio"] - 0.5) <= 0.01, "exported model meets the budget"
    assert report["top1_hard"] > 50.0, "the fabricated task is learnable"
    assert report["gap"] == pytest.approx(report["top1_soft"] - report["top1_hard"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert 0.0 <= records[0]["val_top1_full"] <= 100.0  # the starting model, before pruning
    assert report["top1_start_val"] == records[0]["val_top1_full"]
    for key in ("val_top1_soft", "val_top1_hard", "gap", "flops_ratio_soft", "flops_ratio_hard",
                "losses", "lr", "widths", "budget_met_step"):
        assert key in records[-1]
    for r in records[1:]:  # every epoch: every budget's ratio, for both networks
        assert r["ratios_soft"] == {"flops": pytest.approx(r["flops_ratio_soft"])}
        assert r["ratios_hard"] == {"flops": pytest.approx(r["flops_ratio_hard"])}


def test_version_is_one_fact_for_the_cli_and_the_installed_package(capsys):
    """``s2hpruner --version`` and pip's metadata both read ``s2hpruner.__version__``
    (pyproject takes it from there), so they cannot disagree."""
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"s2hpruner {s2hpruner.__version__}"
    assert version("s2hpruner") == s2hpruner.__version__


def test_the_run_records_when_the_search_met_its_budget_and_traces_it_by_step(finished_run):
    """report.json says at which step of its joint phase the search first met the budget
    (this run meets it early, then drifts above it and is projected back when the widths
    freeze), and TensorBoard holds the hard ratio every 10 steps, so that a short search can
    be followed."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out = finished_run
    report = json.loads((out / "report.json").read_text())
    start, end = report["joint_phase_steps"]
    assert start <= report["budget_met_step"] < end
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    trace = events.Scalars("step/ratio_hard/flops")
    assert [e.step for e in trace] == list(range(10, 89, 10))  # 88 steps: 22 x 4 epochs
    assert trace[0].value > trace[-1].value  # starts wider than it ends
    assert abs(trace[-1].value - 0.5) <= 0.005  # on the budget


def test_exported_program_runs_without_s2hpruner(finished_run):
    _, out = finished_run
    code = (
        "import sys, torch\n"
        f"m = torch.export.load({str(out / 'model_pruned.pt2')!r}).module()\n"
        "y = m(torch.randn(3, 1, 28, 28))\n"
        "assert y.shape == (3, 10), y.shape\n"
        "assert not any(k.startswith('s2hpruner') for k in sys.modules)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd="/")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_eval_of_exported_model_and_checkpoint(finished_run, capsys):
    root, out = finished_run
    report = json.loads((out / "report.json").read_text())
    assert main(["eval", str(out / "model_pruned.pt2"), "--data-root", str(root)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == pytest.approx(report["top1_hard"], abs=1e-6)
    assert main(["eval", str(out / "checkpoints" / "last.pt"), "--data-root", str(root)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1_hard"] == pytest.approx(report["top1_hard"], abs=1e-6)
    assert result["top1_soft"] == pytest.approx(report["top1_soft"], abs=1e-6)


def test_eval_of_a_checkpoint_copied_out_of_its_run(finished_run, tmp_path, capsys):
    """A checkpoint is told by its content, not only by its folder: copied elsewhere it was
    read as a model file ("does not hold an nn.Module")."""
    root, out = finished_run
    report = json.loads((out / "report.json").read_text())
    copied = tmp_path / "kept.pt"
    shutil.copy(out / "checkpoints" / "last.pt", copied)
    assert main(["eval", str(copied), "--data-root", str(root)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1_hard"] == pytest.approx(report["top1_hard"], abs=1e-6)


def test_export_from_checkpoint_with_onnx(finished_run, tmp_path, capsys):
    _, out = finished_run
    assert main(["export", str(out / "checkpoints" / "last.pt"), "--out", str(tmp_path),
                 "--onnx"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["onnx_max_abs_diff"] < 1e-4
    assert abs(result["flops_ratio"] - 0.5) <= 0.01
    pruned = torch.load(tmp_path / "model_pruned.pt", weights_only=False)
    reference = torch.load(out / "model_pruned.pt", weights_only=False)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(pruned.eval()(x), reference.eval()(x), atol=1e-5)


def test_report_redraws_plots(finished_run, capsys):
    _, out = finished_run
    (out / "accuracy.png").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "accuracy.png").exists()
    assert "top-1 hard" in capsys.readouterr().out


def test_finished_run_is_not_overwritten(finished_run, capsys):
    root, out = finished_run
    before = (out / "report.json").read_bytes()
    code = main(["prune", "--data-root", str(root), "--out", str(out), "--no-progress"])
    assert code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "report.json").read_bytes() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "resnet21"], "unknown model 'resnet21'"),
        (["--dataset", "mnist2"], "unknown dataset 'mnist2'"),
        (["--target-flops", "1.5"], "(0, 1]"),
        (["--target-flops", "0.0001"], "smallest FLOPs ratio"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(finished_run, tmp_path, capsys, args, message):
    root, _ = finished_run
    code = main(["prune", "--data-root", str(root), "--out", str(tmp_path / "r"),
                 "--no-progress", "--epochs", "2", "--val-size", "100", *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_data_root_names_the_files(tmp_path, capsys):
    code = main(["prune", "--data-root", str(tmp_path), "--out", str(tmp_path / "r"),
                 "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and "--data-root" in err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = capsys.readouterr().out
    for flag in ("--target-flops", "--method", "--resume", "--data-root", "--epochs",
                 "--batch-size", "--seed", "--device", "--out", "--config"):
        assert flag in text


def test_none_on_the_command_line_clears_a_config_files_optional_setting(tmp_path):
    """A config with ``init:`` or ``autocast:`` could not be run from random weights or in
    fp32: the command line had no way to say "no value"."""
    from s2hpruner.app.cli import build_parser, config_from_args
    from s2hpruner.app.config import ConfigError

    path = tmp_path / "c.yaml"
    path.write_text("dataset: digits\ninit: trained.pt\nautocast: bf16\ntarget_flops: 0.5\n"
                    "target_params: 0.4\n")  # fmt: skip
    parser = build_parser()

    def config(*flags):
        return config_from_args(parser.parse_args(["prune", "--config", str(path), *flags]))

    cfg = config("--init", "none", "--autocast", "None", "--target-flops", "none",
                 "--mean", "none")  # fmt: skip
    assert (cfg.init, cfg.autocast, cfg.target_flops, cfg.mean) == (None, None, None, None)
    assert cfg.target_params == 0.4 and cfg.dataset == "digits"  # the rest as the file has it
    kept = config("--target-params", "none")
    assert (kept.init, kept.autocast, kept.target_flops) == ("trained.pt", "bf16", 0.5)
    with pytest.raises(ConfigError, match="give it alone"):
        config("--mean", "none", "0.5")
    with pytest.raises(SystemExit):  # not optional: none is no value of it
        parser.parse_args(["prune", "--method", "none"])
    assert "none clears" in parser._subparsers._group_actions[0].choices["prune"].format_help()
