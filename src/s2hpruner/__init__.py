"""s2hpruner: prune image models to a FLOPs, parameter or latency budget with S2HPruner
(NeurIPS 2024). ``import s2hpruner`` loads the method (``core``) only; the command line and its
run loop live in ``s2hpruner.app``."""

from .core import *  # noqa: F403  (the public API is the core's)
from .core import __all__  # noqa: F401

__version__ = "0.2.0"
