"""Fixes from a review of the application layer: a run's config.yaml reused with --config never
replaces or resumes a run by itself; a resume refuses other data; image-folder options are
refused for the fixed data sets; --deterministic on CUDA; the settings a resume must keep; the
balancer's and checkpointing's contradictory values."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fabricate import learnable_fashion_mnist, one_thread_run, tiny_config
from PIL import Image

from s2hpruner.app import run
from s2hpruner.app.checkpoint import check_resumable, check_same_data
from s2hpruner.app.cli import main
from s2hpruner.app.config import RUN_CONTROL, ConfigError, RunConfig
from s2hpruner.app.models import create_model
from s2hpruner.app.weights import load_init_weights
from s2hpruner.core.errors import CheckpointError

# the report times in this process: its timing in a child is test_fresh_timing.py's subject,
# and here it would only add a child's start (~6 s) to every run
TINY = ["--epochs", "1", "--freeze-epochs", "0.5", "--batch-size", "50", "--train-subset",
        "200", "--val-size", "100", "--latency-repeats", "1", "--latency-process", "same",
        "--no-progress"]  # fmt: skip


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


def error_of(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("s2hpruner: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------- 1. config.yaml holds no run-control flags


@pytest.fixture(scope="module")
def overwritten_run(tmp_path_factory):
    """A finished run started with --overwrite (and --no-progress)."""
    base = tmp_path_factory.mktemp("control")
    root = learnable_fashion_mnist(base / "fmnist")
    out = base / "a"
    code = one_thread_run(tiny_config(base), root, out, "--target-flops", "0.5", "--overwrite",
                          *TINY)  # fmt: skip
    assert code == 0
    return out


def test_config_yaml_leaves_out_the_run_control_flags(overwritten_run):
    saved = yaml.safe_load((overwritten_run / "config.yaml").read_text())
    assert not set(RUN_CONTROL) & set(saved), saved
    assert saved["out"] == str(overwritten_run) and saved["target_flops"] == 0.5
    cfg = RunConfig(resume=True, overwrite=True, progress=False, seed=3)
    assert cfg.to_yaml_dict() == {k: v for k, v in cfg.to_dict().items() if k not in RUN_CONTROL}


def test_a_runs_config_yaml_reused_never_replaces_the_run(overwritten_run, capsys):
    """The same command as the run's config.yaml: the finished run in its --out stays."""
    before = snapshot(overwritten_run)
    assert main(["prune", "--config", str(overwritten_run / "config.yaml")]) == 2
    assert "--overwrite" in error_of(capsys)
    assert snapshot(overwritten_run) == before


def test_an_older_config_yaml_with_overwrite_and_resume_is_ignored_with_a_warning(
    overwritten_run, tmp_path, capsys
):
    """config.yaml of older runs recorded overwrite/resume: true; only the command line
    counts. Reused on the run's --out it deletes nothing; on another --out it starts afresh
    (not "--resume: no checkpoint")."""
    values = yaml.safe_load((overwritten_run / "config.yaml").read_text())
    older = tmp_path / "older.yaml"
    older.write_text(yaml.safe_dump({**values, "overwrite": True, "resume": True,
                                     "progress": False}))  # fmt: skip
    before = snapshot(overwritten_run)
    with pytest.warns(UserWarning, match="sets overwrite: true.*pass --overwrite"):
        assert main(["prune", "--config", str(older)]) == 2
    assert "--overwrite" in error_of(capsys)
    assert snapshot(overwritten_run) == before
    with pytest.warns(UserWarning, match="sets resume: true.*pass --resume"):
        assert main(["prune", "--config", str(older), "--out", str(tmp_path / "b")]) == 0
    assert (tmp_path / "b" / "report.json").exists()
    assert snapshot(overwritten_run) == before


def test_run_control_flags_of_the_command_line_still_count(tmp_path, recwarn):
    path = tmp_path / "c.yaml"
    path.write_text("overwrite: true\nresume: false\nprogress: false\n")
    cfg = RunConfig.from_yaml(path, overwrite=True)
    assert cfg.overwrite and not cfg.resume and not cfg.progress  # progress: a file may set it
    assert not recwarn.list  # asked for on the command line: nothing to warn about
    path.write_text("overwrite: yes please\n")
    with pytest.raises(ConfigError, match="'overwrite': expected true/false"):
        RunConfig.from_yaml(path)


# -------------------------------------------------------- 2. a resume checks the data's sameness


def write_folder(root: Path, per_class: int = 20, classes=("a", "b", "c")) -> Path:
    """root/<class>/<i>.png, 16x16 grey, the level encoding the class."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = (40 + 70 * label + rng.integers(-6, 7, (16, 16))).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / name / f"{i:03d}.png")
    return root


FOLDER_ARGS = ["--dataset", "imagefolder", "--epochs", "1", "--freeze-epochs", "0.5",
               "--batch-size", "16", "--latency-repeats", "1", "--no-progress",
               "--target-flops", "0.5"]  # fmt: skip


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("folder")
    root = write_folder(base / "images")
    config, out = tiny_config(base), base / "run"
    assert one_thread_run(config, root, out, *FOLDER_ARGS) == 0
    return root, config, out


def resume(root: Path, config: Path, out: Path) -> int:
    return main(["prune", "--config", str(config), "--data-root", str(root), "--out", str(out),
                 *FOLDER_ARGS, "--resume"])  # fmt: skip


def test_checkpoints_record_the_classes_and_the_split_sizes(folder_run):
    _, _, out = folder_run
    data = torch.load(out / "checkpoints" / "last.pt", weights_only=False)["data"]
    assert data["classes"] == ["a", "b", "c"]
    assert data["sizes"] == {"train": 49, "val": 5, "test": 6}  # 60 images: 10% test, 10% val


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("rename", "gone: 'b'; new: 'z'"),
        ("add", "split of 49 train, 5 val, 6 test images but the data in"),
    ],
)
def test_a_resume_on_changed_data_is_refused(folder_run, tmp_path, capsys, change, message):
    root, config, out = folder_run
    images = Path(shutil.copytree(root, tmp_path / "images"))
    run_dir = Path(shutil.copytree(out, tmp_path / "run"))
    if change == "rename":
        (images / "b").rename(images / "z")
    else:
        write_folder(tmp_path / "more", per_class=4)
        for path in (tmp_path / "more").rglob("*.png"):
            shutil.copy(path, images / path.parent.name / f"new_{path.name}")
    before = snapshot(run_dir)
    assert resume(images, config, run_dir) == 2
    err = error_of(capsys)
    assert message in err and "--overwrite" in err, err
    assert snapshot(run_dir) == before


def test_a_checkpoint_without_the_data_record_still_resumes(folder_run, tmp_path):
    root, config, out = folder_run
    run_dir = Path(shutil.copytree(out, tmp_path / "run"))
    last = run_dir / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=False)
    del ckpt["data"]["sizes"], ckpt["data"]["classes"]  # as checkpoints before the record
    torch.save(ckpt, last)
    assert resume(root, config, run_dir) == 0


def test_check_same_data_names_the_change():
    saved = {"data": {"classes": ["cat", "dog"], "sizes": {"train": 8, "val": 1, "test": 1}}}
    same = {"classes": ["cat", "dog"], "sizes": {"train": 8, "val": 1, "test": 1}}
    check_same_data(saved, same, "/data")
    check_same_data({"data": {}}, same, "/data")  # an old checkpoint: nothing recorded
    check_same_data({}, same, None)
    with pytest.raises(CheckpointError, match=r"2 classes but the data in /data have 3 "
                                              r"\(new: 'emu'\)"):
        check_same_data(saved, {**same, "classes": ["cat", "dog", "emu"]}, "/data")
    with pytest.raises(CheckpointError, match="8 train, 1 val, 1 test images but the data "
                                              "set's files now split into 9 train"):
        check_same_data(saved, {**same, "sizes": {"train": 9, "val": 1, "test": 1}}, None)


# ------------------------------------------- 3. image-folder options on the fixed data sets


@pytest.mark.parametrize(
    "flags",
    [["--image-size", "32"], ["--in-chans", "3"], ["--mean", "0.5", "--std", "0.2"]],
)
def test_image_folder_options_are_refused_for_fixed_data_sets(tmp_path, capsys, flags):
    out = tmp_path / "out"
    assert main(["prune", "--dataset", "fashion-mnist", *flags, "--out", str(out)]) == 2
    err = error_of(capsys)
    assert flags[0] in err and "only apply to dataset 'imagefolder'" in err, err
    assert not out.exists()


def test_image_folder_options_are_taken_for_image_folders():
    RunConfig(dataset="imagefolder", data_root="/data", image_size=32, in_chans=3,
              mean=[0.5] * 3, std=[0.2] * 3).validate()  # fmt: skip


@pytest.mark.parametrize(
    ("dataset", "advice", "not_advised"),
    [
        ("imagefolder", "for grey images read as RGB in training, --in-chans 3", "--dataset"),
        ("fashion-mnist", "has fixed greyscale channels", None),
        ("cifar10", None, "--in-chans"),
        (None, "--dataset imagefolder --in-chans 3", None),
    ],
)
def test_init_mismatch_advises_in_chans_only_where_it_is_taken(tmp_path, dataset, advice,
                                                              not_advised):  # fmt: skip
    torch.save(create_model("resnet20", num_classes=10, in_chans=3).state_dict(),
               tmp_path / "rgb.pt")  # fmt: skip
    with pytest.raises(CheckpointError) as info:
        load_init_weights(create_model("resnet20", num_classes=10, in_chans=1),
                          tmp_path / "rgb.pt", "resnet20", dataset=dataset)  # fmt: skip
    message = str(info.value)
    assert advice is None or advice in message, message
    assert not_advised is None or not_advised not in message, message
    if dataset == "fashion-mnist":  # the flag only with the data set that takes it
        assert "--dataset imagefolder --in-chans 3" in message


# -------------------------------------------------------------- 4. --deterministic on CUDA


@pytest.fixture
def no_cublas_setting(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "unset")  # (restored after the test)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")


def fake_setup(monkeypatch, device: str) -> tuple[dict, list]:
    """D.setup returning ``device`` (recording the environment it ran in), and a recorder of
    torch.use_deterministic_algorithms calls."""
    seen, calls = {}, []

    def setup(asked):
        seen["cublas"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
        return torch.device(device)

    monkeypatch.setattr(run.D, "setup", setup)
    monkeypatch.setattr(torch, "use_deterministic_algorithms",
                        lambda mode, *, warn_only=False: calls.append((mode, warn_only)))
    return seen, calls


@pytest.mark.parametrize("asked", ["auto", "cuda", "cuda:0"])
def test_deterministic_on_cuda_fixes_the_cublas_workspace_and_warns_only(
    monkeypatch, no_cublas_setting, asked
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen, calls = fake_setup(monkeypatch, "cuda:0")
    assert run.setup_device(RunConfig(deterministic=True, device=asked)).type == "cuda"
    assert seen["cublas"] == ":4096:8"  # before any CUDA work
    assert calls == [(True, True)]


def test_deterministic_keeps_a_users_cublas_setting(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen, _ = fake_setup(monkeypatch, "cuda:0")
    run.setup_device(RunConfig(deterministic=True, device="cuda"))
    assert seen["cublas"] == ":16:8"


@pytest.mark.parametrize("asked", ["auto", "cpu"])
def test_deterministic_on_the_cpu_stays_strict(monkeypatch, no_cublas_setting, asked):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seen, calls = fake_setup(monkeypatch, "cpu")
    run.setup_device(RunConfig(deterministic=True, device=asked))
    assert seen["cublas"] is None and calls == [(True, False)]
    seen, calls = fake_setup(monkeypatch, "cpu")
    run.setup_device(RunConfig(device=asked))
    assert calls == []


# ------------------------------------------------- 5. settings a resume must keep, bit for bit


@pytest.mark.parametrize(
    ("key", "value"), [("autocast", "bf16"), ("freeze_ranks_after_warmup", True)]
)
def test_a_resume_that_changes_autocast_or_rank_freezing_is_refused(key, value):
    cfg = RunConfig(epochs=1.0)
    with pytest.raises(CheckpointError, match=f"made with {key}=.* but this run has {key}="):
        check_resumable({"config": cfg.to_dict()}, dataclasses.replace(cfg, **{key: value}))
    older = {k: v for k, v in cfg.to_dict().items() if k != key}  # saved before the key was
    check_resumable({"config": older}, cfg)  # its default then: the same run
    with pytest.raises(CheckpointError, match=key):
        check_resumable({"config": older}, dataclasses.replace(cfg, **{key: value}))


# ------------------------------------------------------------ 6. contradictory balancer values


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"gamma_min": 5.0, "gamma_max": 1.0}, r"gamma_max \(1.0\) must be >= gamma_min \(5.0\)"),
        ({"beta": -0.5}, "beta must be a finite number >= 0"),
        ({"gamma_init": -1.0}, "gamma_init must be a finite number >= 0"),
        ({"gamma_min": -0.1}, "gamma_min must be a finite number >= 0"),
        ({"budget_tolerance": -0.01}, "budget_tolerance must be a finite number >= 0"),
        ({"budget_tolerance": float("nan")}, "budget_tolerance must be a finite number >= 0"),
        ({"gamma_growth": -1.05}, "gamma_growth must be a finite factor >= 1"),
        ({"gamma_growth": 0.0}, "gamma_growth must be a finite factor >= 1"),
        ({"gamma_growth": 0.95}, "gamma_growth must be a finite factor >= 1"),
        ({"checkpoint_every": -5}, "checkpoint_every must be >= 0"),
    ],
)
def test_contradictory_balancer_and_checkpoint_values_are_refused(values, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**values).validate()


@pytest.mark.parametrize(
    "values",
    [{"gamma_growth": 1.0}, {"beta": 0.0}, {"gamma_min": 2.0, "gamma_max": 2.0},
     {"checkpoint_every": 0}, {"budget_tolerance": 0.0}, {"gamma_max": float("inf")}],
)
def test_edge_values_that_make_sense_are_taken(values):
    RunConfig(**values).validate()


def test_flag_values_are_refused_on_the_command_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["prune", "--gamma-min", "2", "--gamma-max", "1", "--out", str(out)]) == 2
    assert "gamma_max (1.0) must be >= gamma_min (2.0)" in error_of(capsys)
    assert not out.exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
