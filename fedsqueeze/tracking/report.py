"""Plots and a comparison table for one or more run directories.

Plots (PNG, matplotlib's Agg canvas, no display needed): test accuracy against cumulative uplink MB
and against rounds; train and test loss against rounds; for convex runs f(x) - f* and ||grad f(x)||^2
on a log scale against rounds and against cumulative uplink MB, and ||x - x*||^2 against rounds.

Table columns:
- final accuracy: the last recorded test accuracy; best accuracy: the highest;
- uplink MB / downlink MB: total bytes that crossed the wire, in MB (10^6 bytes);
- MB to target: cumulative uplink MB at the first round whose test accuracy reached the target;
- compression factor: sum of `dense_uplink_bytes` over rounds divided by the uplink bytes actually
  sent. The runner records `dense_uplink_bytes` each round as what the same round would have sent
  uncompressed (clients_ok * 4 * num_params for float32), so the factor comes from recorded data,
  never from the compressor's nominal ratio; "n/a" for runs that do not record it.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import TrackingError
from .ledger import first_reaching
from .rundir import Run, load_run

MB = 1e6


@dataclass(frozen=True)
class ComparisonRow:
    run: str
    path: str
    rounds: int
    final_accuracy: float | None
    best_accuracy: float | None
    total_uplink_mb: float
    total_downlink_mb: float
    target_accuracy: float | None
    mb_to_target: float | None
    round_to_target: int | None
    compression_factor: float | None
    final_subopt: float | None = None
    final_grad_norm_sq: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Report:
    rows: list[ComparisonRow]
    markdown: str
    plots: list[Path] = field(default_factory=list)

    def rich_table(self) -> Any:
        return render_rich(self.rows)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _last(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    for r in reversed(rows):
        v = _num(r.get(key))
        if v is not None:
            return v
    return None


def _target_of(run: Run, target: float | None) -> float | None:
    if target is not None:
        return target
    if "target_accuracy" in run.summary:  # the run's own resolution (null: no target)
        return _num(run.summary["target_accuracy"])
    for source in (run.config.get("target-accuracy"), run.config.get("target_accuracy")):
        v = _num(source)
        if v is not None:
            return v or None  # target-accuracy = 0 disables the target
    return None


def comparison_row(run: Run, target_accuracy: float | None = None) -> ComparisonRow:
    rows = run.rows
    target = _target_of(run, target_accuracy)
    accs = [a for a in (_num(r.get("test_accuracy")) for r in rows) if a is not None]
    up = int(rows[-1].get("cum_uplink_bytes") or 0) if rows else 0
    down = int(rows[-1].get("cum_downlink_bytes") or 0) if rows else 0
    hit = first_reaching(rows, target)
    dense = [_num(r.get("dense_uplink_bytes")) for r in rows]
    factor = sum(dense) / up if rows and up > 0 and all(d is not None for d in dense) else None  # type: ignore[arg-type]
    return ComparisonRow(
        run=run.name,
        path=str(run.path),
        rounds=len(rows),
        final_accuracy=_last(rows, "test_accuracy"),
        best_accuracy=max(accs) if accs else None,
        total_uplink_mb=up / MB,
        total_downlink_mb=down / MB,
        target_accuracy=target,
        mb_to_target=None if hit is None else int(hit["cum_uplink_bytes"]) / MB,
        round_to_target=None if hit is None else int(hit["round"]),
        compression_factor=factor,
        final_subopt=_last(rows, "subopt"),
        final_grad_norm_sq=_last(rows, "grad_norm_sq"),
    )


def comparison_rows(runs: Sequence[Run], target_accuracy: float | None = None) -> list[ComparisonRow]:
    return [comparison_row(r, target_accuracy) for r in runs]


# --------------------------------------------------------------------------- rendering

_HEADERS = ["run", "rounds", "final acc", "best acc", "uplink MB", "downlink MB", "MB to target", "compression"]


def _cells(row: ComparisonRow, convex: bool) -> list[str]:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.2f} %"

    def mb(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    if row.target_accuracy is None:
        to_target = "n/a"
    elif row.mb_to_target is None:
        to_target = "not reached"
    else:
        to_target = f"{row.mb_to_target:.3f} (round {row.round_to_target})"
    cells = [
        row.run,
        str(row.rounds),
        pct(row.final_accuracy),
        pct(row.best_accuracy),
        mb(row.total_uplink_mb),
        mb(row.total_downlink_mb),
        to_target,
        "n/a" if row.compression_factor is None else f"{row.compression_factor:.1f}x",
    ]
    if convex:
        cells += [
            "n/a" if row.final_subopt is None else f"{row.final_subopt:.3e}",
            "n/a" if row.final_grad_norm_sq is None else f"{row.final_grad_norm_sq:.3e}",
        ]
    return cells


def _headers(rows: Sequence[ComparisonRow]) -> tuple[list[str], bool]:
    convex = any(r.final_subopt is not None for r in rows)
    targets = {r.target_accuracy for r in rows if r.target_accuracy is not None}
    headers = list(_HEADERS)
    if len(targets) == 1:
        headers[6] = f"MB to {100 * next(iter(targets)):g} %"
    if convex:
        headers += ["f(x) - f*", "‖∇f(x)‖²"]
    return headers, convex


def render_markdown(rows: Sequence[ComparisonRow]) -> str:
    headers, convex = _headers(rows)
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(row, convex)) + " |")
    return "\n".join(lines) + "\n"


def render_rich(rows: Sequence[ComparisonRow]) -> Any:
    """The comparison as a rich Table (print it with rich.console.Console().print)."""
    from rich.table import Table

    headers, convex = _headers(rows)
    table = Table(title="fedsqueeze comparison")
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*_cells(row, convex))
    return table


# --------------------------------------------------------------------------- plots


def _series(rows: Sequence[dict[str, Any]], xkey: str, ykey: str, *, positive: bool = False) -> tuple[list, list]:
    xs, ys = [], []
    for r in rows:
        x, y = _num(r.get(xkey)), _num(r.get(ykey))
        if x is None or y is None or (positive and y <= 0):
            continue
        xs.append(x / MB if xkey.endswith("bytes") else x)
        ys.append(y)
    return xs, ys


def _plot(
    runs: Sequence[Run],
    path: Path,
    xkey: str,
    ykey: str,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    log: bool = False,
    target: float | None = None,
    dashed_key: str | None = None,
    colors: dict[int, str] | None = None,
) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plotted = False
    for i, run in enumerate(runs):
        color = (colors or {}).get(id(run), f"C{i % 10}")
        xs, ys = _series(run.rows, xkey, ykey, positive=log)
        if xs:
            ax.plot(
                xs,
                ys,
                color=color,
                label=run.name if dashed_key is None else f"{run.name} ({ykey})",
                marker="." if len(xs) < 40 else None,
            )
            plotted = True
        if dashed_key is not None:
            xs, ys = _series(run.rows, xkey, dashed_key, positive=log)
            if xs:
                ax.plot(xs, ys, color=color, linestyle="--", label=f"{run.name} ({dashed_key})")
                plotted = True
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:g}")
    if log and plotted:
        ax.set_yscale("log")
    if not plotted:
        ax.text(0.5, 0.5, "no data recorded", ha="center", va="center", transform=ax.transAxes)
    if xkey == "round":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3, which="both" if log else "major")
    if plotted:
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=110)
    return path


def plot_runs(
    runs: Sequence[Run], out_dir: str | os.PathLike[str], *, target_accuracy: float | None = None
) -> list[Path]:
    """Write the PNG plots for these runs into out_dir; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    colors = {id(run): f"C{i % 10}" for i, run in enumerate(runs)}  # one colour per run across all plots
    up, rnd = ("cum_uplink_bytes", "cumulative uplink (MB)"), ("round", "round")
    acc = {"ylabel": "test accuracy", "target": target_accuracy}
    specs: list[tuple[str, Sequence[Run], tuple[str, str], str, dict[str, Any]]] = [
        ("accuracy_vs_uplink", runs, up, "test_accuracy", {**acc, "title": "Accuracy against bytes sent"}),
        ("accuracy_vs_rounds", runs, rnd, "test_accuracy", {**acc, "title": "Accuracy against rounds"}),
        (
            "loss_vs_rounds",
            runs,
            rnd,
            "test_loss",
            {"ylabel": "loss", "title": "Test loss (solid) and train loss (dashed)", "dashed_key": "train_loss"},
        ),
    ]
    convex = [r for r in runs if r.is_convex]
    if convex:
        for key, label in (("subopt", "f(x) - f*"), ("grad_norm_sq", "||grad f(x)||^2")):
            for x, against in ((rnd, "rounds"), (up, "bytes sent")):
                name = f"{key}_vs_{'rounds' if x is rnd else 'uplink'}"
                specs.append(
                    (name, convex, x, key, {"ylabel": label, "title": f"{label} against {against}", "log": True})
                )
        specs.append(
            (
                "dist_sq_vs_rounds",
                convex,
                rnd,
                "dist_sq",
                {"ylabel": "||x - x*||^2", "title": "Distance to the optimum", "log": True},
            )
        )
    return [
        _plot(subset, out / f"{name}.png", xkey, ykey, xlabel=xlabel, colors=colors, **kw)
        for name, subset, (xkey, xlabel), ykey, kw in specs
    ]


def report(
    run_dirs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    target_accuracy: float | None = None,
) -> Report:
    """Plots and the comparison table for these runs, written to out_dir (PNGs, comparison.md, comparison.json).

    target_accuracy=None takes each run's own target (summary.json, else config `target-accuracy`).
    """
    if not run_dirs:
        raise TrackingError("report needs at least one run directory")
    runs = [load_run(p) for p in run_dirs]
    names = [r.name for r in runs]
    if len(set(names)) < len(names):  # same config name twice: tell them apart by directory
        for r in runs:
            r.config = {**r.config, "name": r.path.name}
    rows = comparison_rows(runs, target_accuracy)
    targets = {r.target_accuracy for r in rows if r.target_accuracy is not None}
    line = target_accuracy if target_accuracy is not None else (next(iter(targets)) if len(targets) == 1 else None)
    out = Path(out_dir)
    plots = plot_runs(runs, out, target_accuracy=line)
    markdown = render_markdown(rows)
    (out / "comparison.md").write_text(markdown, encoding="utf-8")
    (out / "comparison.json").write_text(json.dumps([r.to_dict() for r in rows], indent=2) + "\n", encoding="utf-8")
    return Report(rows, markdown, plots)
