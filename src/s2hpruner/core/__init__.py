"""The method: channel groups, masks and width search, forward modes, resources, the sliced
hard pass, physical pruning and the trainer. Imports torch and torch-pruning, never ``app``."""

from .errors import S2HError
from .pruner import S2HPruner, uniform_widths
from .resources import count_flops, count_params
from .trainer import METHODS, Method, S2HTrainer, evaluate

__all__ = [
    "METHODS",
    "Method",
    "S2HError",
    "S2HPruner",
    "S2HTrainer",
    "count_flops",
    "count_params",
    "evaluate",
    "uniform_widths",
]
