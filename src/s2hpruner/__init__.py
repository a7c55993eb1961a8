"""s2hpruner: prune image models to a FLOPs, parameter or latency budget with S2HPruner
(NeurIPS 2024). ``import s2hpruner`` loads the method (``core``) only; the command line and its
run loop live in ``s2hpruner.app``."""

from .core import METHODS, Method, S2HError, S2HPruner, S2HTrainer, count_flops, count_params
from .core.trainer import evaluate

__all__ = [
    "METHODS",
    "Method",
    "S2HError",
    "S2HPruner",
    "S2HTrainer",
    "count_flops",
    "count_params",
    "evaluate",
]
__version__ = "0.2.0"
