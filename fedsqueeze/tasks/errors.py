"""The one exception type for task, data and partition problems a user can cause."""

from __future__ import annotations

from collections.abc import Iterable


class TaskError(ValueError):
    """A task name, option, partition or data file that cannot be used; the message says why."""


def choices(values: Iterable[object]) -> str:
    """Render valid choices for an error message."""
    return ", ".join(repr(v) for v in sorted(values, key=str))
