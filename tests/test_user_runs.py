"""End to end, as a user with their own things: images in class folders, a model class in their
own .py file, weights trained with plain PyTorch, pruned with ``--init``; the defaults on small
data and one epoch; parameter budgets and combined budgets."""

import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from s2hpruner import S2HPruner, count_flops, count_params
from s2hpruner.app.cli import main
from s2hpruner.app.data import build_datasets
from s2hpruner.app.models import create_model

USER_MODEL = '''
import torch
from torch import nn


class Net(nn.Module):
    """A user's own CNN: not in any registry."""

    def __init__(self, num_classes=10, in_chans=1, width=24):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))
'''


def write_digit_folders(root: Path) -> None:
    """scikit-learn's digits as 8-bit greyscale PNGs in train/ and test/ class folders."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * 255 / 16).astype(np.uint8)
    for i, (image, label) in enumerate(zip(images, digits.target, strict=True)):
        split = "test" if i % 5 == 0 else "train"
        folder = root / split / f"digit_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{i:04d}.png")


@pytest.fixture(scope="module")
def user_setup(tmp_path_factory):
    """Folders, a model file and its weights trained with plain PyTorch."""
    import importlib.util

    root = tmp_path_factory.mktemp("user")
    write_digit_folders(root / "digits")
    (root / "my_net.py").write_text(USER_MODEL)
    spec = importlib.util.spec_from_file_location("my_net_for_training", root / "my_net.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.Net()
    splits = build_datasets("imagefolder", str(root / "digits"), val_size=None, augment=False)
    loader = torch.utils.data.DataLoader(splits.train, batch_size=32, shuffle=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):  # plain PyTorch: the user's own training, before s2hpruner
        for x, y in loader:
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    torch.save({"epoch": 3, "model_state_dict": model.state_dict()}, root / "ckpt.pt")
    return root


def test_prune_a_users_trained_model_on_image_folders(user_setup, capsys, recwarn):
    root = user_setup
    out = root / "run"
    code = main([
        "prune", "--model", f"{root / 'my_net.py'}:Net", "--init", str(root / "ckpt.pt"),
        "--dataset", "imagefolder", "--data-root", str(root / "digits"),
        "--target-flops", "0.5", "--epochs", "2", "--batch-size", "32", "--lr", "0.01",
        "--out", str(out), "--no-progress", "--latency-repeats", "3",
    ])  # fmt: skip
    assert code == 0
    # the report's latency was timed in a child, which loaded Net from my_net.py
    assert not [w for w in recwarn if "latency timed in this process" in str(w.message)]
    report = json.loads((out / "report.json").read_text())
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["epoch"] == 0 and first["init"] == str(root / "ckpt.pt")
    assert first["val_top1_full"] > 60.0, "the starting model is the trained one, not random"
    assert report["top1_start_val"] == first["val_top1_full"]
    assert abs(report["flops_ratio"] - 0.5) <= 0.01
    assert report["top1_hard"] > 60.0
    # the preprocessing measured on the folder is recorded, so eval and deployment reuse it
    spec = build_datasets("imagefolder", str(root / "digits"), val_size=None).spec
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["image_size"], saved["mean"], saved["std"]) == \
        (spec.image_size, list(spec.mean), list(spec.std))  # fmt: skip
    capsys.readouterr()
    assert main(["eval", str(out / "model_pruned.pt2")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == pytest.approx(report["top1_hard"], abs=0.01)
    assert main(["eval", str(out / "checkpoints" / "last.pt")]) == 0  # rebuilds Net from file
    assert json.loads(capsys.readouterr().out)["top1_hard"] == pytest.approx(
        report["top1_hard"], abs=0.01
    )
    # another folder: the recorded preprocessing applies, its classes must be the run's
    assert report["classes"] == [f"digit_{i}" for i in range(10)]
    other = root / "digits_renamed"
    shutil.copytree(root / "digits", other)
    for split in ("train", "test"):
        (other / split / "digit_9").rename(other / split / "digit_nine")
    capsys.readouterr()
    assert main(["eval", str(out / "model_pruned.pt2"), "--data-root", str(other)]) == 2
    assert "trained on classes" in capsys.readouterr().err
    # a folder of class folders (no train/): --split all scores every image, not the
    # held-out share; here the run's own test images, so its test top-1 comes back
    flat = root / "digits_flat"
    shutil.copytree(root / "digits" / "test", flat)
    n_test = sum(1 for _ in flat.glob("*/*.png"))
    capsys.readouterr()
    assert main(["eval", str(out / "model_pruned.pt2"), "--data-root", str(flat)]) == 0
    assert json.loads(capsys.readouterr().out)["images"] < n_test // 5
    assert main(["eval", str(out / "model_pruned.pt2"), "--data-root", str(flat),
                 "--split", "all"]) == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == n_test
    assert result["top1"] == pytest.approx(report["top1_hard"], abs=0.01)
    # exported to a folder of its own: the preprocessing and the class names go along
    exported = root / "deploy"
    assert main(["export", str(out / "checkpoints" / "best.pt"), "--out", str(exported)]) == 0
    assert json.loads((exported / "classes.json").read_text()) == report["classes"]
    capsys.readouterr()
    assert main(["eval", str(exported / "model_pruned.pt2")]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(
        report["top1_hard"], abs=0.01
    )
    assert main(["eval", str(exported / "model_pruned.pt2"), "--data-root", str(other)]) == 2
    assert "trained on classes" in capsys.readouterr().err
    # the checkpoint records what the model was built for: no images needed to export it
    (root / "digits").rename(root / "digits_moved")
    try:
        assert main(["export", str(out / "checkpoints" / "last.pt"), "--out",
                     str(root / "deploy_moved")]) == 0  # fmt: skip
        assert json.loads((root / "deploy_moved" / "classes.json").read_text()) == \
            report["classes"]  # fmt: skip
    finally:
        (root / "digits_moved").rename(root / "digits")
    capsys.readouterr()
    # the pickled model in a fresh process: Net's module is not imported yet
    for name in [n for n in sys.modules if n.startswith("s2hpruner_user_my_net")]:
        del sys.modules[name]
    assert main(["eval", str(out / "model_pruned.pt")]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(
        report["top1_hard"], abs=0.01
    )


def test_init_with_a_wrong_checkpoint_exits_2_naming_the_keys(user_setup, capsys, tmp_path):
    root = user_setup
    wrong = {k: v for k, v in torch.load(root / "ckpt.pt")["model_state_dict"].items()
             if not k.startswith("fc.")}  # fmt: skip
    wrong["extra.weight"] = torch.zeros(3)
    wrong["body.0.weight"] = torch.zeros(5, 1, 3, 3)
    torch.save(wrong, tmp_path / "wrong.pt")
    code = main([
        "prune", "--model", f"{root / 'my_net.py'}:Net", "--init", str(tmp_path / "wrong.pt"),
        "--dataset", "imagefolder", "--data-root", str(root / "digits"), "--epochs", "1",
        "--out", str(tmp_path / "run"), "--no-progress",
    ])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    for key in ("fc.weight", "extra.weight", "body.0.weight"):
        assert key in err, err
    assert not (tmp_path / "run" / "report.json").exists()


def test_a_model_trained_on_rgb_copies_of_grey_images_starts_with_in_chans_3(
    user_setup, capsys, tmp_path
):
    """The user trained Net with torchvision's ImageFolder (grey PNGs read as RGB): its first
    layer takes 3 channels. Without --in-chans the error names the fix; with it the run goes."""
    root = user_setup
    torch.manual_seed(0)
    rgb = create_model(f"{root / 'my_net.py'}:Net", num_classes=10, in_chans=3)
    torch.save(rgb.state_dict(), tmp_path / "rgb.pt")
    args = ["prune", "--model", f"{root / 'my_net.py'}:Net", "--init", str(tmp_path / "rgb.pt"),
            "--dataset", "imagefolder", "--data-root", str(root / "digits"), "--epochs", "0.2",
            "--batch-size", "32", "--no-progress", "--latency-repeats", "1"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "grey")]) == 2
    assert "--in-chans 3" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "rgb"), "--in-chans", "3"]) == 0
    saved = yaml.safe_load((tmp_path / "rgb" / "config.yaml").read_text())
    assert saved["in_chans"] == 3 and len(saved["mean"]) == 3


def test_pretrained_weights_bring_their_normalisation(user_setup, tmp_path, monkeypatch):
    """ImageNet weights expect ImageNet's mean and std, not the folder's: the run uses the
    weights' (averaged over RGB for grey images, whose stem sums the RGB kernels) and
    records them; a --mean/--std the user gives still wins."""
    import torchvision

    from s2hpruner.app.weights import torchvision_cache_path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    path = torchvision_cache_path("mobilenet_v3_small")
    path.parent.mkdir(parents=True)
    torch.save(torchvision.models.mobilenet_v3_small(weights=None).state_dict(), path)
    args = ["prune", "--model", "mobilenet_v3_small", "--pretrained", "--dataset", "imagefolder",
            "--data-root", str(user_setup / "digits"), "--epochs", "0.1", "--batch-size", "32",
            "--no-progress", "--latency-repeats", "1"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "imagenet")]) == 0
    saved = yaml.safe_load((tmp_path / "imagenet" / "config.yaml").read_text())
    assert saved["mean"] == pytest.approx([(0.485 + 0.456 + 0.406) / 3])
    assert saved["std"] == pytest.approx([(0.229 + 0.224 + 0.225) / 3])
    assert main([*args, "--out", str(tmp_path / "own"), "--mean", "0.3", "--std", "0.2"]) == 0
    saved = yaml.safe_load((tmp_path / "own" / "config.yaml").read_text())
    assert (saved["mean"], saved["std"]) == ([0.3], [0.2])


def test_resume_keeps_the_runs_recorded_preprocessing(user_setup, tmp_path):
    """A resumed run reads its images as it started to (the checkpoint's mean and std), even
    if measuring the folder again would now give other values."""
    args = ["prune", "--model", f"{user_setup / 'my_net.py'}:Net", "--dataset", "imagefolder",
            "--data-root", str(user_setup / "digits"), "--epochs", "0.2", "--batch-size", "32",
            "--no-progress", "--latency-repeats", "1", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(args) == 0
    last = tmp_path / "run" / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=False)
    ckpt["config"]["mean"], ckpt["config"]["std"] = [0.123], [0.321]  # as if measured then
    torch.save(ckpt, last)
    assert main([*args, "--resume"]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert (saved["mean"], saved["std"]) == ([0.123], [0.321])


def test_digits_with_one_epoch_and_every_other_option_default(tmp_path, monkeypatch):
    """No option the user did not set may make the run fail: the validation split fits the
    data set, and the phases are fractions of whatever epochs were asked for."""
    monkeypatch.chdir(tmp_path)
    assert main(["prune", "--dataset", "digits", "--epochs", "1", "--no-progress"]) == 0
    report = json.loads((tmp_path / "runs" / "default" / "report.json").read_text())
    assert abs(report["flops_ratio"] - 0.35) <= 0.01


def test_target_params_is_met_by_the_independent_counter(tmp_path):
    out = tmp_path / "run"
    code = main([
        "prune", "--dataset", "digits", "--epochs", "1", "--target-params", "0.3",
        "--out", str(out), "--no-progress", "--latency-repeats", "3",
    ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["target_params"] == 0.3 and report["target_flops"] is None
    assert abs(report["params_ratio"] - 0.3) <= 0.01, report["params_ratio"]
    assert report["predicted_params_ratio"] == pytest.approx(report["params_ratio"], rel=0.01)


def test_combined_budgets_meet_every_one():
    """FLOPs and parameters together: the binding budget is met, the other is not exceeded."""
    from s2hpruner.app.models import create_model

    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1)
    x = torch.zeros(1, 1, 28, 28)
    pruner = S2HPruner(model, x, target_flops=0.6, target_params=0.3)
    from s2hpruner.core.trainer import project_to_budget

    project_to_budget(pruner, tolerance=0.005)
    exported = pruner.export()
    flops = count_flops(exported, x) / count_flops(model, x)
    params = count_params(exported) / count_params(model)
    assert params == pytest.approx(0.3, abs=0.01)  # binding
    assert flops <= 0.6 + 0.01
    assert float(pruner.budget_excess("hard")) == pytest.approx(0.0, abs=0.006)


def test_latency_budget_run_reports_measured_and_predicted_latency(tmp_path):
    """A latency budget end to end on digits: per-layer tables measured (and cached), the
    widths searched against them, and the report holds both latency ratios."""
    out, cache = tmp_path / "run", tmp_path / "latency.json"
    args = [
        "prune", "--dataset", "digits", "--epochs", "1", "--target-latency", "0.8",
        "--latency-batch", "64", "--latency-cache", str(cache), "--out", str(out),
        "--no-progress", "--latency-repeats", "3",
    ]  # fmt: skip
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    # 8x8 images: per-layer overheads dominate, so the smallest reachable ratio is high
    assert report["target_latency"] == 0.8 and report["latency_batch"] == 64
    # the model's prediction of the exported network: the budget, give or take the measured
    # feedback's correction (at most a fifth of the target; timings here are noisy)
    assert report["latency_ratio_predicted"] == pytest.approx(0.8, abs=0.2 + 0.01)
    assert 0.0 < report["latency_floor"] < 0.8 and report["latency_ratio_predicted_before_check"]
    assert [c["when"] for c in report["latency_calibration"]].count("search") == 3
    assert report["latency_predictor"] in ("tables", "flops")
    assert report["latency_predictor"] == report["latency_calibration"][-1]["predictor"]
    assert 0.0 < report["latency_ratio"] < 1.5  # measured: a real timing, no threshold
    assert report["flops_ratio"] < 0.99  # widths really moved
    report_kept, report_flops = report["kept_widths"], report["flops_ratio"]
    tables = json.loads(cache.read_text())
    assert tables and all(isinstance(v, dict) for v in tables.values())
    # --resume rebuilds the latency model from the checkpoint, untimed: the trainer built
    # before the checkpoint was loaded refused it (a latency run could not be resumed)
    assert main([*args, "--resume"]) == 0
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["kept_widths"] == report_kept and resumed["flops_ratio"] == report_flops
    # --latency-predictor fixes the cost's shape: every refit keeps the FLOPs ratio's
    fixed = tmp_path / "fixed"
    assert main([*args[:-5], "--out", str(fixed), "--latency-predictor", "flops",
                 "--no-progress", "--latency-repeats", "3"]) == 0  # fmt: skip
    report = json.loads((fixed / "report.json").read_text())
    assert {c["predictor"] for c in report["latency_calibration"]} == {"flops"}
    assert report["latency_predictor"] == "flops" and report["flops_ratio"] < 0.99


def test_a_run_without_a_frozen_phase_checkpoints_the_network_it_exports(tmp_path):
    """--freeze 0: the widths meet the budget only at the end. last.pt used to hold the widths
    from before that projection (exporting it gave 0.7 of the FLOPs) and best.pt was never
    written; both now hold the run's exported network."""
    out = tmp_path / "run"
    assert main(["prune", "--dataset", "digits", "--epochs", "0.5", "--freeze", "0",
                 "--train-subset", "640", "--out", str(out), "--no-progress",
                 "--latency-repeats", "2"]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    for name in ("last.pt", "best.pt"):
        exported = tmp_path / f"export_{name}"
        assert main(["export", str(out / "checkpoints" / name), "--out", str(exported)]) == 0
        model = torch.load(exported / "model_pruned.pt", weights_only=False)
        full = create_model("resnet20", in_chans=1, num_classes=10)
        x = torch.zeros(1, 1, 8, 8)
        assert count_flops(model, x) / count_flops(full, x) == pytest.approx(
            report["flops_ratio"], abs=1e-6), name


def test_a_very_short_run_still_freezes_its_widths_before_it_ends():
    """2 steps at the default freeze of 0.25 rounded to no frozen step; it keeps one."""
    from s2hpruner import S2HTrainer

    torch.manual_seed(0)
    model = create_model("resnet20", in_chans=1, num_classes=10, width=4)
    pruner = S2HPruner(model, torch.zeros(1, 1, 8, 8), target_flops=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    assert S2HTrainer(model, pruner, optimizer, 2, freeze=0.25).freeze_start == 1
    assert S2HTrainer(model, pruner, optimizer, 8, freeze=0.25).freeze_start == 6  # as before
    assert S2HTrainer(model, pruner, optimizer, 2, freeze=0.0).freeze_start == 2


def test_relative_paths_are_recorded_absolute_so_the_run_rebuilds_from_anywhere(
    user_setup, tmp_path, monkeypatch
):
    """`--model my_net.py:Net --init ckpt.pt --data-root digits` typed in the user's folder:
    export and --resume from another folder used to look for my_net.py there."""
    root = user_setup
    monkeypatch.chdir(root)
    out = tmp_path / "run"
    args = ["prune", "--model", "my_net.py:Net", "--init", "ckpt.pt", "--dataset",
            "imagefolder", "--data-root", "digits", "--epochs", "1", "--batch-size", "32",
            "--out", str(out), "--no-progress", "--latency-repeats", "2"]  # fmt: skip
    assert main(args) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"] == f"{root / 'my_net.py'}:Net"
    assert (saved["init"], saved["data_root"]) == (str(root / "ckpt.pt"), str(root / "digits"))
    monkeypatch.chdir(tmp_path)
    assert main(["export", str(out / "checkpoints" / "last.pt"), "--out",
                 str(tmp_path / "exported")]) == 0  # fmt: skip
    assert (tmp_path / "exported" / "model_pruned.pt2").exists()
    # the same run resumed with the relative paths typed again, from the user's folder
    monkeypatch.chdir(root)
    assert main([*args, "--resume"]) == 0


def test_a_run_resumed_without_its_freeze_keeps_the_one_it_was_made_with(tmp_path):
    """Checkpoints made before the default freeze could yield to a long warm-up stored
    freeze 0.25; resumed with --warmup 0.6 alone, the new default (0.2) must not refuse them."""
    out = tmp_path / "run"
    args = ["prune", "--dataset", "digits", "--epochs", "0.5", "--train-subset", "640",
            "--warmup", "0.6", "--out", str(out), "--no-progress", "--latency-repeats", "2"]
    assert main([*args, "--freeze", "0.25"]) == 0  # what an old run stored
    assert main([*args, "--resume"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["freeze"] == 0.25


def test_resuming_with_or_without_loader_workers_across_the_checkpoint_warns(tmp_path):
    """Worker processes seed each sample's augmentation by itself, the main process draws it
    from the global RNG: a resume that switches between the two cannot be exact, and says so
    (any worker counts >= 1 resume each other silently)."""
    out = tmp_path / "run"
    args = ["prune", "--dataset", "digits", "--epochs", "0.5", "--train-subset", "640",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert main([*args, "--workers", "1"]) == 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*args, "--workers", "2", "--resume"]) == 0
    assert not [w for w in caught if "workers=" in str(w.message)]
    with pytest.warns(UserWarning, match="checkpoint was made with workers=1 and this run has "
                                         "workers=0"):  # fmt: skip
        assert main([*args, "--resume"]) == 0


def test_a_network_torch_export_cannot_trace_still_ends_its_run_with_its_results(
        tmp_path, monkeypatch):  # fmt: skip
    """torch.export fails on some users' model code; after hours of training the run must
    still write model_pruned.pt and report.json (a resume would only repeat the failure)."""
    from s2hpruner.app import run as app_run

    def untraceable(model, example, path):
        Path(path).write_bytes(b"half")  # a partial file must not be left as the program
        raise RuntimeError("Could not guard on data-dependent expression\nmore lines")

    monkeypatch.setattr(app_run, "save_program", untraceable)
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="torch.export could not save"):
        assert main(["prune", "--dataset", "digits", "--epochs", "0.5", "--train-subset",
                     "640", "--out", str(out), "--no-progress", "--latency-repeats",
                     "2"]) == 0  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert report["program"] == {"file": None, "error": "RuntimeError: Could not guard on "
                                 "data-dependent expression"}  # fmt: skip
    assert (out / "model_pruned.pt").is_file() and not (out / "model_pruned.pt2").exists()
    model = torch.load(out / "model_pruned.pt", weights_only=False)
    assert count_flops(model, torch.zeros(1, 1, 8, 8)) == report["flops_pruned"]
