"""Mistakes a user's own loop plausibly makes with S2HTrainer: each is refused early with the
fix named, warned about once, or made harmless (an export mid-run, a model moved after the
pruner was built)."""

import collections
import copy
import warnings

import pytest
import torch
from torch import nn

from s2hpruner import S2HPruner, S2HTrainer, count_flops
from s2hpruner.core.structure import inputs_on_device_of

STEPS = 12


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(self.features(x))


def build(seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = Net()
    x = torch.randn(16, 1, 8, 8)
    y = torch.randint(0, 4, (16,))
    pruner = S2HPruner(model, x[:1], target_flops=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = S2HTrainer(model, pruner, optimizer, STEPS, mask_lr=0.2, freeze=0.25, **kwargs)
    return model, pruner, trainer, x, y


def test_a_model_other_than_the_pruners_is_refused():
    model, pruner, trainer, _, _ = build()
    other = copy.deepcopy(model)
    with pytest.raises(ValueError, match="pass pruner.model"):
        S2HTrainer(other, pruner, torch.optim.SGD(other.parameters(), lr=0.1), STEPS)


def test_an_optimizer_holding_the_width_logits_is_refused():
    model, pruner, _, _, _ = build()
    both = torch.optim.SGD([*model.parameters(), *pruner.mask_parameters()], lr=0.1)
    with pytest.raises(ValueError, match="model.parameters\\(\\) only"):
        S2HTrainer(model, pruner, both, STEPS)


def test_an_export_mid_search_meets_the_budget_and_leaves_the_search_as_it_was():
    """Two identical runs, one exporting after every search step: the snapshots meet the
    budget and are the hard network projected there, and the run ends bit for bit as the
    other (same widths, same weights)."""
    _, _, plain, x, y = build()
    model, pruner, exporting, _, _ = build()
    full = count_flops(model, x[:1])
    snapshots = 0
    for _ in range(STEPS):
        plain.step(x, y)
        exporting.step(x, y)
        if exporting.phase() == "joint":
            with torch.no_grad():  # as evaluation code runs
                snapshot = exporting.export().eval()
            snapshots += 1
            assert not exporting.widths_frozen
            assert count_flops(snapshot, x[:1]) / full <= 0.5 + 0.02
            assert all(u.grad is None for u in pruner.mask_parameters())
    assert snapshots >= 5
    for a, b in zip(plain.pruner.mask_parameters(), pruner.mask_parameters(), strict=True):
        assert torch.equal(a, b)
    ends = plain.export().state_dict(), exporting.export().state_dict()
    assert ends[0].keys() == ends[1].keys()
    assert all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])


def test_training_in_eval_mode_and_past_total_steps_each_warn_once():
    model, _, trainer, x, y = build()

    def misuse_warnings(steps: int) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(steps):
                trainer.step(x, y)
        return [str(w.message) for w in caught
                if "eval mode" in str(w.message) or "past total_steps" in str(w.message)]

    model.eval()
    (eval_mode,) = misuse_warnings(2)
    assert "call model.train()" in eval_mode
    model.train()
    assert misuse_warnings(STEPS - 2) == []
    (extra,) = misuse_warnings(2)
    assert "batches, not epochs" in extra
    assert misuse_warnings(1) == []


def test_example_inputs_follow_the_model_to_its_device():
    model = Net().to("meta")
    Pair = collections.namedtuple("Pair", "image mask")
    inputs = (torch.randn(1, 1, 8, 8), {"mask": torch.ones(1)}, 3, Pair(torch.ones(1), None))
    moved = inputs_on_device_of(model, inputs)
    assert moved[0].device.type == "meta" and moved[1]["mask"].device.type == "meta"
    assert moved[2] == 3 and inputs[0].device.type == "cpu"
    assert isinstance(moved[3], Pair) and moved[3].image.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_pruner_built_on_cpu_exports_the_model_moved_to_cuda():
    teacher = Net()
    model, pruner, _, x, y = build()
    model.cuda()
    pruner.cuda()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = S2HTrainer(model, pruner, optimizer, STEPS, freeze_teacher=teacher)
    assert next(teacher.parameters()).device.type == "cuda"
    for _ in range(STEPS):
        trainer.step(x.cuda(), y.cuda())
    pruned = trainer.export().eval()
    assert next(pruned.parameters()).device.type == "cuda"
    assert count_flops(pruned, x[:1].cuda()) / count_flops(model, x[:1].cuda()) <= 0.52


def test_dmp_exports_the_soft_networks_batchnorm_statistics():
    """DMP never runs the hard network: a default pruner's separate hard statistics would stay
    as built (mean 0, variance 1 here) and be exported; the export takes the soft network's."""
    model, pruner, trainer, x, y = build(method="dmp")
    model.train()
    for _ in range(STEPS):
        trainer.step(x, y)
    exported = trainer.export()
    bn = exported.features[1]  # built fresh: mean 0 until the soft network's batches
    assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
    model.eval()
    with torch.no_grad(), pruner.mode("hard"):
        masked = model(x)
    assert torch.allclose(exported.eval()(x), masked, atol=1e-5)


def test_a_dmp_pruners_state_loads_into_a_pruner_built_as_at_first_and_back():
    """DMP leaves the separate hard statistics unused but in the state dict: a state saved
    with or without the trainer loads either way (export scripts build no trainer)."""
    model, pruner, trainer, x, y = build(method="dmp")
    model.train()
    trainer.step(x, y)
    _, fresh, _, _, _ = build(seed=1)  # a default pruner, no DMP trainer
    fresh.load_state_dict(pruner.state_dict())
    pruner.load_state_dict(fresh.state_dict())


def test_gradient_checkpointing_is_refused_naming_the_fix():
    model, pruner, _, _, _ = build()
    model.features.grad_checkpointing = True  # as timm's set_grad_checkpointing() sets it
    with pytest.raises(ValueError, match="set_grad_checkpointing\\(False\\)"):
        S2HTrainer(model, pruner, torch.optim.SGD(model.parameters(), lr=0.1), STEPS)


def test_auxiliary_classifiers_are_refused_and_the_zoo_builds_without_them():
    """torchvision's googlenet runs aux1/aux2 in training only, on features the pruner
    narrows: refused at build with the fix; the zoo's googlenet trains at narrow widths."""
    import torchvision

    from s2hpruner.app.models import create_model
    from s2hpruner.core.errors import UnsupportedModelError

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    with pytest.raises(UnsupportedModelError, match="aux_logits=False"):
        aux = torchvision.models.googlenet(num_classes=4, aux_logits=True, init_weights=True)
        S2HPruner(aux, x[:1], target_flops=0.5)
    wrapped = nn.Sequential(torchvision.models.googlenet(num_classes=4, init_weights=True))
    with pytest.raises(UnsupportedModelError, match="0.aux1, 0.aux2"):
        S2HPruner(wrapped, x[:1], target_flops=0.5)
    model = create_model("googlenet", num_classes=4, in_chans=3, image_size=64)
    pruner = S2HPruner(model, x[:1], target_flops=0.5)
    with torch.no_grad():  # every group at its smallest width
        for u in pruner.mask_parameters():
            u.fill_(-30.0)
            u[0] = 30.0
    model.train()
    with pruner.mode("hard"):
        assert model(x).shape == (2, 4)


def test_shared_batchnorm_statistics_are_refused_where_the_hard_network_trains():
    """separate_hard_bn_stats=False crashed at the first step (the hard forward overwrote the
    running statistics the soft network's backward had saved); DMP, which never trains the
    hard network, may share them."""
    torch.manual_seed(0)
    model, x = Net(), torch.randn(16, 1, 8, 8)
    pruner = S2HPruner(model, x[:1], target_flops=0.5, separate_hard_bn_stats=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for method in ("s2h", "s2h-no-gs", "s2h-coupled"):
        with pytest.raises(ValueError, match="separate_hard_bn_stats=True"):
            S2HTrainer(model, pruner, optimizer, STEPS, method=method)
    trainer = S2HTrainer(model, pruner, optimizer, STEPS, method="dmp")
    assert torch.isfinite(torch.tensor(trainer.step(x, torch.randint(0, 4, (16,)))["task"]))


def test_the_cli_refuses_shared_statistics_for_the_methods_that_train_the_hard_network():
    from s2hpruner.app.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="use it with --method dmp"):
        RunConfig(separate_hard_bn_stats=False).validate()
    RunConfig(separate_hard_bn_stats=False, method="dmp").validate()


def test_a_long_warmup_alone_leaves_a_search_as_the_cli_does():
    """``S2HTrainer(warmup=0.8)`` with no freeze given is not refused for the default freeze
    it did not ask for: it gets half of what the warm-up leaves, the rule the CLI uses."""
    from s2hpruner.app.config import RunConfig

    model, pruner, _, x, y = build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = S2HTrainer(model, pruner, optimizer, 20, warmup=0.8)
    assert trainer.freeze == pytest.approx(0.1)
    assert [trainer.phase(s) for s in (15, 16, 17, 18)] == ["warmup", "joint", "joint", "freeze"]
    assert RunConfig(warmup=0.8, epochs=1).phase_fractions() == (0.8, trainer.freeze)
    assert S2HTrainer(model, pruner, optimizer, 20).freeze == 0.25
    with pytest.raises(ValueError, match="leave a joint search"):
        S2HTrainer(model, pruner, optimizer, 20, warmup=0.8, freeze=0.25)  # asked for both


def test_a_pruner_left_on_another_device_is_refused_with_the_fix():
    """model.cuda() after building the pruner, without pruner.to(): the first step would fail
    deep inside with a mixed-device error. (The meta device stands in for a GPU here.)"""
    torch.manual_seed(0)
    model = Net()
    pruner = S2HPruner(model, torch.randn(1, 1, 8, 8), target_flops=0.5).to("meta")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match=r"pruner.to\(device\)"):
        S2HTrainer(model, pruner, optimizer, STEPS)


def test_layers_replaced_after_the_pruner_was_built_are_refused():
    """SyncBatchNorm conversion (or any swap) after building: the masks would act on the old
    modules, and soft, hard and full networks would silently be one."""
    torch.manual_seed(0)
    model = Net()
    pruner = S2HPruner(model, torch.randn(1, 1, 8, 8), target_flops=0.5)
    model.features[1] = copy.deepcopy(model.features[1])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match="build the pruner after"):
        S2HTrainer(model, pruner, optimizer, STEPS)


def test_average_statistics_is_a_no_op_in_one_process():
    """(Two processes: test_distributed's torchrun runs, where the app calls it.)"""
    model, pruner, trainer, x, y = build()
    trainer.step(x, y)
    before = copy.deepcopy(model.state_dict())
    trainer.average_statistics()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_a_pruner_built_on_a_cuda_model_finds_its_groups_and_trains():
    """The build probes (failing_groups, export_failures) index the model's weights: their
    channel index must be on the model's device."""
    torch.manual_seed(0)
    model = Net().cuda()
    x = torch.randn(16, 1, 8, 8, device="cuda")
    y = torch.randint(0, 4, (16,), device="cuda")
    pruner = S2HPruner(model, x[:1], target_flops=0.5)
    assert pruner.groups
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    trainer = S2HTrainer(model, pruner, optimizer, STEPS, mask_lr=0.2, freeze=0.25)
    for _ in range(STEPS):
        trainer.step(x, y)
    assert next(trainer.export().parameters()).is_cuda


def test_the_build_probes_index_on_the_models_device(monkeypatch):
    """What the CUDA test above checks, on a CPU: the probes move their channel index to
    the device of the model's weights (it is built on the CPU)."""
    from s2hpruner.core import sliced
    from s2hpruner.core.index import ChannelIndex

    moved = []
    real_to = ChannelIndex.to
    monkeypatch.setattr(ChannelIndex, "to", lambda self, *a, **k: moved.append(
        torch.device(a[0])) or real_to(self, *a, **k))  # fmt: skip
    torch.manual_seed(0)
    model = Net()
    pruner = S2HPruner(model, torch.randn(1, 1, 8, 8), target_flops=0.5)
    moved.clear()
    sliced.failing_groups(model, pruner.example_inputs, pruner.groups, pruner.layers)
    sliced.export_failures(model, pruner.example_inputs, pruner.groups)
    assert moved == [torch.device("cpu")] * 2


def test_a_fractional_step_count_or_a_negative_alpha_is_refused():
    torch.manual_seed(0)
    model = Net()
    pruner = S2HPruner(model, torch.randn(1, 1, 8, 8), target_flops=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match="whole number"):
        S2HTrainer(model, pruner, optimizer, 12.5)
    with pytest.raises(ValueError, match="alpha"):
        S2HTrainer(model, pruner, optimizer, STEPS, alpha=-1.0)
