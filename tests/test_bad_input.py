"""Bad input exits with code 2 and a message that names the problem, and never touches what
an earlier run wrote (compared byte for byte). test_cli.py covers the basic cases; these are
the rest: checkpoints (corrupt, foreign, missing), a model without prunable groups, a NaN or
infinite loss, and the basic cases again pointed at a finished run with --overwrite."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from fabricate import learnable_fashion_mnist, one_thread_run, tiny_config
from torch import nn

from s2hpruner import S2HPruner
from s2hpruner.app.cli import main
from s2hpruner.app.models import MODELS, create_model
from s2hpruner.core.trainer import S2HTrainer

# the report times in this process: its timing in a child is test_fresh_timing.py's subject,
# and here it would only add a child's start (~6 s) to every run
TINY = ["--epochs", "1", "--freeze-epochs", "0.5", "--batch-size", "50", "--train-subset",
        "200", "--val-size", "100", "--latency-repeats", "1", "--latency-process", "same",
        "--no-progress", "--checkpoint-every", "1"]  # fmt: skip


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores: more threads only slow the tiny model down
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Fabricated data, a tiny-model config file, and one finished run."""
    base = tmp_path_factory.mktemp("bad")
    root = learnable_fashion_mnist(base / "fmnist")
    config, out = tiny_config(base), base / "finished"
    assert one_thread_run(config, root, out, "--target-flops", "0.5", *TINY) == 0
    return root, config, out


def prune(root, config, out, *args) -> int:
    return main(["prune", "--config", str(config), "--data-root", str(root), "--out", str(out),
                 "--target-flops", "0.5", *TINY, *args])  # fmt: skip


def snapshot(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def error_of(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("s2hpruner: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------ the finished run is safe


def test_finished_run_without_overwrite_is_left_intact(setup, capsys):
    root, config, out = setup
    before = snapshot(out)
    assert "checkpoints/last.pt" in before and "report.json" in before
    assert prune(root, config, out) == 2
    assert "--overwrite" in error_of(capsys)
    assert snapshot(out) == before


def test_unfinished_run_without_resume_or_overwrite_is_left_intact(setup, tmp_path, capsys):
    root, config, out = setup
    run_dir = copy_run(out, tmp_path / "run")
    (run_dir / "report.json").unlink()  # stopped before the end: checkpoints/last.pt only
    before = snapshot(run_dir)
    assert prune(root, config, run_dir) == 2
    err = error_of(capsys)
    assert "unfinished run" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(run_dir) == before


def test_overwrite_leaves_no_best_model_of_the_replaced_run(setup, tmp_path):
    """With no frozen-width phase the new run's best.pt is its final network (the only one
    on the budget), never the replaced run's."""
    root, config, out = setup
    run_dir = copy_run(out, tmp_path / "run")
    old = (run_dir / "checkpoints" / "best.pt").read_bytes()
    assert prune(root, config, run_dir, "--overwrite", "--freeze-epochs", "0") == 0
    best, last = (torch.load(run_dir / "checkpoints" / name, weights_only=False)
                  for name in ("best.pt", "last.pt"))  # fmt: skip
    assert (run_dir / "checkpoints" / "best.pt").read_bytes() != old
    assert best["state"]["step"] == last["state"]["step"], "the new run's last network"
    assert (run_dir / "report.json").exists()


def test_an_overwrite_stopped_before_its_end_leaves_nothing_of_the_replaced_run(
    setup, tmp_path, monkeypatch
):
    """The replaced run's models, plots and TensorBoard events go when the new run starts:
    stopped before its own are written, the folder must not offer the old run's as its."""
    from s2hpruner.app import run

    root, config, out = setup
    run_dir = copy_run(out, tmp_path / "run")
    (run_dir / "tensorboard").mkdir(exist_ok=True)
    (run_dir / "tensorboard" / "events.old").write_bytes(b"the replaced run's curves")
    (run_dir / "model_pruned.onnx").write_bytes(b"the replaced run's")
    old = [name for name in run.REPLACED_RESULTS if (run_dir / name).exists()]
    replaced = {name: (run_dir / name).read_bytes() for name in old}
    assert {"model_pruned.pt", "model_pruned.pt2", "accuracy.png", "report.json"} <= set(old)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run, "finish", stopped)
    assert prune(root, config, run_dir, "--overwrite") == 130  # interrupted
    left = [name for name in run.REPLACED_RESULTS if (run_dir / name).exists()]
    assert left == ["checkpoints/best.pt", "checkpoints/last.pt"]  # the new run's epochs
    assert all((run_dir / name).read_bytes() != replaced[name] for name in left)
    assert not (run_dir / "tensorboard" / "events.old").exists()


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--epochs", "nan"], "epochs must be a finite number > 0"),
        (["--epochs", "inf"], "epochs must be a finite number > 0"),
        (["--freeze-epochs", "nan"], "freeze_epochs must be a finite number >= 0"),
        (["--temperature", "0"], "temperature must be a finite number > 0"),
        (["--temperature", "-1"], "temperature must be a finite number > 0"),
        (["--eval-batch-size", "0"], "eval_batch_size must be >= 1"),
        (["--workers", "-1"], "workers must be >= 0"),
    ],
)
def test_numbers_that_cannot_run_are_refused_before_anything_is_written(
        setup, tmp_path, capsys, args, named):  # fmt: skip
    root, config, _ = setup
    out = tmp_path / "never"
    assert prune(root, config, out, *args) == 2
    assert named in error_of(capsys)
    assert not out.exists()


def test_a_training_split_smaller_than_the_batch_trains_in_one_batch(setup, tmp_path):
    """A small folder at the default batch size (128) is no contradiction the user wrote:
    the run trains in batches of the whole split, says so and records it."""
    import yaml

    root, config, _ = setup
    out = tmp_path / "small"
    with pytest.warns(UserWarning, match="fewer than --batch-size 500: training in batches"):
        assert prune(root, config, out, "--batch-size", "500") == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert 0 < saved["batch_size"] < 500
    assert main(["prune", "--config", str(config), "--data-root", str(root), "--out", str(out),
                 "--target-flops", "0.5", *TINY, "--batch-size", "500", "--resume"]) == 0


def test_resume_compares_the_phases_as_the_schedule_sees_them(setup, tmp_path, capsys):
    """A run started with the frozen phase in epochs resumes with the same phase given as a
    share (the shipped configs moved from one to the other); another phase is refused."""
    root, config, out = setup
    run_dir = copy_run(out, tmp_path / "run")
    args = ["prune", "--config", str(config), "--data-root", str(root), "--out", str(run_dir),
            "--target-flops", "0.5", *[a for a in TINY if a not in ("--freeze-epochs", "0.5")],
            "--resume"]  # fmt: skip
    assert "0.5" in TINY[TINY.index("--freeze-epochs") + 1]  # (the run's phase: 0.5 of 1 epoch)
    assert main([*args, "--freeze", "0.5"]) == 0
    capsys.readouterr()
    assert main([*args, "--freeze", "0.6"]) == 2
    assert "frozen-width phases of 0 and 0.5 of the run" in error_of(capsys)


def test_a_resume_that_leaves_epochs_and_phases_unset_takes_the_runs_own(setup, tmp_path):
    """The README's commands leave --epochs to its default, which the run resolves from the
    data and records; the same command plus --resume was refused (epochs=4.0 against None)."""
    root, config, out = setup
    run_dir = copy_run(out, tmp_path / "run")
    unset = {"--epochs": 2, "--freeze-epochs": 2}
    for dropped in (["--epochs"], ["--epochs", "--freeze-epochs"]):
        args = list(TINY)
        for flag in dropped:
            del args[args.index(flag) : args.index(flag) + unset[flag]]
        assert main(["prune", "--config", str(config), "--data-root", str(root), "--out",
                     str(run_dir), "--target-flops", "0.5", *args, "--resume"]) == 0  # fmt: skip


def test_a_checkpoint_that_did_not_record_the_folders_preprocessing_resumes():
    """Checkpoints before round 35 saved None for an image folder's measured size, channels,
    mean and std; the resume measures them again instead of refusing None != [...]."""
    from s2hpruner.app.checkpoint import check_resumable
    from s2hpruner.app.config import RunConfig
    from s2hpruner.core.errors import CheckpointError

    cfg = RunConfig(dataset="imagefolder", data_root="/data", epochs=1.0, image_size=16,
                    in_chans=1, mean=[0.5], std=[0.2])  # fmt: skip
    unrecorded = {"image_size": None, "in_chans": None, "mean": None, "std": None}
    check_resumable({"config": {**cfg.to_dict(), **unrecorded}}, cfg)
    with pytest.raises(CheckpointError, match=r"mean=\[0\.4\] but this run has mean=\[0\.5\]"):
        check_resumable({"config": {**cfg.to_dict(), "mean": [0.4]}}, cfg)


def test_export_never_replaces_earlier_models_unless_asked(setup, tmp_path, capsys):
    _, _, out = setup
    run_dir = copy_run(out, tmp_path / "run")
    best = str(run_dir / "checkpoints" / "best.pt")
    (run_dir / "model_pruned.onnx").write_bytes(b"an earlier export's")
    before = snapshot(run_dir)
    files = {name: (run_dir / name).stat().st_ino
             for name in ("model_pruned.pt", "model_pruned.pt2")}
    assert main(["export", best, "--out", str(run_dir)]) == 2
    assert "--overwrite" in error_of(capsys) and snapshot(run_dir) == before
    assert main(["export", best, "--out", str(run_dir), "--overwrite"]) == 0
    assert all((run_dir / name).stat().st_ino != inode for name, inode in files.items())
    assert not (run_dir / "model_pruned.onnx").exists()  # not of this checkpoint: gone


@pytest.mark.parametrize("fails", ["program", "onnx check"])
def test_an_export_that_fails_leaves_the_earlier_export_as_it_was(
    setup, tmp_path, capsys, monkeypatch, fails
):
    """Every file is written and checked before any replaces the earlier export's: a
    torch.export failure, or an ONNX program that computes something else, changes nothing
    (and the ONNX check fails the command)."""
    from s2hpruner.app import tools

    _, _, out = setup
    run_dir = copy_run(out, tmp_path / "run")
    (run_dir / "model_pruned.onnx").write_bytes(b"an earlier export's")
    before = snapshot(run_dir)
    if fails == "program":
        def broken(*args, **kwargs):
            raise RuntimeError("torch.export could not trace it")

        monkeypatch.setattr(tools, "save_program", broken)
        with pytest.raises(RuntimeError):
            tools.export_checkpoint(run_dir / "checkpoints" / "best.pt", run_dir, overwrite=True)
    else:
        monkeypatch.setattr(tools, "save_onnx", lambda m, x, path: Path(path).write_bytes(b"?"))
        monkeypatch.setattr(tools, "onnx_max_abs_diff", lambda *args: 0.5)
        assert main(["export", str(run_dir / "checkpoints" / "best.pt"), "--out", str(run_dir),
                     "--overwrite", "--onnx"]) == 2  # fmt: skip
        assert "differ from PyTorch's by 0.5" in error_of(capsys)
    assert snapshot(run_dir) == before
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".export.")]


def test_an_export_outside_the_run_carries_the_runs_config(setup, tmp_path):
    """eval of an exported model in a folder of its own reads the data as the run did (its
    config.yaml: data set, preprocessing), not as defaults would."""
    from s2hpruner.app.tools import _run_config_near

    _, _, out = setup
    exported = tmp_path / "exported"
    assert main(["export", str(out / "checkpoints" / "best.pt"), "--out", str(exported)]) == 0
    assert sorted(p.name for p in exported.iterdir()) == [
        "config.yaml", "model_pruned.pt", "model_pruned.pt2"]  # (fixed classes: no list)
    assert _run_config_near(exported / "model_pruned.pt2") == _run_config_near(out / "report.json")


def test_the_onnx_check_runs_on_a_random_batch_and_no_other_exports_files_stay(
    setup, tmp_path, monkeypatch
):
    """On the all-zero example every map past the stem is constant (wrong kernels would
    pass), so the check feeds a seeded random batch; a class list of another export goes."""
    from s2hpruner.app import tools

    _, _, out = setup
    fed = []

    def diff(model, x, path):
        fed.append(x)
        return 0.0

    monkeypatch.setattr(tools, "save_onnx", lambda m, x, path: Path(path).write_bytes(b"?"))
    monkeypatch.setattr(tools, "onnx_max_abs_diff", diff)
    exported = tmp_path / "exported"
    exported.mkdir()
    (exported / "classes.json").write_text('["an", "earlier", "export"]')
    assert main(["export", str(out / "checkpoints" / "best.pt"), "--out", str(exported),
                 "--onnx"]) == 0  # fmt: skip
    assert len(fed) == 1 and fed[0].std() > 0.5
    assert not (exported / "classes.json").exists()  # (this run's classes are fixed: none)


def test_eval_of_a_corrupt_program_is_refused(setup, tmp_path, capsys):
    root, _, out = setup
    run_dir = copy_run(out, tmp_path / "run")
    _truncate(run_dir / "model_pruned.pt2")
    assert main(["eval", str(run_dir / "model_pruned.pt2"), "--data-root", str(root)]) == 2
    assert "not a readable torch.export program" in error_of(capsys)


@pytest.mark.parametrize("target", ["0", "-0.25", "1.0001", "nan", "inf"])
def test_target_outside_0_1_with_overwrite_touches_nothing(setup, capsys, target):
    root, config, out = setup
    before = snapshot(out)
    assert prune(root, config, out, "--overwrite", "--target-flops", target) == 2
    assert "(0, 1]" in error_of(capsys)
    assert snapshot(out) == before


def test_target_below_the_minimum_names_the_minimum(setup, capsys):
    root, config, out = setup
    model = create_model("resnet20", num_classes=10, in_chans=1, width=4)
    minimum = S2HPruner(model, torch.zeros(1, 1, 28, 28), target_flops=1.0).min_flops_ratio()
    before = snapshot(out)
    target = f"{minimum * 0.9:.6f}"
    assert prune(root, config, out, "--overwrite", "--target-flops", target) == 2
    err = error_of(capsys)
    assert "smallest FLOPs ratio" in err
    assert f"{minimum:.4f}" in err, (minimum, err)
    assert snapshot(out) == before


@pytest.mark.parametrize(
    ("args", "named", "listed"),
    [
        (["--model", "resnet_21"], "unknown model 'resnet_21'", ["resnet20", "resnet56"]),
        (["--dataset", "fashion_mnist"], "unknown dataset 'fashion_mnist'",
         ["fashion-mnist", "mnist", "cifar10"]),
    ],
)  # fmt: skip
def test_unknown_names_list_the_known_ones(setup, capsys, args, named, listed):
    root, config, out = setup
    before = snapshot(out)
    assert prune(root, config, out, "--overwrite", *args) == 2
    err = error_of(capsys)
    assert named in err
    for name in listed:
        assert name in err
    assert snapshot(out) == before


def test_data_root_missing_files_names_exactly_those(setup, tmp_path, capsys):
    root, config, out = setup
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(root / name, partial / name)
    before = snapshot(out)
    assert prune(partial, config, out, "--overwrite") == 2
    err = error_of(capsys)
    assert "train-labels-idx1-ubyte" in err and "t10k-images-idx3-ubyte" in err
    assert "train-images-idx3-ubyte" not in err and "t10k-labels-idx1-ubyte" not in err
    assert snapshot(out) == before


@pytest.mark.parametrize(
    ("args", "messages"),
    [
        # the setting, its value and what the data set has
        (["--val-size", "1000"], ["val_size=1000", "1000 images", "only 600 training images"]),
        (["--train-subset", "0"], ["train_subset must be >= 1"]),
        (["--val-size", "-1"], ["val_size must be >= 0"]),
    ],
)
def test_split_sizes_that_do_not_fit(setup, capsys, args, messages):
    root, config, out = setup
    before = snapshot(out)
    assert prune(root, config, out, "--overwrite", *args) == 2
    err = error_of(capsys)
    for message in messages:
        assert message in err, (message, err)
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- checkpoints


def test_resume_without_a_checkpoint(setup, tmp_path, capsys):
    root, config, _ = setup
    out = tmp_path / "fresh"
    assert prune(root, config, out, "--resume") == 2
    err = error_of(capsys)
    assert "--resume" in err and "no checkpoint" in err and "last.pt" in err
    assert not (out / "metrics.jsonl").exists() and not (out / "config.yaml").exists()


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00not a checkpoint\xff" * 100)


def _foreign(path: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, path)


def _damaged(path: Path) -> None:  # the right format tag, but parts missing or broken
    ckpt = torch.load(path, weights_only=False)
    del ckpt["trainer"]["mask_optimizer"]
    ckpt["state"]["no_such_field"] = 1
    torch.save(ckpt, path)


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (_truncate, "corrupt or unreadable"),
        (_garbage, "corrupt or unreadable"),
        (_foreign, "not an s2hpruner checkpoint"),
        (_damaged, "damaged"),
    ],
)
def test_corrupt_checkpoint_is_refused(setup, tmp_path, capsys, spoil, message):
    root, config, out = setup
    run_dir = copy_run(out, tmp_path / "run")
    spoil(run_dir / "checkpoints" / "last.pt")
    before = snapshot(run_dir)
    assert prune(root, config, run_dir, "--resume") == 2
    err = error_of(capsys)
    assert message in err
    assert snapshot(run_dir) == before


@pytest.mark.parametrize(
    ("args", "saved", "asked"),
    [
        (["--target-flops", "0.6"], "target_flops=0.5", "target_flops=0.6"),
        (["--train-subset", "150"], "train_subset=200", "train_subset=150"),
        (["--freeze-epochs", "0.25"], "phases of 0 and 0.5 of", "has 0 and 0.25;"),
        (["--seed", "1"], "seed=0", "seed=1"),
        (["--importance", "group"], "importance='producers'", "importance='group'"),
        (["--split-seed", "3"], "split_seed=None", "split_seed=3"),
        (["--optimizer", "adamw"], "optimizer='sgd'", "optimizer='adamw'"),
        (["--mask-optimizer", "sgd"], "mask_optimizer='adam'", "mask_optimizer='sgd'"),
        (["--lr-warmup-steps", "2"], "lr_warmup_steps=0", "lr_warmup_steps=2"),
        (["--mask-lr-schedule", "cosine"], "mask_lr_schedule='constant'", "'cosine'"),
        (["--no-augment"], "augment=True", "augment=False"),
    ],
)
def test_checkpoint_of_other_settings_is_refused(setup, tmp_path, capsys, args, saved, asked):
    root, config, out = setup
    run_dir = copy_run(out, tmp_path / "run")
    before = snapshot(run_dir)
    assert prune(root, config, run_dir, "--resume", *args) == 2
    err = error_of(capsys)
    assert saved in err and asked in err
    assert snapshot(run_dir) == before


def test_the_split_seed_spelled_out_resumes_a_run_that_left_it_to_the_seed(setup, tmp_path):
    root, config, out = setup
    run_dir = copy_run(out, tmp_path / "run")  # saved with split_seed None and seed 0
    assert prune(root, config, run_dir, "--resume", "--split-seed", "0") == 0


def test_checkpoint_of_another_architecture_is_refused(setup, tmp_path, capsys):
    root, _, out = setup
    run_dir = copy_run(out, tmp_path / "run")
    wider = tmp_path / "wider.yaml"
    wider.write_text("model_kwargs:\n  width: 8\n")  # same model name, other channel counts
    before = snapshot(run_dir)
    assert prune(root, wider, run_dir, "--resume") == 2
    assert "model_kwargs={'width': 4}" in error_of(capsys)
    assert snapshot(run_dir) == before
    # a checkpoint whose config was edited to agree: its tensors still do not fit
    last = run_dir / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=False)
    ckpt["config"]["model_kwargs"] = {"width": 8}
    torch.save(ckpt, last)
    before = snapshot(run_dir)
    assert prune(root, wider, run_dir, "--resume") == 2
    assert "does not match the model" in error_of(capsys)
    assert snapshot(run_dir) == before


def test_checkpoint_of_another_world_size_is_refused(setup, tmp_path, capsys):
    root, config, out = setup
    run_dir = copy_run(out, tmp_path / "run")
    last = run_dir / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=False)
    assert ckpt["world_size"] == 1
    ckpt["world_size"] = 2  # as if made by torchrun --nproc_per_node=2
    torch.save(ckpt, last)
    before = snapshot(run_dir)
    assert prune(root, config, run_dir, "--resume") == 2
    assert "2 process(es)" in error_of(capsys)
    assert snapshot(run_dir) == before


# ---------------------------------------------------------------------- model without groups


def one_channel_net(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    """A conv with a single output channel: no width to choose anywhere."""
    return nn.Sequential(
        nn.Conv2d(in_chans, 1, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(1, num_classes),
    )  # fmt: skip


def test_model_without_prunable_group(setup, tmp_path, monkeypatch, capsys):
    root, _, _ = setup
    monkeypatch.setitem(MODELS, "one_channel_net", one_channel_net)
    out = tmp_path / "r"
    code = main(["prune", "--model", "one_channel_net", "--data-root", str(root), "--out",
                 str(out), *TINY])  # fmt: skip
    assert code == 2
    assert "no prunable channel group" in error_of(capsys)
    assert not (out / "metrics.jsonl").exists()


# ------------------------------------------------------------------------- NaN / inf loss


def _good_checkpoint_step(out: Path) -> int:
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    tensors = [*ckpt["model"].values(), *ckpt["pruner"].values()]
    for optimizer in (ckpt["optimizer"], ckpt["trainer"]["mask_optimizer"]):
        for state in optimizer["state"].values():
            tensors += state.values()
    tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
    assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    return ckpt["state"]["step"]


def test_huge_learning_rate_stops_with_the_step_and_keeps_the_good_checkpoint(
    setup, tmp_path, capsys
):
    root, config, _ = setup
    out = tmp_path / "nan"
    assert prune(root, config, out, "--lr", "1e6") == 2
    err = error_of(capsys)
    match = re.search(r"step (\d+) of 4", err)
    assert match and ("NaN" in err or "nan" in err), err
    step = _good_checkpoint_step(out)
    assert f"(step {step})" in err and "lower --lr" in err and "--resume" in err
    assert step < int(match.group(1))
    assert not (out / "report.json").exists()


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(
    setup, tmp_path, monkeypatch, capsys, bad
):
    """The weights turn non-finite in the update of step 3 (the loss of step 3 was finite);
    neither the checkpoint of step 3 nor any later one may replace the one of step 2."""
    root, config, _ = setup
    real = S2HTrainer.step

    def poisoned(self, x, y):
        stats = real(self, x, y)
        if self.step_count == 3:
            with torch.no_grad():
                next(self.model.parameters()).view(-1)[0] = bad
        return stats

    monkeypatch.setattr(S2HTrainer, "step", poisoned)
    out = tmp_path / "poisoned"
    assert prune(root, config, out) == 2
    err = error_of(capsys)
    assert "step 3 of 4" in err and "(step 2)" in err, err
    assert _good_checkpoint_step(out) == 2
    assert not (out / "report.json").exists()

    # the advice of the message works: resumed with a lower --lr, which replaces the
    # checkpoint's (0.1 by default) from the step of the checkpoint on
    monkeypatch.setattr(S2HTrainer, "step", real)
    said = r"other optimizer settings than the run's: lr 0\.1 -> 0\.01;"
    with pytest.warns(UserWarning, match=said):
        assert prune(root, config, out, "--resume", "--lr", "0.01") == 0
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["state"]["step"] == 4
    assert [g["initial_lr"] for g in ckpt["optimizer"]["param_groups"]] == [0.01, 0.01]
    assert ckpt["schedule"]["base_lrs"] == [0.01, 0.01]
    assert json.loads((out / "report.json").read_text())["epochs"] == 1.0


def test_nan_loss_reports_the_failing_step(setup, tmp_path, monkeypatch, capsys):
    """A NaN loss (S2HTrainer.step's own check) names the step that produced it."""
    root, config, _ = setup
    real = S2HTrainer.step

    def nan_at_3(self, x, y):
        if self.step_count == 2:  # the third step
            x = torch.full_like(x, math.nan)
        return real(self, x, y)

    monkeypatch.setattr(S2HTrainer, "step", nan_at_3)
    out = tmp_path / "nanloss"
    assert prune(root, config, out) == 2
    err = error_of(capsys)
    assert "training step 3 of 4" in err and "non-finite loss" in err and "(step 2)" in err, err
    assert _good_checkpoint_step(out) == 2


@pytest.mark.parametrize(("flags", "message"), [
    (["--model", "resnet5O"], "resnet5O"),
    (["--model", "timm/resnet5O"], "timm has no model"),
    (["--init", "no_such_weights.pt"], "no_such_weights.pt"),
])  # fmt: skip
def test_a_wrong_model_or_init_fails_before_the_run_folder_or_the_data(
        tmp_path, capsys, flags, message):  # fmt: skip
    """A typo used to be found after the data was read (minutes for a large folder) and left
    an empty run folder behind; the data folder here does not even exist."""
    out = tmp_path / "run"
    code = main(["prune", "--dataset", "imagefolder", "--data-root", str(tmp_path / "none"),
                 "--out", str(out), "--no-progress", *flags])  # fmt: skip
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
