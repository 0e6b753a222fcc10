"""The one exception type for bad tracking input (run names, metric values, unreadable run directories)."""

from __future__ import annotations


class TrackingError(ValueError):
    """A metrics row, run directory or config that cannot be recorded or read; the message says why."""
