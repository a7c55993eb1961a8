"""Saving the pruned network so that it runs without s2hpruner.

Physical pruning itself is torch-pruning's job (see :meth:`S2HPruner.export`); this module
writes the result as a ``torch.export`` program (``.pt2``: loads with plain
``torch.export.load(path).module()``, no s2hpruner import needed) and as ONNX, and checks the
ONNX file with onnxruntime. Files are written to a temporary name and renamed, so a crash never
leaves a half-written model in place of a good one.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import torch
from torch import nn


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """``write`` into a temporary file in ``path``'s folder, then rename it to ``path``: a
    crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself, on disk (where folders can be)
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Delete the temporary files :func:`_atomic_write` left in ``folder`` for ``names`` when
    its process was killed mid-write (SIGKILL skips the cleanup): a run preempted again and
    again would pile up checkpoint-sized files. Returns what was deleted."""
    removed = []
    for name in names:
        for tmp in Path(folder).glob(f".{name}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
                removed.append(tmp)
    return removed


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves a truncated file at ``path`` (streamed to the
    temporary file: a checkpoint is not held in memory twice)."""
    _atomic_write(path, lambda f: torch.save(obj, f))


def _batch_dims(example: torch.Tensor):
    return ({0: torch.export.Dim("batch", min=1, max=65536)},)


def _example_batch(example: torch.Tensor) -> torch.Tensor:
    """A batch of two: torch.export specialises a size-1 dimension to the constant 1."""
    return example[:1].expand(2, *example.shape[1:]).contiguous()


def save_program(model: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> Path:
    """Save ``model`` (eval mode) as a ``torch.export`` program with a dynamic batch size."""
    was_training = model.training
    model.eval()
    try:
        program = torch.export.export(
            model, (_example_batch(example),), dynamic_shapes=_batch_dims(example)
        )
    finally:
        model.train(was_training)
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def load_program(path: str | os.PathLike) -> nn.Module:
    """Load a program written by :func:`save_program` as a callable module."""
    return torch.export.load(str(path)).module()


def save_onnx(model: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> Path:
    """Export ``model`` (eval mode) to ONNX with a dynamic batch size."""
    path = Path(path)
    was_training = model.training
    model.eval()
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(
                model,
                (example,),
                str(tmp),
                dynamic_shapes=_batch_dims(example),
                dynamo=True,
                external_data=False,
            )
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return path


def onnx_max_abs_diff(model: nn.Module, example: torch.Tensor, path: str | os.PathLike) -> float:
    """Largest difference between onnxruntime's and PyTorch's outputs on ``example``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: example.detach().cpu().numpy()}
    onnx_out = torch.from_numpy(session.run(None, feed)[0])
    was_training = model.training
    model.eval()
    with torch.no_grad():
        torch_out = model(example).cpu()
    model.train(was_training)
    return float((onnx_out - torch_out).abs().max())
