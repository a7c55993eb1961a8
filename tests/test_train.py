"""Gradient routing of the training step (SPEC section 5) and that training really learns."""

import pytest
import torch

from s2hpruner import S2HPruner
from s2hpruner.balance import GradientBalancer
from s2hpruner.config import RunConfig
from s2hpruner.models import create_model
from s2hpruner.train import build_optimizers, compute_gradients, evaluate, kl, train_step


def setup(method="s2h", seed=0):
    torch.manual_seed(seed)
    model = create_model("resnet20", num_classes=10, in_chans=1)
    x = torch.randn(8, 1, 16, 16)
    y = torch.randint(0, 10, (8,))
    pruner = S2HPruner(model, x[:1], target_flops=0.35, separate_hard_bn_stats=True)
    with torch.no_grad():  # a mid-search state: soft and hard networks differ
        for u in pruner.mask_parameters():
            u.normal_(0, 1.0)
    pruner.update_ranks()
    cfg = RunConfig(method=method, target_flops=0.35)
    return model, pruner, x, y, cfg


def nonzero(grads) -> bool:
    return any(g is not None and g.abs().sum() > 0 for g in grads)


def test_gap_soft_reaches_width_logits_but_never_weights():
    model, pruner, x, y, cfg = setup("s2h")
    grads = compute_gradients(model, pruner, x, y, cfg, "joint")
    assert "gap_soft" not in grads.weights, "G_s must never reach the weights"
    assert nonzero(grads.masks["gap_soft"]), "G_s must reach the width logits"
    assert nonzero(grads.weights["gap_hard"]), "G_h must reach the weights (hard network)"
    assert nonzero(grads.masks["gap_hard"]), "G_h must reach u through m_hat"
    assert nonzero(grads.weights["task"]) and nonzero(grads.masks["task"])
    assert set(grads.masks) == {"task", "gap_hard", "gap_soft", "resource"}


def test_weight_update_is_exactly_task_plus_alpha_gap_hard():
    """An independent recomputation: the weights' gradient in a real step equals
    d(L + alpha*G_h)/dtheta, and differs from what coupling G_s would give."""
    model, pruner, x, y, cfg = setup("s2h")
    cfg.alpha = 0.7
    weights = list(model.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hard_stats = {k: {b: t.clone() for b, t in v.items()} for k, v in pruner.hard_bn_stats.items()}

    def reference(with_gap_soft):
        model.load_state_dict(state)
        pruner.hard_bn_stats = {k: {b: t.clone() for b, t in v.items()}
                                for k, v in hard_stats.items()}
        with pruner.mode("soft"):
            soft = model(x)
        with pruner.mode("hard"):
            hard = model(x)
        loss = torch.nn.functional.cross_entropy(soft, y) + cfg.alpha * kl(soft.detach(), hard)
        if with_gap_soft:
            loss = loss + kl(soft, hard.detach())
        return torch.autograd.grad(loss, weights)

    expected, coupled = reference(False), reference(True)
    model.load_state_dict(state)
    pruner.hard_bn_stats = hard_stats
    opt = build_optimizers(model, pruner, cfg, total_steps=10)
    for group in opt.weights.param_groups:  # plain SGD so the update reveals the gradient
        group.update(lr=1.0, momentum=0.0, weight_decay=0.0, nesterov=False)
    before = [p.detach().clone() for p in weights]
    train_step(model, pruner, x, y, opt, cfg, "joint")
    applied = [b - p.detach() for b, p in zip(before, weights, strict=True)]
    for a, e in zip(applied, expected, strict=True):
        assert torch.allclose(a, e, atol=1e-5, rtol=1e-4)
    assert any(not torch.allclose(e, c, atol=1e-6) for e, c in zip(expected, coupled, strict=True))


def test_coupled_ablation_lets_gap_soft_reach_weights():
    model, pruner, x, y, cfg = setup("s2h-coupled")
    grads = compute_gradients(model, pruner, x, y, cfg, "joint")
    assert nonzero(grads.weights["gap_soft"])
    assert nonzero(grads.masks["gap_soft"])


def test_no_gs_and_no_gap_on_mask_ablations():
    model, pruner, x, y, cfg = setup("s2h-no-gs")
    grads = compute_gradients(model, pruner, x, y, cfg, "joint")
    assert "gap_soft" not in grads.masks and "gap_soft" not in grads.weights
    assert nonzero(grads.masks["gap_hard"])
    model, pruner, x, y, cfg = setup("s2h-no-gap-on-mask")
    grads = compute_gradients(model, pruner, x, y, cfg, "joint")
    assert set(grads.masks) == {"task", "resource"}
    assert nonzero(grads.weights["gap_hard"]), "G_h still trains the weights"


def test_dmp_never_runs_the_hard_network(monkeypatch):
    model, pruner, x, y, cfg = setup("dmp")
    seen = []
    original = pruner.mode

    def spy(mode):
        seen.append(mode)
        return original(mode)

    monkeypatch.setattr(pruner, "mode", spy)
    opt = build_optimizers(model, pruner, cfg, total_steps=10)
    for phase in ("warmup", "joint", "dmp-freeze"):
        train_step(model, pruner, x, y, opt, cfg, phase)
    assert seen and "hard" not in seen


def test_frozen_phases_leave_width_logits_alone():
    model, pruner, x, y, cfg = setup("s2h")
    opt = build_optimizers(model, pruner, cfg, total_steps=10)
    before = [u.detach().clone() for u in pruner.mask_parameters()]
    for phase in ("warmup", "freeze"):
        train_step(model, pruner, x, y, opt, cfg, phase)
    assert all(torch.equal(b, u) for b, u in zip(before, pruner.mask_parameters(), strict=True))
    train_step(model, pruner, x, y, opt, cfg, "joint")
    assert any(not torch.equal(b, u) for b, u in zip(before, pruner.mask_parameters(),
                                                       strict=True))


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
    bal.update(flops_ratio=0.6, target=0.35)
    assert bal.gamma == pytest.approx(2.0 * bal.growth)
    bal.update(flops_ratio=0.351, target=0.35)
    assert bal.gamma == pytest.approx(2.0)


def test_search_reaches_budget_and_training_learns_on_real_digits():
    """A real (small) run on scikit-learn's bundled digits: the soft and hard networks learn
    far beyond chance and the search meets the FLOPs budget."""
    from torch.utils.data import DataLoader

    from s2hpruner.data import build_datasets
    from s2hpruner.train import phase_of, project_to_budget

    torch.manual_seed(0)
    splits = build_datasets("digits", val_size=200, seed=0)
    model = create_model("resnet20", num_classes=10, in_chans=1)
    pruner = S2HPruner(model, torch.zeros(1, 1, 8, 8), target_flops=0.5,
                       separate_hard_bn_stats=True)
    cfg = RunConfig(method="s2h", target_flops=0.5, epochs=6, freeze_epochs=1.5, lr=0.05,
                    mask_lr=0.1, batch_size=64)
    loader = DataLoader(splits.train, batch_size=64, shuffle=True, drop_last=True)
    steps = int(cfg.epochs * len(loader))
    opt = build_optimizers(model, pruner, cfg, steps)
    step = 0
    while step < steps:
        for x, y in loader:
            phase = phase_of(step / len(loader), cfg)
            if phase == "freeze" and not pruner.freeze_ranks:
                pruner.freeze_ranks = True
                project_to_budget(pruner, cfg.target_flops, cfg.budget_tolerance)
            train_step(model, pruner, x, y, opt, cfg, phase)
            step += 1
            if step == steps:
                break
    test = DataLoader(splits.test, batch_size=256)
    exported = pruner.export()
    hard = evaluate(exported, test, torch.device("cpu"))
    soft = evaluate(model, test, torch.device("cpu"), pruner, "soft")
    assert abs(float(pruner.flops_ratio("hard")) - 0.5) <= 0.01
    assert hard > 80.0 and soft > 80.0, (hard, soft)
