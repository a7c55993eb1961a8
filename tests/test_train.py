"""S2HTrainer: gradient routing of the step (SPEC section 5), its phases, mixed precision,
user loss functions and outputs, and that training really learns."""

import warnings

import pytest
import torch
from torch import nn

from s2hpruner import METHODS, S2HPruner, S2HTrainer
from s2hpruner.app.models import create_model
from s2hpruner.core.balance import GradientBalancer
from s2hpruner.core.trainer import Method, evaluate, kl, logits_of, project_to_budget


def setup(method="s2h", seed=0, **trainer_kwargs):
    torch.manual_seed(seed)
    model = create_model("resnet20", num_classes=10, in_chans=1)
    x = torch.randn(8, 1, 16, 16)
    y = torch.randint(0, 10, (8,))
    pruner = S2HPruner(model, x[:1], target_flops=0.35, separate_hard_bn_stats=True)
    with torch.no_grad():  # a mid-search state: soft and hard networks differ
        for u in pruner.mask_parameters():
            u.normal_(0, 1.0)
    pruner.update_ranks()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    trainer = S2HTrainer(model, pruner, optimizer, total_steps=10, method=method,
                         **trainer_kwargs)  # fmt: skip
    return model, pruner, trainer, x, y


def nonzero(grads) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in grads)


def test_gap_soft_reaches_width_logits_but_never_weights():
    model, pruner, trainer, x, y = setup("s2h")
    grads = trainer.gradients(x, y, "joint")
    assert "gap_soft" not in grads.weights, "G_s must never reach the weights"
    assert nonzero(grads.masks["gap_soft"]), "G_s must reach the width logits"
    assert nonzero(grads.weights["gap_hard"]), "G_h must reach the weights (hard network)"
    assert nonzero(grads.masks["gap_hard"]), "G_h must reach u through m_hat"
    assert nonzero(grads.weights["task"]) and nonzero(grads.masks["task"])
    assert set(grads.masks) == {"task", "gap_hard", "gap_soft", "resource"}


def test_weight_update_is_exactly_task_plus_alpha_gap_hard():
    """An independent recomputation: the weights' gradient in a real step equals
    d(L + alpha*G_h)/dtheta, and differs from what coupling G_s would give."""
    model, pruner, trainer, x, y = setup("s2h", alpha=0.7)
    weights = list(model.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hard_stats = {k: v.clone() for k, v in pruner.hard_stats.state_dict().items()}

    def reference(with_gap_soft):
        model.load_state_dict(state)
        pruner.hard_stats.load_state_dict(hard_stats)
        with pruner.mode("soft"):
            soft = model(x)
        with pruner.mode("hard"):
            hard = model(x)
        loss = torch.nn.functional.cross_entropy(soft, y) + 0.7 * kl(soft.detach(), hard)
        if with_gap_soft:
            loss = loss + kl(soft, hard.detach())
        return torch.autograd.grad(loss, weights)

    expected, coupled = reference(False), reference(True)
    model.load_state_dict(state)
    pruner.hard_stats.load_state_dict(hard_stats)
    for group in trainer.optimizer.param_groups:  # plain SGD so the update reveals the gradient
        group.update(lr=1.0, momentum=0.0, weight_decay=0.0, nesterov=False)
    before = [p.detach().clone() for p in weights]
    trainer.step_count = 3  # inside the joint phase
    trainer.step(x, y)
    applied = [b - p.detach() for b, p in zip(before, weights, strict=True)]
    for a, e in zip(applied, expected, strict=True):
        assert torch.allclose(a, e, atol=1e-5, rtol=1e-4)
    assert any(not torch.allclose(e, c, atol=1e-6) for e, c in zip(expected, coupled, strict=True))


def test_coupled_ablation_lets_gap_soft_reach_weights():
    model, pruner, trainer, x, y = setup("s2h-coupled")
    grads = trainer.gradients(x, y, "joint")
    assert nonzero(grads.weights["gap_soft"])
    assert nonzero(grads.masks["gap_soft"])


def test_no_gs_and_no_gap_on_mask_ablations():
    model, pruner, trainer, x, y = setup("s2h-no-gs")
    grads = trainer.gradients(x, y, "joint")
    assert "gap_soft" not in grads.masks and "gap_soft" not in grads.weights
    assert nonzero(grads.masks["gap_hard"])
    model, pruner, trainer, x, y = setup("s2h-no-gap-on-mask")
    grads = trainer.gradients(x, y, "joint")
    assert set(grads.masks) == {"task", "resource"}
    assert nonzero(grads.weights["gap_hard"]), "G_h still trains the weights"


def test_routing_table_is_what_every_method_does():
    """The Method rows are the only place a method's routing is written: each method's
    gradients reach exactly the parameters its row says."""
    for name, method in METHODS.items():
        model, pruner, trainer, x, y = setup(name)
        grads = trainer.gradients(x, y, "joint")
        assert ("gap_hard" in grads.weights) == method.hard
        assert ("gap_hard" in grads.masks) == (method.hard and method.gap_hard_to_masks)
        assert ("gap_soft" in grads.masks) == method.gap_soft
        assert ("gap_soft" in grads.weights) == method.gap_soft_to_weights
        assert "resource" in grads.masks and "resource" not in grads.weights
    custom = Method("only-gh-on-u", gap_soft=False)
    model, pruner, trainer, x, y = setup(custom)
    assert set(trainer.gradients(x, y, "joint").masks) == {"task", "gap_hard", "resource"}


def test_dmp_never_runs_the_hard_network(monkeypatch):
    model, pruner, trainer, x, y = setup("dmp", warmup=0.2, freeze=0.3)
    seen = []
    original = pruner.mode

    def spy(mode, **kwargs):
        seen.append(mode)
        return original(mode, **kwargs)

    monkeypatch.setattr(pruner, "mode", spy)
    phases = []
    for _ in range(10):
        phases.append(trainer.phase())
        trainer.step(x, y)
    assert set(phases) == {"warmup", "joint", "freeze"}
    assert seen and "hard" not in seen


def test_phases_are_fractions_and_frozen_phases_leave_width_logits_alone():
    model, pruner, trainer, x, y = setup("s2h", warmup=0.2, freeze=0.3)
    assert [trainer.phase(s) for s in range(10)] == ["warmup"] * 2 + ["joint"] * 5 + ["freeze"] * 3
    before = [u.detach().clone() for u in pruner.mask_parameters()]
    trainer.step(x, y)  # warm-up
    assert all(torch.equal(b, u) for b, u in zip(before, pruner.mask_parameters(), strict=True))
    trainer.step_count = 2
    trainer.step(x, y)  # joint
    moved = [u.detach().clone() for u in pruner.mask_parameters()]
    assert any(not torch.equal(b, u) for b, u in zip(before, moved, strict=True))
    trainer.step_count = 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random logits are off budget: projected
        trainer.step(x, y)  # freeze: widths projected onto the budget, then fixed
    assert trainer.widths_frozen and pruner.freeze_ranks
    assert abs(pruner.ratio("hard") - 0.35) <= trainer.balancer.tolerance
    frozen = [u.detach().clone() for u in pruner.mask_parameters()]
    trainer.step(x, y)
    assert all(torch.equal(b, u) for b, u in zip(frozen, pruner.mask_parameters(), strict=True))


def test_phase_boundaries_are_whole_steps():
    """Fractions that are not exact in binary still give exactly round(f * steps) steps."""
    for total, warmup, freeze in [(10, 0.0, 0.7), (1000, 0.1, 0.7), (7, 0.3, 0.3), (3, 0, 1 / 3)]:
        *_, trainer, _, _ = setup("s2h", warmup=warmup, freeze=freeze)
        trainer.total_steps = total
        trainer.__init__(trainer.model, trainer.pruner, trainer.optimizer, total,
                         warmup=warmup, freeze=freeze)  # fmt: skip
        phases = [trainer.phase(s) for s in range(total)]
        assert phases.count("warmup") == round(warmup * total)
        assert phases.count("freeze") == round(freeze * total)
        assert phases == sorted(phases, key=["warmup", "joint", "freeze"].index)


def test_fp16_without_cuda_is_refused_with_the_fix():
    with pytest.raises(ValueError, match="bf16"):
        setup("s2h", autocast="fp16")


def test_projection_onto_the_budget_is_recorded_and_warned():
    model, pruner, trainer, x, y = setup("s2h")
    assert abs(pruner.ratio("hard") - 0.35) > 0.01  # random logits: off budget
    with pytest.warns(UserWarning, match="projected the widths"):
        steps = trainer.freeze_widths()
    assert steps > 0 and trainer.projection_steps == steps
    assert abs(pruner.ratio("hard") - 0.35) <= trainer.balancer.tolerance


@pytest.mark.parametrize("target, seed", [(0.35, 2), (0.55, 1), (0.55, 3)])
def test_projection_meets_the_budget_where_steps_on_the_logits_stall(target, seed):
    """With widths in multiples of 8, one width of a residual group moves resnet20's FLOPs by
    several percent, and from these random logits the steps on the logits stall off the
    budget (at 0.383 for 0.35, seed 2, before the walk on the widths was added): the
    projection still ends within tolerance, and so does the independent count of the
    exported network."""
    from s2hpruner import count_flops

    torch.manual_seed(seed)
    model = create_model("resnet20", num_classes=10, in_chans=1)
    x = torch.randn(1, 1, 28, 28)
    pruner = S2HPruner(model, x, target_flops=target, round_to=8)
    with torch.no_grad():
        for u in pruner.mask_parameters():
            u.normal_(0, 1.0)
    assert project_to_budget(pruner, tolerance=0.005) > 0
    assert abs(float(pruner.flops_ratio("hard")) - target) <= 0.005
    exported = count_flops(pruner.export(), x) / count_flops(model, x)
    assert abs(exported - target) <= 0.005


def test_the_step_the_search_first_meets_the_budget_is_recorded_and_resumed():
    """``budget_met_step``: the first joint step whose hard network is within tolerance of
    the budget (None while it is not), kept across a state_dict round trip."""
    model, pruner, trainer, x, y = setup("s2h", freeze=0.1)
    assert abs(pruner.ratio("hard") - 0.35) > trainer.balancer.tolerance
    trainer.step(x, y)
    assert trainer.budget_met_step is None  # step 0's hard network was off budget
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        project_to_budget(pruner, trainer.balancer.tolerance)  # now on the budget
    trainer.step(x, y)
    assert trainer.budget_met_step == 1
    trainer.step(x, y)
    assert trainer.budget_met_step == 1  # the first time only
    *_, fresh, _, _ = setup("s2h", freeze=0.1)
    fresh.load_state_dict(trainer.state_dict())
    assert fresh.budget_met_step == 1


def test_phase_fractions_that_leave_no_search_are_refused():
    with pytest.raises(ValueError, match="joint search phase"):
        setup("s2h", warmup=0.5, freeze=0.5)


def test_balancer_scales_gap_and_resource_by_norms():
    params = [torch.zeros(3), torch.zeros(2)]
    task = [torch.tensor([3.0, 0, 0]), torch.tensor([0.0, 4.0])]  # norm 5
    gap = [torch.tensor([0.0, 10.0, 0]), torch.zeros(2)]  # norm 10
    res = [torch.zeros(3), torch.tensor([0.0, 0.001])]
    bal = GradientBalancer(beta=0.5, gamma=2.0)
    out = torch.cat([g.reshape(-1) for g in bal.combine(params, task, gap, res)])
    acc = torch.tensor([3.0, 2.5, 0, 0, 4.0])  # task + 0.5 * 5/10 * gap
    expected = acc + 2.0 * acc.norm() * torch.tensor([0, 0, 0, 0, 1.0])
    assert torch.allclose(out, expected)
    bal.update(0.6 - 0.35)
    assert bal.gamma == pytest.approx(2.0 * bal.growth)
    bal.update(0.351 - 0.35)
    assert bal.gamma == pytest.approx(2.0)


def test_per_group_balancer_scales_each_group_by_its_own_norms():
    """Per group, every group's resource part is gamma times that group's accuracy norm; the
    global rule gives one group's resource gradient the whole accuracy norm."""
    params = [torch.zeros(2), torch.zeros(2)]
    task = [torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.1])]  # norms 5 and 0.1
    gap = [torch.tensor([0.0, 10.0]), torch.tensor([1.0, 0.0])]
    res = [torch.tensor([0.0, -2.0]), torch.tensor([0.0, -0.001])]
    bal = GradientBalancer(beta=0.5, gamma=2.0, scope="per_group")
    out = bal.combine(params, task, gap, res)
    acc = [torch.tensor([3.0, 6.5]), torch.tensor([0.05, 0.1])]  # task + 0.5 * |t|/|g| * g
    for got, a, r in zip(out, acc, res, strict=True):
        assert torch.allclose(got, a + 2.0 * a.norm() * r / r.norm())
    glob = GradientBalancer(beta=0.5, gamma=2.0).combine(params, task, gap, res)
    assert not torch.allclose(glob[1], out[1])  # the scopes differ on unequal groups
    with pytest.raises(ValueError, match="per_group"):
        GradientBalancer(scope="per-group")


def test_bf16_autocast_step_agrees_with_fp32():
    """The bf16 step computes the same losses and gradients as fp32, within bf16's precision
    (8 bits of mantissa: a few percent), on CPU."""
    results = {}
    for autocast in (None, "bf16"):
        model, pruner, trainer, x, y = setup("s2h", autocast=autocast)
        grads = trainer.gradients(x, y, "joint")
        flat_w = torch.cat([g.flatten() for g in grads.weights["task"] if g is not None])
        flat_u = torch.cat([g.flatten() for g in grads.masks["task"] if g is not None])
        results[autocast] = (grads.losses, flat_w, flat_u)
    (l32, w32, u32), (l16, w16, u16) = results[None], results["bf16"]
    for key in ("task", "gap_hard", "gap_soft"):
        assert l16[key] == pytest.approx(l32[key], rel=0.05, abs=0.01), key
    assert torch.nn.functional.cosine_similarity(w16, w32, dim=0) > 0.98
    # the width logits' task gradient sums tiny per-channel terms: bf16 rounding shows more
    assert torch.nn.functional.cosine_similarity(u16, u32, dim=0) > 0.9
    assert not torch.equal(w16, w32)  # autocast really ran in bf16
    model, pruner, trainer, x, y = setup("s2h", autocast="bf16")
    losses = trainer.step(x, y)  # a whole step runs and updates in fp32 parameters
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(torch.tensor(losses["task"]))


class DictOutput(nn.Module):
    """A model whose forward returns a dict, like many detection/HF-style wrappers."""

    def __init__(self):
        super().__init__()
        self.body = create_model("resnet20", num_classes=10, in_chans=1)

    def forward(self, x):
        return {"logits": self.body(x), "features": x.mean()}


def test_outputs_that_are_not_tensors_and_custom_losses():
    assert torch.equal(logits_of((torch.ones(2), 3)), torch.ones(2))
    assert torch.equal(logits_of(type("O", (), {"logits": torch.zeros(1)})()), torch.zeros(1))
    torch.manual_seed(0)
    model = DictOutput()
    x = torch.randn(8, 1, 16, 16)
    pruner = S2HPruner(model, x[:1], target_flops=0.5)
    soft_targets = torch.softmax(torch.randn(8, 10), -1)  # e.g. a teacher's or mixup's
    calls = []

    def loss_fn(logits, target):
        calls.append(target.shape)
        return torch.sum(-target * torch.log_softmax(logits, -1), -1).mean()

    trainer = S2HTrainer(model, pruner, torch.optim.SGD(model.parameters(), lr=0.01), 4,
                         loss_fn=loss_fn, freeze=0.0)  # fmt: skip
    losses = trainer.step(x, soft_targets)
    assert calls and calls[0] == soft_targets.shape and losses["task"] > 0
    with pytest.raises(TypeError, match="output="):
        logits_of(object())


def test_freeze_ranks_after_warmup():
    model, pruner, trainer, x, y = setup("s2h", warmup=0.2, freeze_ranks_after_warmup=True)
    trainer.step(x, y)
    assert not pruner.freeze_ranks  # warm-up: the order follows the weights
    trainer.step_count = 2
    trainer.step(x, y)
    assert pruner.freeze_ranks
    ranks = pruner.search.ranks.clone()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(torch.rand_like(p))
    trainer.step(x, y)
    assert torch.equal(ranks, pruner.search.ranks)


def test_trainer_state_round_trip():
    model, pruner, trainer, x, y = setup("s2h")
    trainer.step_count = 2
    trainer.step(x, y)
    state = trainer.state_dict()
    _, _, other, _, _ = setup("s2h")
    other.load_state_dict(state)
    assert other.step_count == 3 and other.balancer.gamma == trainer.balancer.gamma
    assert other.mask_optimizer.state_dict()["state"].keys() == state["mask_optimizer"][
        "state"].keys()  # fmt: skip


def test_search_reaches_budget_and_training_learns_on_real_digits():
    """A real (small) run on scikit-learn's bundled digits, written as a user's own loop:
    the soft and hard networks learn far beyond chance and the budget is met."""
    from torch.utils.data import DataLoader

    from s2hpruner.app.data import build_datasets

    torch.manual_seed(0)
    splits = build_datasets("digits", val_size=200, seed=0)
    model = create_model("resnet20", num_classes=10, in_chans=1)
    pruner = S2HPruner(model, torch.zeros(1, 1, 8, 8), target_flops=0.5)
    loader = DataLoader(splits.train, batch_size=64, shuffle=True, drop_last=True)
    steps = 6 * len(loader)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)  # fmt: skip
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    trainer = S2HTrainer(model, pruner, optimizer, steps, mask_lr=0.1, freeze=0.25)
    for _ in range(6):
        for x, y in loader:
            trainer.step(x, y)
            schedule.step()
    test = DataLoader(splits.test, batch_size=256)
    exported = trainer.export()
    hard = evaluate(exported, test, torch.device("cpu"))
    soft = evaluate(model, test, torch.device("cpu"), pruner, "soft")
    assert abs(float(pruner.flops_ratio("hard")) - 0.5) <= 0.01
    assert hard > 80.0 and soft > 80.0, (hard, soft)


def _fixed_teacher() -> torch.nn.Module:
    torch.manual_seed(1)
    teacher = create_model("resnet20", num_classes=10, in_chans=1)
    return teacher.train()


@pytest.mark.parametrize("teacher", ["soft", "none", "module"])
def test_last_phase_teacher(monkeypatch, teacher):
    """Once the widths freeze, the hard network trains on L + alpha * KL(soft || hard) with
    freeze_teacher="soft", on L alone (no soft forward at all) with "none", and on
    L + alpha * KL(teacher || hard) with a fixed module (in eval mode; no soft forward)."""
    fixed = _fixed_teacher() if teacher == "module" else None
    model, pruner, trainer, x, y = setup("s2h", alpha=0.7, freeze=0.3,
                                         freeze_teacher=fixed or teacher)  # fmt: skip
    trainer.freeze_widths()
    weights = list(model.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hard_stats = {k: v.clone() for k, v in pruner.hard_stats.state_dict().items()}
    with torch.no_grad(), pruner.mode("soft"):
        soft = model(x)
    with torch.no_grad():
        target = {"soft": soft, "none": None, "module": fixed(x) if fixed else None}[teacher]
    with pruner.mode("hard"):
        hard = model(x)
    loss = torch.nn.functional.cross_entropy(hard, y)
    if target is not None:
        loss = loss + 0.7 * kl(target, hard)
    expected = torch.autograd.grad(loss, weights, allow_unused=True)
    model.load_state_dict(state)
    pruner.hard_stats.load_state_dict(hard_stats)
    seen, original = [], pruner.mode
    monkeypatch.setattr(pruner, "mode", lambda m, **kw: seen.append(m) or original(m, **kw))
    grads = trainer.gradients(x, y, "freeze")
    assert seen == (["soft", "hard"] if teacher == "soft" else ["hard"])
    assert set(grads.weights) == {"task"} and not grads.masks, "u stays frozen"
    for g, e in zip(grads.weights["task"], expected, strict=True):
        assert (g is None and e is None) or torch.allclose(g, e, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="freeze_teacher"):
        setup("s2h", freeze_teacher="init")


def test_a_fixed_teacher_is_never_trained_and_never_the_pruned_model():
    """A module teacher is put in eval mode without gradients, a whole step leaves its
    weights and BN statistics as they were, and the pruned model itself is refused."""
    teacher = _fixed_teacher()
    model, pruner, trainer, x, y = setup("s2h", freeze=0.9, freeze_teacher=teacher)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer.step_count = trainer.freeze_start
    trainer.step(x, y)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="shares weights with the model being pruned"):
        S2HTrainer(model, pruner, trainer.optimizer, 10, freeze_teacher=model)
