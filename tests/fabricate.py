"""Small data sets written in real on-disk formats, for end-to-end tests."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    """An IDX file: 00 00 08 <ndim>, big-endian dims, uint8 data; gzip when path ends .gz."""
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def learnable_fashion_mnist(root: Path, n_train: int = 600, n_test: int = 200, seed: int = 0):
    """Fashion-MNIST-format IDX files (gzipped, like Debian's) whose class sets the image's
    overall brightness over noise: learnable in a few steps, whatever the crop or flip."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.permutation(np.arange(n) % 10).astype(np.uint8)
        noise = rng.integers(0, 40, (n, 28, 28))
        images = (noise + 20 * labels[:, None, None].astype(np.int64) + 10).clip(0, 255)
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images.astype(np.uint8))
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def tiny_config(base: Path) -> Path:
    """A config file of the 4-channel-wide resnet20 the run tests train."""
    config = base / "tiny.yaml"
    config.write_text("model_kwargs:\n  width: 4\n")
    return config


def one_thread_run(config: Path, root: Path, out: Path, *flags: str) -> int:
    """``s2hpruner prune`` with ``config`` on the data at ``root`` into ``out``, in one torch
    thread (two shared cores: more threads only slow a tiny model down)."""
    import torch

    from s2hpruner.app.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(["prune", "--config", str(config), "--data-root", str(root), "--out",
                     str(out), *flags])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
