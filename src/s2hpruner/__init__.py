"""s2hpruner: prune image models to a FLOPs budget with S2HPruner (NeurIPS 2024)."""

from .errors import S2HError
from .pruner import S2HPruner
from .resources import count_flops, count_params

__all__ = ["S2HPruner", "S2HError", "count_flops", "count_params"]
__version__ = "0.1.0"
