"""A run killed with SIGKILL at any point and resumed with --resume ends exactly like an
uninterrupted run with the same seed (bitwise on CPU with --deterministic).

The runs are real ``s2hpruner prune`` processes on fabricated Fashion-MNIST files. To kill them
at a known point, without racing the clock, the child is started through a tiny wrapper that
runs the normal CLI but stops (sleeps) at a chosen training step or just before a chosen
checkpoint write, after touching a marker file; the test waits for the marker and then sends
SIGKILL. The run (2 epochs of 12 steps; widths searched in steps 1-6, frozen from step 7 on)
is killed twice, then finished:

1. mid-epoch, three steps after the checkpoint of step 5 (still searching: the resumed
   process itself freezes the widths and projects them onto the budget at step 7);
2. at the end of epoch 1, after its metrics line was appended but before its checkpoint was
   written (resumed from step 10, in the frozen phase; it must not log epoch 1 twice).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from fabricate import learnable_fashion_mnist

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS_PER_EPOCH = 12  # train_subset 240 / batch 20
EPOCHS = 2

# Runs the CLI; with S2H_TEST_PAUSE_STEP=n it stops right after the optimizer update of
# global step n (before the loop counts it), with S2H_TEST_PAUSE_SAVE=n just before writing
# checkpoints/last.pt for step n. Either way it first writes S2H_TEST_MARKER.
WRAPPER = r"""
import os, sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
import s2hpruner.app.run as run
from s2hpruner.core.trainer import S2HTrainer

def pause():
    Path(os.environ["S2H_TEST_MARKER"]).write_text("paused")
    while True:
        time.sleep(1)

pause_step = int(os.environ.get("S2H_TEST_PAUSE_STEP", "0"))
pause_save = int(os.environ.get("S2H_TEST_PAUSE_SAVE", "0"))
real_step, real_save = S2HTrainer.step, run.save_checkpoint

def step(self, x, y):
    out = real_step(self, x, y)
    if self.step_count == pause_step:  # the trainer counts the steps it took
        pause()
    return out

def save_checkpoint(path, model, pruner, trainer, schedule, state, cfg, *args):
    if path.name == "last.pt" and state.step == pause_save:
        pause()
    return real_save(path, model, pruner, trainer, schedule, state, cfg, *args)

S2HTrainer.step, run.save_checkpoint = step, save_checkpoint
from s2hpruner.app.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"  # two cores, shared: more threads only slow things down
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def data_and_config(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    root = learnable_fashion_mnist(base / "fmnist")
    config = base / "tiny.yaml"
    config.write_text("model_kwargs:\n  width: 4\n")  # resnet20 with 4-8-16 channels: fast
    return root, config


def _args(root: Path, config: Path, out: Path) -> list[str]:
    return [
        "prune", "--config", str(config), "--data-root", str(root), "--out", str(out),
        "--target-flops", "0.5", "--epochs", str(EPOCHS), "--freeze-epochs", "1.5",
        "--batch-size", "20", "--train-subset", str(STEPS_PER_EPOCH * 20), "--val-size", "100",
        "--lr", "0.05", "--mask-lr", "0.1", "--checkpoint-every", "5", "--deterministic",
        "--seed", "3", "--latency-repeats", "1", "--no-progress", "--mask-lr-schedule", "cosine",
    ]  # fmt: skip


def _run(args: list[str], timeout: float = 300) -> None:
    result = subprocess.run(
        [sys.executable, "-c", WRAPPER, *args], env=_env(), capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


def _run_and_kill(args: list[str], marker: Path, timeout: float = 300, **pause) -> None:
    """Start the run, wait until it reached the pause point, SIGKILL it."""
    marker.unlink(missing_ok=True)
    env = _env(S2H_TEST_MARKER=str(marker), **{k: str(v) for k, v in pause.items()})
    log = marker.with_suffix(".log")
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, *args], env=env, stdout=subprocess.DEVNULL,
            stderr=stderr,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + timeout
            while not marker.exists():
                if proc.poll() is not None:
                    pytest.fail(
                        f"run ended (code {proc.returncode}) before the pause point "
                        f"{pause}:\n{log.read_text()[-3000:]}"
                    )
                if time.monotonic() > deadline:
                    pytest.fail(f"run did not reach the pause point {pause} in {timeout} s")
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            assert proc.wait(timeout=60) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _checkpoint(out: Path) -> dict:
    return torch.load(out / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)


def _frozen(ckpt: dict) -> bool:
    """Whether the checkpoint's widths are frozen (the trainer's flag; the pruner's importance
    order is frozen with them)."""
    frozen = ckpt["trainer"]["widths_frozen"]
    assert ckpt["pruner"]["_extra_state"]["freeze_ranks"] == frozen
    return frozen


def _metrics(out: Path) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("train_seconds", None)  # the starting model's line has none
    return records


def _assert_equal_tree(a, b, where: str = "") -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs (max {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            _assert_equal_tree(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert isinstance(b, list | tuple) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal_tree(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


# the last phase on the masked hard network (SPEC's), or on the pruned network itself, alone;
# and with loader worker processes (each sample's augmentation seeded by its own key)
LAST_PHASES = {"masked": [], "pruned": ["--prune-at-freeze", "--freeze-teacher", "none"],
               "masked, 2 workers": ["--workers", "2"]}


@pytest.mark.slow
@pytest.mark.parametrize("last_phase", list(LAST_PHASES))
def test_killed_and_resumed_run_equals_uninterrupted_run(data_and_config, tmp_path, last_phase):
    root, config = data_and_config
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    _run([*_args(root, config, reference), *LAST_PHASES[last_phase]])

    args = [*_args(root, config, resumed), *LAST_PHASES[last_phase]]
    marker = tmp_path / "paused"
    # 1. mid-epoch: killed at step 8, the checkpoint on disk is the one of step 5
    _run_and_kill(args, marker, S2H_TEST_PAUSE_STEP=8)
    ckpt = _checkpoint(resumed)
    assert ckpt["state"]["step"] == 5 and not _frozen(ckpt)
    # only the starting model's line (step 0): no epoch has ended
    assert [r["step"] for r in _metrics(resumed)] == [0]
    # 2. end of epoch 1: its metrics line is written, its checkpoint is not
    _run_and_kill([*args, "--resume"], marker, S2H_TEST_PAUSE_SAVE=STEPS_PER_EPOCH)
    ckpt = _checkpoint(resumed)
    assert ckpt["state"]["step"] == 10 and _frozen(ckpt)
    assert (ckpt["trainer"]["pruned"] is not None) == (last_phase == "pruned")
    assert [r["step"] for r in _metrics(resumed)] == [0, 12]
    _run([*args, "--resume"])

    # the starting model's line and every epoch's once, equal except for the wall-clock time
    assert _metrics(resumed) == _metrics(reference)
    assert [r["step"] for r in _metrics(resumed)] == [0, 12, 24]
    # the width logits' lr follows the weights' cosine: half of --mask-lr half-way through
    assert _metrics(resumed)[1]["mask_lr"] == pytest.approx(0.1 * 0.5)

    report_a = json.loads((reference / "report.json").read_text())
    report_b = json.loads((resumed / "report.json").read_text())
    for key in (
        "top1_hard",
        "top1_soft",
        "gap",
        "flops_ratio",
        "params_ratio",
        "predicted_flops_ratio",
        "flops_pruned",
        "params_pruned",
        "kept_widths",
        "channels",
    ):
        assert report_b[key] == report_a[key], key

    pruned_a = torch.load(reference / "model_pruned.pt", weights_only=False)
    pruned_b = torch.load(resumed / "model_pruned.pt", weights_only=False)
    _assert_equal_tree(pruned_a.state_dict(), pruned_b.state_dict(), "model_pruned")

    # the final checkpoints agree on everything but the clock
    ckpt_a, ckpt_b = _checkpoint(reference), _checkpoint(resumed)
    for key in ("model", "pruner", "optimizer", "schedule", "trainer", "rng"):
        _assert_equal_tree(ckpt_a[key], ckpt_b[key], key)
    for key in ("train_seconds", "history"):
        ckpt_a["state"].pop(key), ckpt_b["state"].pop(key)
    assert ckpt_a["state"] == ckpt_b["state"]
    ckpt_a["config"].pop("resume"), ckpt_b["config"].pop("resume")
    ckpt_a["config"].pop("out"), ckpt_b["config"].pop("out")
    assert ckpt_a["config"] == ckpt_b["config"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_rng_states_loaded_onto_a_gpu_are_restored():
    """``--resume`` on CUDA loads the checkpoint there (map_location), RNG states included;
    the generators take CPU byte tensors only."""
    from s2hpruner.app.checkpoint import rng_state, set_rng_state

    state = rng_state()
    expected = torch.rand(3)
    on_gpu = {**state, "torch": state["torch"].cuda(),
              "cuda": [s.cuda() for s in state.get("cuda", [])]}  # fmt: skip
    set_rng_state(on_gpu)
    assert torch.equal(torch.rand(3), expected)


def test_a_checkpoint_write_killed_midway_leaves_no_temporary_behind_the_next_start(tmp_path):
    """SIGKILL skips the atomic write's cleanup: a run preempted again and again piled up
    checkpoint-sized temporaries. The next start (a resume) removes them, and nothing else."""
    from s2hpruner.app.config import RunConfig
    from s2hpruner.app.run import prepare_run_dir

    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    stale = [folder / ".last.pt.x1y2.tmp", folder / ".best.pt.abc.tmp"]
    kept = [folder / "last.pt", folder / "notes.tmp", tmp_path / "run" / ".last.pt.q.tmp"]
    for path in (*stale, *kept):
        path.write_bytes(b"x")
    prepare_run_dir(RunConfig(out=str(tmp_path / "run"), resume=True))
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
