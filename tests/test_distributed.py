"""Data-parallel training with torch.distributed (gloo on CPU).

* Two spawned processes run ``S2HTrainer.step`` on their halves of a fixed batch: after every step
  both hold bitwise-identical weights, width logits and optimizer states, and the result
  matches one process running the doubled batch.
* The run loop's distributed pieces: BatchNorm statistics (the model's and the pruner's
  separate hard-network ones) averaged over ranks, loss sums reduced, evaluation counting
  every sample once, the training order sharded.
* ``torchrun --nproc_per_node=2 -m s2hpruner prune`` end to end on fabricated data.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from fabricate import learnable_fashion_mnist
from torch import nn
from torch.utils.data import TensorDataset

from s2hpruner import S2HPruner, S2HTrainer
from s2hpruner.app.config import RunConfig
from s2hpruner.app.metrics import reduced_sums
from s2hpruner.app.models import create_model
from s2hpruner.app.run import build_trainer
from s2hpruner.app.sampling import EpochSampler, eval_loader
from s2hpruner.core.errors import NonFiniteLossError
from s2hpruner.core.trainer import evaluate

SRC = Path(__file__).resolve().parents[1] / "src"
WORLD = 2
B = 6  # per-rank batch; the single process gets 2 * B
# (phase, steps): weights only, then the width search, then weights only with frozen widths;
# the trainer's phases are fractions of the run: 2/8 warm-up, 2/8 frozen (exact in binary)
SCHEDULE = [("warmup", 2), ("joint", 4), ("freeze", 2)]
TOTAL = sum(n for _, n in SCHEDULE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_setup(prune_at_freeze: bool = False):
    """A tiny ResNet with BatchNorm in eval mode (running statistics, so a sample's output does
    not depend on the rest of its batch and the doubled batch is comparable), fixed data.
    ``prune_at_freeze``: the frozen phase trains the physically pruned network."""
    torch.manual_seed(0)
    model = create_model("resnet20", num_classes=10, in_chans=1, width=4)
    x = torch.randn(WORLD * B, 1, 16, 16)
    y = torch.randint(0, 10, (WORLD * B,))
    pruner = S2HPruner(model, x[:1], target_flops=0.4, separate_hard_bn_stats=True)
    with torch.no_grad():  # a mid-search state: soft and hard networks differ
        for u in pruner.mask_parameters():
            u.normal_(0, 1.0)
    # SGD on the width logits: Adam's first steps are ~lr * sign(g) and would hide differences
    warmup, freeze = SCHEDULE[0][1] / TOTAL, SCHEDULE[-1][1] / TOTAL
    cfg = RunConfig(target_flops=0.4, lr=0.05, mask_optimizer="sgd", mask_lr=0.5,
                    warmup=warmup, freeze=freeze, prune_at_freeze=prune_at_freeze,
                    freeze_teacher="none" if prune_at_freeze else "soft")  # fmt: skip
    trainer, schedule = build_trainer(cfg, model, pruner, total_steps=TOTAL)
    model.eval()  # on purpose: BatchNorm in eval mode is the same on a shard as on the batch
    return model, pruner, x, y, cfg, (trainer, schedule)


def snapshot(model, pruner, trainer: S2HTrainer, grads: dict) -> dict:
    network = trainer.network  # the model, or the pruned network once it trains that
    return {
        **grads,  # the gradients each optimizer applied in this step
        "weights": [p.detach().clone() for p in network.parameters()],
        "logits": [u.detach().clone() for u in pruner.mask_parameters()],
        "momentum": [
            trainer.optimizer.state[p]["momentum_buffer"].clone()
            for p in network.parameters()
            if "momentum_buffer" in trainer.optimizer.state.get(p, {})
        ],
        "mask_momentum": [
            trainer.mask_optimizer.state[u]["momentum_buffer"].clone()
            for u in pruner.mask_parameters()
            if "momentum_buffer" in trainer.mask_optimizer.state.get(u, {})
        ],
        "gamma": trainer.balancer.gamma,
    }


def run_schedule(model, pruner, x, y, cfg, opt) -> list[dict]:
    trainer, schedule = opt
    grads = {}

    def capture(name):
        def hook(optimizer, args, kwargs):
            grads[name] = [
                p.grad.clone() for group in optimizer.param_groups for p in group["params"]
            ]

        return hook

    trainer.optimizer.register_step_pre_hook(capture("weight_grads"))
    trainer.mask_optimizer.register_step_pre_hook(capture("mask_grads"))
    states = []
    for phase, steps in SCHEDULE:
        for _ in range(steps):
            assert trainer.phase() == phase, (trainer.step_count, trainer.phase(), phase)
            grads.clear()
            with warnings.catch_warnings():  # eval mode on purpose (make_setup)
                warnings.filterwarnings("ignore", message=r"S2HTrainer\.step\(\) with the model")
                trainer.step(x, y)
            schedule.step()
            states.append(snapshot(model, pruner, trainer, dict(grads)))
    return states


def worker(rank: int, port: int, folder: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = {}
        # 1. training steps on this rank's half of the batch
        model, pruner, x, y, cfg, opt = make_setup()
        shard = slice(rank * B, (rank + 1) * B)
        result["steps"] = run_schedule(model, pruner, x[shard], y[shard], cfg, opt)
        model_p, pruner_p, _, _, cfg_p, opt_p = make_setup(prune_at_freeze=True)
        result["pruned_steps"] = run_schedule(model_p, pruner_p, x[shard], y[shard], cfg_p, opt_p)

        # 2. BatchNorm statistics: train-mode forwards on different data per rank make the
        # model's and the hard network's running statistics differ; then average them
        model.train()
        with torch.no_grad():
            for mode in ("soft", "hard"):
                with pruner.mode(mode):
                    model(x[shard] * (1 + rank))
        stats = lambda: (  # noqa: E731
            [b.clone() for b in model.buffers() if b.is_floating_point()],
            [t.clone() for t in pruner.hard_stats.buffers() if t.is_floating_point()],
        )  # fmt: skip
        result["bn_before"] = stats()
        opt[0].average_statistics()  # the trainer (the library function the app calls)
        result["bn_after"] = stats()

        # 3. the epoch's loss sums are summed over ranks
        result["sums"] = reduced_sums({"task": 1.5 + rank, "gamma": 2.0, "n": 3})

        # 4. evaluation: 5 samples over 2 ranks; only sample 0 is classified right
        linear = nn.Sequential(nn.Flatten(), nn.Linear(2, 2, bias=False))
        with torch.no_grad():
            linear[1].weight.copy_(torch.eye(2))
        data = TensorDataset(torch.tensor([[1.0, 0.0]] * 5), torch.tensor([0, 1, 1, 1, 1]))
        loader = eval_loader(data, batch_size=2, workers=0)
        result["accuracy"] = evaluate(linear, loader, torch.device("cpu"))

        # 5. the training order
        sampler = EpochSampler(size=103, seed=5, batch_size=4)
        sampler.epoch = 1
        result["order"] = sampler.order()

        # 6. a non-finite loss on rank 1 only: both ranks raise (rank 0 used to go on into
        # the gradients' all_reduce and wait there for a rank that had left)
        model_n, _, _, _, _, (trainer_n, _) = make_setup()
        xn = x[shard].clone()
        if rank == 1:
            xn[0] = float("nan")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                trainer_n.step(xn, y[shard])
            result["nonfinite"] = None
        except NonFiniteLossError as exc:
            result["nonfinite"] = str(exc)

        # 8. a parameter with a gradient on rank 1 only (a branch rank 0's batch did not
        # take) is averaged with zeros on rank 0, not skipped there: the ranks' reduces pair
        # up, and both apply the same gradient; one no rank touched keeps None
        from s2hpruner.core import distributed as D

        shared, branch, unused = (nn.Parameter(torch.zeros(2)) for _ in range(3))
        shared.grad = torch.full((2,), 1.0 + rank)
        branch.grad = torch.full((2,), 4.0) if rank == 1 else None
        D.average_gradients([shared, branch, unused])
        result["uneven_grads"] = (shared.grad.clone(), branch.grad.clone(), unused.grad)

        # 7. a checkpoint holds every rank's random streams and loss sums, and each rank
        # resumes its own (rank 0's alone made every rank draw rank 0's crops after a resume)
        from s2hpruner.app.checkpoint import RunState, restore, save_checkpoint

        torch.manual_seed(100 + rank)
        saved = RunState(step=3, running={"task": float(rank)})
        path = Path(folder) / "checkpoint.pt"
        save_checkpoint(path, model, pruner, opt[0], opt[1], saved, cfg)
        result["draw"] = torch.rand(3)  # what this rank draws next, uninterrupted
        dist.barrier()  # rank 0 has written it
        torch.manual_seed(0)
        state = restore(torch.load(path, weights_only=False), model, pruner, opt[0], opt[1], cfg)
        result["resumed_draw"], result["resumed_running"] = torch.rand(3), state.running
        torch.save(result, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    mp.spawn(worker, args=(free_port(), str(folder)), nprocs=WORLD, join=True)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single():
    """One process, the doubled batch, same schedule."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_schedule(*make_setup())
    finally:
        torch.set_num_threads(threads)


def test_after_the_switch_to_the_pruned_network_ranks_agree_and_match_one_process(ranks):
    """With prune_at_freeze, every rank switches to the same pruned network at the freeze,
    averages its gradients and keeps identical weights and momentum, and the result matches
    one process with the doubled batch."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run_schedule(*make_setup(prune_at_freeze=True))
    finally:
        torch.set_num_threads(threads)
    steps0, steps1 = ranks[0]["pruned_steps"], ranks[1]["pruned_steps"]
    frozen = len(steps0) - SCHEDULE[-1][1]
    full = sum(w.numel() for w in steps0[frozen - 1]["weights"])
    assert sum(w.numel() for w in steps0[-1]["weights"]) < full, "the pruned network trained"
    for i, (a, b, s) in enumerate(zip(steps0, steps1, single, strict=True)):
        for key in ("weights", "momentum"):
            for ta, tb in zip(a[key], b[key], strict=True):
                assert torch.equal(ta, tb), f"step {i}: {key} differ between ranks"
        assert _max_rel(a["weight_grads"], s["weight_grads"]) < 1e-5, i
        assert _max_rel(a["weights"], s["weights"]) < 1e-5, i


def test_every_rank_holds_identical_weights_logits_and_optimizer_states(ranks):
    steps0, steps1 = ranks[0]["steps"], ranks[1]["steps"]
    assert len(steps0) == len(steps1) == sum(n for _, n in SCHEDULE)
    for i, (a, b) in enumerate(zip(steps0, steps1, strict=True)):
        for key in ("weights", "logits", "momentum", "mask_momentum"):
            assert len(a[key]) == len(b[key])
            for ta, tb in zip(a[key], b[key], strict=True):
                assert torch.equal(ta, tb), f"step {i}: {key} differ between ranks"
        assert a["gamma"] == b["gamma"]
    assert steps0[-1]["mask_momentum"], "the width logits were trained"


def _max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = torch.cat([(x - y).detach().flatten() for x, y in zip(a, b, strict=True)]).norm()
    return float(num / torch.cat([y.detach().flatten() for y in b]).norm().clamp_min(1e-12))


def test_two_processes_match_one_process_with_the_doubled_batch(ranks, single):
    """Weights: with BatchNorm on running statistics every loss is a mean over samples, so the
    mean of the two half-batch gradients is the full-batch gradient up to float32 rounding
    (measured ~1e-7 relative; 1e-5 allowed), in every phase.

    Width logits: S2HTrainer.step averages the raw task and gap gradients over ranks before the
    norm balancing (the resource gradient is the same on every rank), so the balanced
    gradient is the whole batch's, up to rounding as well (1e-4 allowed: the balancing divides
    by norms). test_joint_step_balances_the_rank_averaged_gradients pins the exact rule.

    When the widths freeze, every rank projects them onto the budget from the same logits
    (deterministic), as the single process does: they still agree afterwards."""
    dist_steps = ranks[0]["steps"]
    phases = [phase for phase, n in SCHEDULE for _ in range(n)]
    initial = make_setup()[1].mask_parameters()
    for i, (phase, d, s) in enumerate(zip(phases, dist_steps, single, strict=True)):
        assert _max_rel(d["weight_grads"], s["weight_grads"]) < 1e-5, (i, phase)
        assert _max_rel(d["weights"], s["weights"]) < 1e-5, (i, phase)
        assert d["gamma"] == s["gamma"], (i, phase)
        if phase == "joint":
            assert _max_rel(d["mask_grads"], s["mask_grads"]) < 1e-4, i
        else:
            assert "mask_grads" not in d and "mask_grads" not in s
        moved_d = [a - b for a, b in zip(d["logits"], initial, strict=True)]
        moved_s = [a - b for a, b in zip(s["logits"], initial, strict=True)]
        if i < SCHEDULE[0][1]:
            assert _max_rel(moved_d, moved_s) == 0.0 and not any(m.any() for m in moved_d)
        else:  # the logits are ~3 and first move by ~1e-4: a one-ulp rounding of a logit is
            # then 5e-4 of the move (seen on an Intel CPU), so allow the logits' own rounding
            largest = max(float(x.abs().max()) for x in s["logits"])
            ulps = 4 * torch.finfo(torch.float32).eps * largest
            for a, b in zip(moved_d, moved_s, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=ulps, msg=f"step {i}, {phase}")


def test_joint_step_balances_the_rank_averaged_gradients(ranks):
    """Recompute the first search step by hand from the distributed state after warm-up.

    Two rules are possible for the width logits under data parallelism: the mean over ranks of
    each rank's balanced gradient, or the balanced gradient of the rank-averaged raw task/gap
    gradients (what one process with the whole batch computes, and what S2HTrainer.step does).
    They differ measurably here, and the distributed step must be exactly the second."""
    model, pruner, x, y, cfg, (trainer, _) = make_setup()
    n_warmup = SCHEDULE[0][1]
    with torch.no_grad():
        for p, v in zip(model.parameters(), ranks[0]["steps"][n_warmup - 1]["weights"],
                        strict=True):  # fmt: skip
            p.copy_(v)
    pruner.update_ranks()
    trainer.balancer.update(float(pruner.budget_excess("hard").detach()))
    masks = pruner.mask_parameters()
    per_rank, raw = [], []
    for r in range(WORLD):
        shard = slice(r * B, (r + 1) * B)
        g = trainer.gradients(x[shard], y[shard], "joint")  # raw, per loss, not applied
        gap = [a + b for a, b in zip(g.masks["gap_hard"], g.masks["gap_soft"], strict=True)]
        raw.append((g.masks["task"], gap, g.masks["resource"]))
        per_rank.append(trainer.balancer.combine(masks, *raw[-1]))
    mean_of_balanced = [(a + b) / 2 for a, b in zip(*per_rank, strict=True)]
    mean_raw = [
        [(a + b) / 2 for a, b in zip(*parts, strict=True)] for parts in zip(*raw, strict=True)
    ]
    balanced_of_mean = trainer.balancer.combine(masks, *mean_raw)

    def after(grads):  # plain SGD on the logits: the first step is u - lr * g
        return [u.detach() - cfg.mask_lr * g for u, g in zip(masks, grads, strict=True)]

    got = ranks[0]["steps"][n_warmup]
    assert _max_rel(balanced_of_mean, mean_of_balanced) > 0.02, "the two rules differ here"
    assert _max_rel(got["mask_grads"], balanced_of_mean) < 1e-5
    assert _max_rel(got["logits"], after(balanced_of_mean)) < 1e-6


def test_batchnorm_statistics_are_averaged_over_ranks_including_the_hard_network(ranks):
    for kind in (0, 1):  # 0: the model's buffers, 1: the pruner's hard-network statistics
        before = [r["bn_before"][kind] for r in ranks]
        after = [r["bn_after"][kind] for r in ranks]
        assert before[0], "there are statistics to average"
        assert any(not torch.equal(a, b) for a, b in zip(*before, strict=True)), "ranks differ"
        for a0, a1, b0, b1 in zip(after[0], after[1], before[0], before[1], strict=True):
            assert torch.equal(a0, a1)
            assert torch.allclose(a0, (b0 + b1) / 2, rtol=1e-6, atol=1e-7)


def test_metrics_are_reduced_over_ranks(ranks):
    for r in ranks:
        assert r["sums"] == {"task": 1.5 + 2.5, "gamma": 4.0, "n": 6}
        assert r["accuracy"] == pytest.approx(20.0), "5 samples, 1 right; none counted twice"


def test_a_non_finite_loss_on_one_rank_stops_every_rank(ranks):
    assert ranks[0]["nonfinite"] == "non-finite loss on another process"
    assert ranks[1]["nonfinite"].startswith("non-finite loss nan")


def test_each_rank_resumes_its_own_random_streams_and_loss_sums(ranks):
    for rank, r in enumerate(ranks):
        assert torch.equal(r["resumed_draw"], r["draw"])
        assert r["resumed_running"] == {"task": float(rank)}
    assert not torch.equal(ranks[0]["draw"], ranks[1]["draw"])


def test_a_gradient_present_on_one_rank_only_is_averaged_with_zeros(ranks):
    for r in ranks:
        shared, branch, unused = r["uneven_grads"]
        assert torch.equal(shared, torch.full((2,), 1.5))
        assert torch.equal(branch, torch.full((2,), 2.0))
        assert unused is None


def test_a_cpu_value_is_reduced_on_the_cuda_device_under_nccl(monkeypatch):
    """NCCL reduces CUDA tensors only: the epoch's loss sums (a CPU tensor) crashed every
    GPU run under torchrun at its first epoch's end."""
    from s2hpruner.core import distributed as D

    moved, reduced = [], []
    monkeypatch.setattr(D, "is_distributed", lambda: True)
    monkeypatch.setattr(D.dist, "get_backend", lambda *args: "nccl")
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: moved.append(1) or self * 1)
    monkeypatch.setattr(D.dist, "all_reduce", lambda t, op=None: reduced.append(t) or t.mul_(2))
    assert reduced_sums({"task": 1.5, "n": 3}) == {"task": 3.0, "n": 6.0}
    assert len(moved) == len(reduced) == 1
    assert D.all_true(True) and len(moved) == 2


def test_a_resume_that_sees_fewer_gpus_restores_the_ones_it_sees(monkeypatch):
    from s2hpruner.app import checkpoint

    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.append(i))
    state = {**checkpoint.rng_state(), "cuda": [torch.zeros(4, dtype=torch.uint8)] * 3}
    checkpoint.set_rng_state(state)  # saved with 3 GPUs visible, resumed with 1
    assert restored == [0]


def test_training_order_is_sharded_without_overlap(ranks):
    a, b = ranks[0]["order"], ranks[1]["order"]
    assert len(a) == len(b) == 48  # 103 -> 96 usable (2 ranks * batch 4), 48 each
    assert not set(a) & set(b)
    gen = torch.Generator().manual_seed(5 * 100_003 + 1)
    perm = torch.randperm(103, generator=gen)[:96].tolist()
    assert sorted(a + b) == sorted(perm)
    assert a == perm[0::2] and b == perm[1::2]


@pytest.mark.slow
def test_torchrun_prune_end_to_end(tmp_path):
    root = learnable_fashion_mnist(tmp_path / "fmnist")  # 600 train files, 100 held out
    config = tmp_path / "tiny.yaml"
    config.write_text("model_kwargs:\n  width: 4\n")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master-addr=127.0.0.1", f"--master-port={free_port()}",
         "-m", "s2hpruner", "prune", "--config", str(config), "--data-root", str(root),
         "--out", str(out), "--target-flops", "0.5", "--epochs", "1", "--freeze-epochs", "0.5",
         "--batch-size", "25", "--val-size", "100", "--latency-repeats", "1", "--no-progress",
         "--checkpoint-every", "3"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("top-1 hard (exported, test)") == 1, "one summary, from rank 0"

    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    assert abs(report["flops_ratio"] - 0.5) <= 0.01
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # 500 training images, 2 ranks x 25 per step: 10 steps per epoch; the starting model's
    # line, then one line per epoch
    assert [(r["epoch"], r["step"]) for r in records] == [(0.0, 0), (1.0, 10)]
    assert set(records[-1]["losses"]) >= {"task", "gamma"}
    assert len(list((out / "tensorboard").iterdir())) == 1, "one event file (rank 0)"
    leftovers = [p.name for p in out.rglob("*.tmp")]
    assert not leftovers, leftovers
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["state"]["step"] == 10
    assert len(ckpt["state"]["history"]) == 2
    # each rank drew its own augmentation from a stream of its own (the same weights, seeded
    # alike, are built first), and the checkpoint keeps both streams
    streams = [r["rng"]["torch"] for r in ckpt["per_rank"]]
    assert len(streams) == 2 and not torch.equal(*streams)
    # the exported model is the checkpoint's hard network
    pruned = torch.load(out / "model_pruned.pt", weights_only=False).eval()
    assert pruned(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_a_single_process_runs_on_the_cuda_device_it_was_given(monkeypatch):
    """``--device cuda:1`` outside torchrun: that device, not the first one."""
    from s2hpruner.core import distributed as D

    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert D.setup("cuda:1") == torch.device("cuda", 1) and chosen == [1]
    monkeypatch.setenv("LOCAL_RANK", "0")  # torchrun's local rank decides under torchrun
    assert D.setup("cuda") == torch.device("cuda", 0)
