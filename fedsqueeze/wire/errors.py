"""The one exception the wire layer raises for payloads it cannot encode or decode."""

from __future__ import annotations


class PayloadError(ValueError):
    """A payload that is malformed, truncated, oversized, inconsistent with the expected layout,
    or (when encoding) a Compressed object that has no valid wire form; the message says why."""
