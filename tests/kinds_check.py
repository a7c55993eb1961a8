"""Shared checks for the per-kind tests (tests/test_kinds_*.py): the SPEC's invariant that the
hard-masked network IS the exported network, and the pruner's FLOPs / parameter predictions
against the independent counters (torch.utils.flop_counter, parameter count)."""

from __future__ import annotations

import torch
from torch import nn

from s2hpruner import S2HPruner, S2HTrainer, count_flops, count_params


def logits(output) -> torch.Tensor:
    """A tensor, or a Hugging Face output object's ``.logits``."""
    return output if torch.is_tensor(output) else output.logits


def randomise(pruner: S2HPruner, seed: int, scale: float = 2.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for u in pruner.mask_parameters():
            u.copy_(torch.randn(u.shape, generator=gen) * scale)
    pruner.update_ranks()


def check_exact(model: nn.Module, x: torch.Tensor, seed: int = 0, target: float = 0.5,
                **kwargs) -> tuple[S2HPruner, nn.Module, float]:  # fmt: skip
    """Eval mode, random width logits: masked hard == sliced hard == exported (max abs error
    below 1e-4 of the output scale), and FLOPs / parameters predicted within 1% of the
    counters. Returns (pruner, exported model, max relative error)."""
    torch.manual_seed(seed)
    model.eval()
    pruner = S2HPruner(model, x, target_flops=target, **kwargs)
    randomise(pruner, seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        with pruner.mode("soft"):
            soft = logits(model(x))
        with pruner.mode("hard", sliced=False):
            masked = logits(model(x))
        sliced = None
        if pruner.sliced_hard:
            with pruner.mode("hard", sliced=True):
                sliced = logits(model(x))
    assert torch.isfinite(soft).all()
    exported = pruner.export().eval()
    with torch.no_grad():
        pruned = logits(exported(x))
    scale = masked.abs().max().clamp_min(1e-6)
    error = float((masked - pruned).abs().max() / scale)
    assert error <= 1e-4, f"hard network != exported network ({error:.2e})"
    if sliced is not None:
        assert float((sliced - pruned).abs().max() / scale) <= 1e-4, "sliced hard != exported"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    full = pruner.resources.full_flops
    counted = count_flops(exported, x)
    predicted = pruner.ratio("hard") * full
    assert counted < full, "nothing was pruned"
    assert abs(predicted / counted - 1) <= 0.01, (predicted, counted)
    params = float(pruner.params("hard").detach())
    assert abs(params / count_params(exported) - 1) <= 0.01, (params, count_params(exported))
    print(f"max rel error {error:.2e}, FLOPs ratio {counted / full:.3f}, "
          f"FLOPs pred/counted - 1 {predicted / counted - 1:+.1e}, "
          f"params pred/counted - 1 {params / count_params(exported) - 1:+.1e}")
    return pruner, exported, error


def check_sliced_equals_masked_in_training(model: nn.Module, x: torch.Tensor, seed: int = 0,
                                           **kwargs) -> S2HPruner:  # fmt: skip
    """Train mode: the sliced hard pass gives the masked one's outputs and gradients (weights
    and width logits)."""
    torch.manual_seed(seed)
    pruner = S2HPruner(model, x, target_flops=0.5, **kwargs)
    randomise(pruner, seed)
    assert pruner.sliced_hard, pruner.unsliceable
    model.train()
    weights = [p for p in model.parameters() if p.requires_grad]
    masks = pruner.mask_parameters()
    results = []
    for sliced in (False, True):
        torch.manual_seed(1)
        with pruner.mode("hard", sliced=sliced):
            out = logits(model(x))
        loss = (out * torch.linspace(-1, 1, out.shape[-1])).sum()
        grads = torch.autograd.grad(loss, weights + masks, allow_unused=True)
        results.append((out.detach(), grads))
    (out_m, grads_m), (out_s, grads_s) = results
    assert (out_m - out_s).abs().max() <= 1e-4 * out_m.abs().max()
    for part in (slice(0, len(weights)), slice(len(weights), None)):
        gm = torch.cat([g.reshape(-1) for g in grads_m[part] if g is not None])
        gs = torch.cat([g.reshape(-1) for g in grads_s[part] if g is not None])
        assert gm.norm() > 0
        assert (gm - gs).norm() <= 1e-3 * gm.norm()
    model.eval()
    return pruner


def train_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 2) -> None:
    """A few S2HTrainer steps in train mode: finite losses, weights and width logits move,
    and the exported model runs."""
    torch.manual_seed(0)
    pruner = S2HPruner(model, x, target_flops=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    trainer = S2HTrainer(model, pruner, optimizer, total_steps=steps, freeze=0.0)
    start = [p.detach().clone() for p in model.parameters()]
    logits_before = [u.detach().clone() for u in pruner.mask_parameters()]
    model.train()
    for _ in range(steps):
        losses = trainer.step(x, y)
        assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    assert any(not torch.equal(a, p) for a, p in zip(start, model.parameters(), strict=True))
    assert any(not torch.equal(a, u) for a, u in
               zip(logits_before, pruner.mask_parameters(), strict=True))  # fmt: skip
    exported = pruner.export().eval()
    with torch.no_grad():
        assert logits(exported(x)).shape[0] == x.shape[0]
