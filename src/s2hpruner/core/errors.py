"""Errors a user can act on. Each message names the problem and the fix.

The CLI turns any :class:`S2HError` into a one-line message and exit code 2.
"""

from __future__ import annotations


class S2HError(Exception):
    """Base class: bad input that the user can fix (exit code 2 in the CLI)."""


class UnknownNameError(S2HError, KeyError):
    """A model or data set name that is not in its registry."""

    def __init__(self, kind: str, name: str, known: list[str]):
        self.kind, self.name, self.known = kind, name, known
        super().__init__(f"unknown {kind} {name!r}; known {kind}s: {', '.join(sorted(known))}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


class DataNotFoundError(S2HError, FileNotFoundError):
    """A data set root that lacks some of the files its format needs."""


class DataFormatError(S2HError, ValueError):
    """A data file that exists but is corrupt or not in the expected format."""


class BudgetError(S2HError, ValueError):
    """A FLOPs target that is out of range or below what the model can reach."""


class UnsupportedModelError(S2HError, ValueError):
    """A model the pruner cannot handle (unsupported layer, nothing to prune)."""


class CheckpointError(S2HError, RuntimeError):
    """A checkpoint that is corrupt or does not belong to this run."""


class RunDirectoryError(S2HError, FileExistsError):
    """An output directory that holds a finished run (use --overwrite)."""


class NonFiniteLossError(S2HError, FloatingPointError):
    """Training produced a NaN or infinite loss."""
