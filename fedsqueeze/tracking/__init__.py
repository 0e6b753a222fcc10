"""Convergence tracking: the byte ledger, metrics rows, run directories, plots and comparison tables.

    run = RunDir.create("runs", "demo", config)          # runs/demo/config.toml
    tracker = Tracker(run, convex=task.is_convex, target_accuracy=0.9)
    tracker.record(1, clients_sampled=10, clients_ok=10, uplink_bytes=..., downlink_bytes=..., test_accuracy=...)
    tracker.finish()                                      # runs/demo/summary.json
    report(["runs/demo", "runs/topk"], "runs/report")     # PNG plots + comparison table

No Flower imports: plain Python, numpy, torch, matplotlib and rich.
"""

from .errors import TrackingError
from .ledger import (
    CONVEX_KEYS,
    METRIC_KEYS,
    ROUND_KEYS,
    Ledger,
    first_reaching,
    mean_compression_error,
    relative_error,
    summarize,
)
from .report import ComparisonRow, Report, comparison_rows, plot_runs, render_markdown, render_rich, report
from .rundir import Run, RunDir, Tracker, dumps_row, load_run, read_metrics
from .toml_writer import dumps_toml, write_toml

__all__ = [
    "CONVEX_KEYS",
    "METRIC_KEYS",
    "ROUND_KEYS",
    "ComparisonRow",
    "Ledger",
    "Report",
    "Run",
    "RunDir",
    "Tracker",
    "TrackingError",
    "comparison_rows",
    "dumps_row",
    "dumps_toml",
    "first_reaching",
    "load_run",
    "mean_compression_error",
    "plot_runs",
    "read_metrics",
    "relative_error",
    "render_markdown",
    "render_rich",
    "report",
    "summarize",
    "write_toml",
]
