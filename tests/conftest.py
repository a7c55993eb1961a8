"""Test-suite settings: one intra-op thread per test process.

The suite runs under pytest-xdist with one worker per core; letting every worker (and the
subprocesses some tests start) spin up OpenMP threads for all cores oversubscribes the machine,
which slows PyTorch's CPU kernels by an order of magnitude.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
sys.path.insert(0, str(Path(__file__).parent))  # tests/fabricate.py

# CI must not fail on an example nobody has seen locally: hypothesis explores the same examples
# on every run (set HYPOTHESIS_PROFILE=explore to search with fresh random examples).
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
