"""Train/eval modes kept per module.

Tracing, counting, timing and evaluating run a model in eval mode for a moment. Restoring
with ``model.train(was_training)`` would put every submodule in the root's mode, undoing a
user's ``model.backbone.eval()`` (a frozen backbone's BatchNorm, common when fine-tuning a
trained model): its running statistics would then move with every batch. So each module
gets back its own mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def evaluating(*models: nn.Module) -> Iterator[None]:
    """Eval mode for the block; afterwards every module has the mode it had before."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    for model in models:
        with contextlib.suppress(NotImplementedError):  # a torch.export program: always eval
            model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def follow_modes(follower: nn.Module, leader: nn.Module) -> None:
    """Give each module of ``follower`` the mode of ``leader``'s module of the same name
    (the physically pruned network follows the model it was cut from)."""
    modes = {name: m.training for name, m in leader.named_modules()}
    for name, module in follower.named_modules():
        module.training = modes.get(name, leader.training)
