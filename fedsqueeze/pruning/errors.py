"""The one exception a user can cause while pruning (a bad run directory, option or statistic)."""

from __future__ import annotations


class PruneError(ValueError):
    """A run directory, option or calibration statistic that cannot be used; the message says which and why."""
