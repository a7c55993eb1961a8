"""Data-parallel helpers on top of torch.distributed (processes launched by ``torchrun``).

Gradients are averaged with ``all_reduce`` after the training step computed them, because the
step computes them with ``torch.autograd.grad`` (three differently routed gradients), which
DistributedDataParallel's backward hooks would not see. Every rank therefore applies the same
averaged gradient and holds identical weights, width logits and optimizer states.

The per-rank batch is ``--batch-size``; a step sees ``world_size`` times as many images. The
weights' gradient is then that of the whole batch (with BatchNorm's per-rank batch statistics).
The width logits' raw task and gap gradients are averaged before the norm balancing
(balance.py), so their balanced gradient is the whole batch's as well.
BatchNorm running statistics, the model's and the pruner's hard-network copy, drift apart
between ranks during an epoch; run.py averages them before every checkpoint and evaluation.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def setup(device: str = "auto") -> torch.device:
    """Join the process group if launched by torchrun; pick this process's device."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from .errors import S2HError

        raise S2HError("--device cuda was asked for but CUDA is not available; use --device cpu")
    if launched and not is_distributed():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        dist.init_process_group(backend=backend)
    if device.startswith("cuda"):
        # torchrun: one device per local rank; a single process: the one asked for (cuda:N)
        chosen = torch.device(device)
        local = int(os.environ.get("LOCAL_RANK", chosen.index or 0))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device(device)


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()


def average_gradients(params: Sequence[torch.Tensor]) -> None:
    """Average ``p.grad`` over all ranks (no-op in a single process).

    A parameter with a gradient on some ranks only (a branch one rank's batch did not take)
    counts as zeros on the others, as DistributedDataParallel does: every rank then reduces the
    same tensors (skipping its own ``None`` would pair mismatched buffers or hang) and applies
    the same step. A parameter with no gradient on any rank keeps ``None``."""
    if not is_distributed() or not params:
        return
    grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
    present = torch.tensor([float(p.grad is not None) for p in params], device=grads[0].device)
    flat = torch.cat([*(g.reshape(-1) for g in grads), present.to(grads[0].dtype)])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)  # one reduce: the gradients and who had them
    counts = flat[-len(params):].tolist()
    flat = flat[: -len(params)] / world_size()
    offset = 0
    for p, g, count in zip(params, grads, counts, strict=True):
        if count > 0:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            p.grad = g
        offset += g.numel()


def _on_backend_device(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` where the process group can reduce it: NCCL takes CUDA tensors only, so a
    CPU value (a loss sum, a flag) goes through the current CUDA device."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return tensor.cuda()
    return tensor


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of ``value`` (a copy, on ``value``'s device)."""
    if not is_distributed():
        return value
    total = _on_backend_device(value.clone())
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(value.device)


def all_true(flag: bool) -> bool:
    """Whether ``flag`` holds on every rank: every rank gets the same answer, so all of them
    take the same branch (one rank raising alone would leave the others in a collective)."""
    if not is_distributed():
        return flag
    value = _on_backend_device(torch.tensor([1.0 if flag else 0.0]))
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0.0)


def average_gradient_list(
    grads: Sequence[torch.Tensor | None], like: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Rank average of a per-parameter gradient list (None counts as zeros)."""
    filled = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, like, strict=True)]
    if not is_distributed():
        return filled
    flat = torch.cat([g.reshape(-1) for g in filled])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    out, offset = [], 0
    for g in filled:
        out.append(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return out


def average_tensors(tensors: Sequence[torch.Tensor]) -> None:
    """Average floating-point tensors in place over ranks (others are left alone)."""
    if not is_distributed():
        return
    for tensor in tensors:
        if tensor.is_floating_point():
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= world_size()


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over ranks."""
    average_tensors(list(module.buffers()))


def broadcast_floats(values: Sequence[float]) -> list[float]:
    """Rank 0's values on every rank (e.g. a measured latency all ranks must share)."""
    if not is_distributed():
        return list(values)
    tensor = _on_backend_device(torch.tensor(list(values), dtype=torch.float64))
    dist.broadcast(tensor, src=0)
    return tensor.cpu().tolist()


def broadcast_object(obj):
    """Rank 0's (picklable) object on every rank, e.g. a state dict only rank 0 measured."""
    if not is_distributed():
        return obj
    box = [obj if is_main() else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj) -> list:
    """Every rank's (picklable) ``obj``, in rank order, on every rank (a collective)."""
    if not is_distributed():
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if is_distributed():
        dist.barrier()
