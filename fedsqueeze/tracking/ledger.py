"""The byte ledger: one metrics row per round, cumulative bytes, and the run summary.

Row keys (metrics.jsonl), in this order:
    round, clients_sampled, clients_ok, clients_failed,
    uplink_bytes, downlink_bytes, cum_uplink_bytes, cum_downlink_bytes,
    train_loss, test_loss, test_accuracy,
    subopt, grad_norm_sq, dist_sq          (convex tasks: f(x) - f*, ||grad f(x)||^2, ||x - x*||^2)
    compression_error                      (mean over clients of ||C(v) - v||^2 / ||v||^2)
    wall_s                                 (seconds the round took)
then any extra keys the caller passes (for example `dense_uplink_bytes`, which the comparison table
uses for the compression factor). Bytes are what the caller measured (payload lengths); the ledger
only adds them up. A metric that was not measured is null.
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .errors import TrackingError

ROUND_KEYS = (
    "round",
    "clients_sampled",
    "clients_ok",
    "clients_failed",
    "uplink_bytes",
    "downlink_bytes",
    "cum_uplink_bytes",
    "cum_downlink_bytes",
    "train_loss",
    "test_loss",
    "test_accuracy",
)
CONVEX_KEYS = ("subopt", "grad_norm_sq", "dist_sq")
TAIL_KEYS = ("compression_error", "wall_s")
#: every key a row of a convex task has; non-convex tasks leave out CONVEX_KEYS
METRIC_KEYS = ROUND_KEYS + CONVEX_KEYS + TAIL_KEYS
#: metrics reported as "final" in the summary (the last non-null value of each)
FINAL_KEYS = ("train_loss", "test_loss", "test_accuracy", *CONVEX_KEYS, "compression_error")


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise TrackingError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _number(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TrackingError(f"{name} must be a number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TrackingError(f"{name} must be a number or None, got {value!r}")
    return float(value)


class Ledger:
    """Accumulates per-round rows and the cumulative byte counts.

    `convex=True` puts subopt, grad_norm_sq and dist_sq in every row (null where not given).
    `rows` resumes from rows recorded before (their cumulative bytes carry on).
    """

    def __init__(self, *, convex: bool = False, rows: Sequence[Mapping[str, Any]] = ()) -> None:
        self.convex = convex
        self.rows: list[dict[str, Any]] = [dict(r) for r in rows]
        last = self.rows[-1] if self.rows else {}
        self.cum_uplink_bytes = int(last.get("cum_uplink_bytes") or 0)
        self.cum_downlink_bytes = int(last.get("cum_downlink_bytes") or 0)
        self._last_time = time.perf_counter()

    @property
    def last_round(self) -> int | None:
        return self.rows[-1]["round"] if self.rows else None

    def record(
        self,
        round: int,
        *,
        clients_sampled: int,
        clients_ok: int,
        clients_failed: int = 0,
        uplink_bytes: int,
        downlink_bytes: int,
        train_loss: float | None = None,
        test_loss: float | None = None,
        test_accuracy: float | None = None,
        subopt: float | None = None,
        grad_norm_sq: float | None = None,
        dist_sq: float | None = None,
        compression_error: float | None = None,
        wall_s: float | None = None,
        **extra: Any,
    ) -> dict[str, Any]:
        """Add one round's row and return it. wall_s=None: the time since the previous record (or creation)."""
        now = time.perf_counter()
        r = _count("round", round)
        if self.rows and r <= self.rows[-1]["round"]:
            raise TrackingError(f"round {r} recorded after round {self.rows[-1]['round']}; rounds must increase")
        up, down = _count("uplink_bytes", uplink_bytes), _count("downlink_bytes", downlink_bytes)
        row: dict[str, Any] = {
            "round": r,
            "clients_sampled": _count("clients_sampled", clients_sampled),
            "clients_ok": _count("clients_ok", clients_ok),
            "clients_failed": _count("clients_failed", clients_failed),
            "uplink_bytes": up,
            "downlink_bytes": down,
            "cum_uplink_bytes": self.cum_uplink_bytes + up,
            "cum_downlink_bytes": self.cum_downlink_bytes + down,
            "train_loss": _number("train_loss", train_loss),
            "test_loss": _number("test_loss", test_loss),
            "test_accuracy": _number("test_accuracy", test_accuracy),
        }
        convex = {"subopt": subopt, "grad_norm_sq": grad_norm_sq, "dist_sq": dist_sq}
        if self.convex or any(v is not None for v in convex.values()):
            row.update({k: _number(k, v) for k, v in convex.items()})
        row["compression_error"] = _number("compression_error", compression_error)
        row["wall_s"] = _number("wall_s", wall_s) if wall_s is not None else now - self._last_time
        for key, value in extra.items():
            if key in row:
                raise TrackingError(f"extra metric {key!r} clashes with a standard key")
            row[key] = value.item() if isinstance(value, torch.Tensor) and value.numel() == 1 else value
        self.cum_uplink_bytes, self.cum_downlink_bytes = row["cum_uplink_bytes"], row["cum_downlink_bytes"]
        self.rows.append(row)
        self._last_time = now
        return row

    def summary(self, *, target_accuracy: float | None = None, **extra: Any) -> dict[str, Any]:
        return summarize(self.rows, target_accuracy=target_accuracy, **extra)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def summarize(
    rows: Sequence[Mapping[str, Any]], *, target_accuracy: float | None = None, **extra: Any
) -> dict[str, Any]:
    """The summary.json content for a list of rows.

    final: the last non-null value of each metric; totals: cumulative bytes and summed client
    counts and wall time; bytes_to_target: cumulative uplink bytes at the first round whose
    test_accuracy reached target_accuracy (null if none did or no target was given);
    compression_factor: sum(dense_uplink_bytes) / sum(uplink_bytes) when rows record dense_uplink_bytes.
    """
    last = rows[-1] if rows else {}
    final = {}
    for key in FINAL_KEYS:
        values = [r.get(key) for r in rows if _finite(r.get(key))]
        if values or any(key in r for r in rows):
            final[key] = values[-1] if values else None
    accs = [r["test_accuracy"] for r in rows if _finite(r.get("test_accuracy"))]
    totals: dict[str, Any] = {
        "uplink_bytes": int(last.get("cum_uplink_bytes") or 0),
        "downlink_bytes": int(last.get("cum_downlink_bytes") or 0),
    }
    for key in ("clients_sampled", "clients_ok", "clients_failed"):
        totals[key] = sum(int(r.get(key) or 0) for r in rows)
    totals["wall_s"] = sum(float(r.get("wall_s") or 0.0) for r in rows)
    dense = [r.get("dense_uplink_bytes") for r in rows]
    totals["dense_uplink_bytes"] = sum(int(d) for d in dense) if rows and all(_finite(d) for d in dense) else None
    hit = first_reaching(rows, target_accuracy)
    factor = None
    if totals["dense_uplink_bytes"] is not None and totals["uplink_bytes"] > 0:
        factor = totals["dense_uplink_bytes"] / totals["uplink_bytes"]
    return {
        "rounds": len(rows),
        "last_round": last.get("round"),
        "final": final,
        "best_test_accuracy": max(accs) if accs else None,
        "totals": totals,
        "target_accuracy": target_accuracy,
        "bytes_to_target": None if hit is None else hit["cum_uplink_bytes"],
        "downlink_bytes_to_target": None if hit is None else hit["cum_downlink_bytes"],
        "round_to_target": None if hit is None else hit["round"],
        "compression_factor": factor,
        "diverged": any(isinstance(r.get(k), float) and not math.isfinite(r[k]) for r in rows for k in FINAL_KEYS),
        **extra,
    }


def first_reaching(rows: Iterable[Mapping[str, Any]], target_accuracy: float | None) -> Mapping[str, Any] | None:
    """The first row whose test_accuracy >= target_accuracy, or None."""
    if target_accuracy is None:
        return None
    for r in rows:
        acc = r.get("test_accuracy")
        if _finite(acc) and acc >= target_accuracy:
            return r
    return None


def relative_error(original: torch.Tensor, decoded: torch.Tensor) -> float:
    """||C(v) - v||^2 / ||v||^2 for one client's vector v and its decoded compression C(v).

    For v = 0 the ratio is 0 when C(v) = 0 and infinite otherwise. Computed in the vectors' own
    precision with BLAS dot products (one pass each; it is a metric, taken for every reply).
    """
    v = original.detach().reshape(-1)
    c = decoded.detach().reshape(-1).to(v.dtype)
    if v.shape != c.shape:
        raise TrackingError(f"compressed vector has {c.numel()} entries, the original {v.numel()}")
    diff = c - v
    err = float(torch.dot(diff, diff))
    norm = float(torch.dot(v, v))
    if norm == 0.0:
        return 0.0 if err == 0.0 else math.inf
    return err / norm


def mean_compression_error(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float | None:
    """The compression_error column: the mean of `relative_error` over clients (None with no clients)."""
    errors = [relative_error(v, c) for v, c in pairs]
    return sum(errors) / len(errors) if errors else None
