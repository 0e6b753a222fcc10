"""Tracking: TOML writer, byte ledger, run directory durability, summary, plots and the comparison table."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedsqueeze.tracking import (
    CONVEX_KEYS,
    METRIC_KEYS,
    ROUND_KEYS,
    Ledger,
    RunDir,
    Tracker,
    TrackingError,
    comparison_rows,
    dumps_toml,
    load_run,
    mean_compression_error,
    read_metrics,
    relative_error,
    render_markdown,
    render_rich,
    report,
    summarize,
    write_toml,
)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: tomli if installed, else the TOML checks skip
    try:
        import tomli as tomllib
    except ModuleNotFoundError:
        tomllib = None


def toml_loads(text: str) -> dict:
    if tomllib is None:
        pytest.skip("reading TOML needs Python 3.11+ (tomllib) or tomli")
    return tomllib.loads(text)


# --------------------------------------------------------------------------- TOML writer

CONFIG = {
    "name": 'demo "quoted" \\ back\nslash\ttab \u00e9 \U0001f600',
    "rounds": 50,
    "neg": -3,
    "lr": 0.05,
    "tiny": 1e-300,
    "big": 1.5e300,
    "neg-zero": -0.0,
    "target-accuracy": 0.9,
    "flag": True,
    "off": False,
    "empty": "",
    "ratios": [0.01, 0.1],
    "names": ["topk", "qsgd"],
    "nested-list": [[1, 2], ["a"], []],
    "mixed": [1, "two", 3.0, {"k": 1}],
    "skip": None,
    "tuple": (1, 2),
    "path": Path("/tmp/x"),
    "a.dotted key": 1,
    "": "empty key",
    "task": {"name": "digits-mlp", "options": {"hidden": [64, 32], "reg": 0.001}, "empty": {}},
    "runs": [{"compressor": "topk(0.01)", "sub": {"x": 1}}, {"compressor": "identity"}],
}


def _expected(v):
    if isinstance(v, dict):
        return {str(k): _expected(x) for k, x in v.items() if x is not None}
    if isinstance(v, (list, tuple)):
        return [_expected(x) for x in v if x is not None]
    if isinstance(v, Path):
        return str(v)
    return v


def test_toml_round_trips_through_tomllib(tmp_path):
    text = dumps_toml(CONFIG)
    assert toml_loads(text) == _expected(CONFIG)
    write_toml(tmp_path / "c.toml", CONFIG)
    assert toml_loads((tmp_path / "c.toml").read_text(encoding="utf-8")) == _expected(CONFIG)
    assert not (tmp_path / "c.toml.tmp").exists()


def test_toml_special_floats_and_scalars():
    doc = toml_loads(dumps_toml({"a": math.inf, "b": -math.inf, "c": math.nan, "t": torch.tensor(2.5)}))
    assert doc["a"] == math.inf and doc["b"] == -math.inf and math.isnan(doc["c"]) and doc["t"] == 2.5
    assert dumps_toml({}) == ""
    with pytest.raises(TrackingError, match="'x.y'.*object"):
        dumps_toml({"x": {"y": object()}})


_keys = st.text(st.characters(blacklist_categories=("Cs",)), max_size=8)
_scalars = (
    st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)
)
_values = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=4), max_leaves=12
)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=6))
def test_toml_round_trip_property(doc):
    assert toml_loads(dumps_toml(doc)) == doc


# --------------------------------------------------------------------------- ledger


def _record(ledger, r, up, down, **kw):
    return ledger.record(
        r, clients_sampled=4, clients_ok=3, clients_failed=1, uplink_bytes=up, downlink_bytes=down, **kw
    )


def test_ledger_rows_keys_and_cumulative_bytes():
    ledger = Ledger()
    r1 = _record(ledger, 1, 100, 400, test_accuracy=0.5, wall_s=1.5)
    r2 = _record(ledger, 2, 50, 400, train_loss=torch.tensor(0.7), compression_error=0.25, note="x")
    assert list(r1) == [*ROUND_KEYS, "compression_error", "wall_s"]
    assert list(r2)[-1] == "note"
    assert (r2["cum_uplink_bytes"], r2["cum_downlink_bytes"]) == (150, 800)
    assert r1["wall_s"] == 1.5 and r2["wall_s"] >= 0.0
    assert r2["train_loss"] == pytest.approx(0.7) and r2["test_accuracy"] is None
    convex = Ledger(convex=True)
    row = _record(convex, 1, 1, 1, subopt=0.1)
    assert list(row) == list(METRIC_KEYS) and row["grad_norm_sq"] is None
    resumed = Ledger(rows=ledger.rows)
    assert _record(resumed, 3, 10, 0)["cum_uplink_bytes"] == 160


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"uplink_bytes": -1}, "uplink_bytes must be a non-negative integer"),
        ({"uplink_bytes": 1.5}, "uplink_bytes"),
        ({"clients_ok": True}, "clients_ok"),
        ({"test_accuracy": "high"}, "test_accuracy must be a number"),
        ({"cum_uplink_bytes": 3}, "clashes"),
    ],
)
def test_ledger_rejects_bad_values(kwargs, message):
    args = {"clients_sampled": 1, "clients_ok": 1, "uplink_bytes": 1, "downlink_bytes": 1, **kwargs}
    with pytest.raises(TrackingError, match=message):
        Ledger().record(1, **args)


def test_ledger_rounds_must_increase():
    ledger = Ledger()
    _record(ledger, 2, 1, 1)
    with pytest.raises(TrackingError, match="rounds must increase"):
        _record(ledger, 2, 1, 1)


def test_relative_compression_error():
    v = torch.tensor([3.0, 4.0])
    assert relative_error(v, torch.tensor([3.0, 0.0])) == pytest.approx(16 / 25)
    assert relative_error(torch.zeros(3), torch.zeros(3)) == 0.0
    assert relative_error(torch.zeros(2), torch.ones(2)) == math.inf
    assert mean_compression_error([(v, v), (v, torch.zeros(2))]) == pytest.approx(0.5)
    assert mean_compression_error([]) is None
    with pytest.raises(TrackingError):
        relative_error(v, torch.zeros(3))


# --------------------------------------------------------------------------- run directory


def test_run_dir_files_and_durability(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    run = RunDir.create(tmp_path / "runs", "demo", {"name": "demo", "rounds": 3, "task": {"name": "digits-mlp"}})
    assert run.path == tmp_path / "runs" / "demo"
    assert toml_loads(run.config_path.read_text()) == {"name": "demo", "rounds": 3, "task": {"name": "digits-mlp"}}
    tracker = Tracker(run, target_accuracy=0.6)
    for r in (1, 2):
        tracker.record(r, clients_sampled=2, clients_ok=2, uplink_bytes=10, downlink_bytes=20, test_accuracy=0.3 * r)
        assert len(synced) == r  # durable before record() returns
        assert len(run.metrics_path.read_text().splitlines()) == r
    lines = [json.loads(line) for line in run.metrics_path.read_text().splitlines()]
    assert lines[1]["cum_uplink_bytes"] == 20 and lines[1]["test_accuracy"] == pytest.approx(0.6)
    summary = tracker.finish(num_params=123)
    on_disk = json.loads(run.summary_path.read_text())
    assert on_disk == json.loads(json.dumps(summary))
    assert on_disk["status"] == "completed" and on_disk["num_params"] == 123
    assert on_disk["bytes_to_target"] == 20 and on_disk["round_to_target"] == 2


def test_interrupted_run_keeps_every_finished_round(tmp_path):
    run = RunDir.create(tmp_path, "stopped", {"name": "stopped"})
    tracker = Tracker(run, convex=True)
    with pytest.raises(KeyboardInterrupt):
        try:
            for r in range(1, 10):
                if r == 4:
                    raise KeyboardInterrupt
                tracker.record(r, clients_sampled=1, clients_ok=1, uplink_bytes=5, downlink_bytes=5, subopt=1.0 / r)
        finally:
            tracker.finish(status="interrupted")
    loaded = load_run(run.path)
    assert [r["round"] for r in loaded.rows] == [1, 2, 3]
    assert loaded.summary["status"] == "interrupted" and loaded.summary["totals"]["uplink_bytes"] == 15
    assert loaded.is_convex


def test_killed_process_loses_no_recorded_round(tmp_path):
    # also checks the layering rule: tasks and tracking import no Flower
    code = f"""
import os, sys
import fedsqueeze.tasks
from fedsqueeze.tracking import RunDir, Tracker
assert "flwr" not in sys.modules, "fedsqueeze.tasks or fedsqueeze.tracking imported flwr"
t = Tracker(RunDir.create({str(tmp_path)!r}, "killed", {{"name": "killed"}}))
for r in range(1, 4):
    t.record(r, clients_sampled=1, clients_ok=1, uplink_bytes=7, downlink_bytes=0)
os._exit(3)  # no cleanup, no summary
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    rows = read_metrics(tmp_path / "killed" / "metrics.jsonl")
    assert [r["cum_uplink_bytes"] for r in rows] == [7, 14, 21]


def test_metrics_reader_tolerates_torn_last_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"round": 1}\n{"round": 2}\n{"round": 3, "upl')
    assert [r["round"] for r in read_metrics(p)] == [1, 2]
    p.write_text('{"round": 1}\nnot json\n{"round": 3}\n')
    with pytest.raises(TrackingError, match="line 2"):
        read_metrics(p)


def test_non_finite_values_are_written_as_null(tmp_path):
    run = RunDir.create(tmp_path, "nan")
    tracker = Tracker(run)
    tracker.record(1, clients_sampled=1, clients_ok=1, uplink_bytes=1, downlink_bytes=1, train_loss=math.nan)
    line = run.metrics_path.read_text()
    assert "NaN" not in line and json.loads(line)["train_loss"] is None
    assert tracker.finish()["diverged"] is True


def test_run_dir_name_collisions_and_bad_names(tmp_path):
    a = RunDir.create(tmp_path, "x", {"name": "x"})
    a.append({"round": 1})
    b = RunDir.create(tmp_path, "x", {"name": "x"})
    c = RunDir.create(tmp_path, "x")
    assert (b.name, c.name) == ("x-2", "x-3")
    assert (a.metrics_path.read_text(), c.path.exists()) == ('{"round": 1}\n', True)
    (tmp_path / "empty").mkdir()
    assert RunDir.create(tmp_path, "empty").name == "empty"  # an empty directory is reused
    with pytest.raises(TrackingError, match="already exists"):
        RunDir.create(tmp_path, "x", exist="error")
    again = RunDir.create(tmp_path, "x", {"name": "new"}, exist="overwrite")
    assert again.path == a.path and not again.metrics_path.exists()
    for bad in ("", "../up", "a/b", ".hidden", "sp ace"):
        with pytest.raises(TrackingError, match="run name"):
            RunDir.create(tmp_path, bad)
    with pytest.raises(TrackingError, match="no metrics.jsonl"):
        load_run(tmp_path / "x-3")


# --------------------------------------------------------------------------- summary and report


def _row(r, up, down, acc, *, loss=None, dense=None, subopt=None, grad=None, ok=4):
    row = {
        "round": r,
        "clients_sampled": 5,
        "clients_ok": ok,
        "clients_failed": 5 - ok,
        "uplink_bytes": up,
        "downlink_bytes": down,
        "train_loss": loss,
        "test_loss": loss,
        "test_accuracy": acc,
        "compression_error": 0.1,
        "wall_s": 0.5,
    }
    if subopt is not None:
        row.update(subopt=subopt, grad_norm_sq=grad, dist_sq=subopt * 2)
    if dense is not None:
        row["dense_uplink_bytes"] = dense
    return row


def _write_run(root, name, rows, config):
    d = root / name
    d.mkdir(parents=True)
    cum_up = cum_down = 0
    lines = []
    for row in rows:
        cum_up += row["uplink_bytes"]
        cum_down += row["downlink_bytes"]
        lines.append(json.dumps({**row, "cum_uplink_bytes": cum_up, "cum_downlink_bytes": cum_down}))
    (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    (d / "config.toml").write_text(dumps_toml(config))
    return d


@pytest.fixture
def two_runs(tmp_path):
    # run "topk": dense float32 would be 4 clients * 4 bytes * 250_000 params = 4 MB per round
    topk = _write_run(
        tmp_path,
        "topk",
        [
            _row(1, 200_000, 4_000_000, 0.50, loss=1.2, dense=4_000_000),
            _row(2, 200_000, 4_000_000, 0.82, loss=0.8, dense=4_000_000),
            _row(3, 100_000, 4_000_000, 0.91, loss=0.5, dense=2_000_000, ok=2),
            _row(4, 200_000, 4_000_000, None, loss=None, dense=4_000_000),
        ],
        {"name": "topk", "target-accuracy": 0.9},
    )
    logreg = _write_run(
        tmp_path,
        "ef21",
        [
            _row(1, 1_000_000, 0, 0.40, loss=0.9, subopt=1.0, grad=0.5),
            _row(2, 1_000_000, 0, 0.70, loss=0.6, subopt=1e-3, grad=1e-4),
            _row(3, 500_000, 0, 0.80, loss=0.5, subopt=0.0, grad=1e-9),
        ],
        {"name": "ef21"},
    )
    return topk, logreg


def test_summarize_hand_computed(two_runs):
    rows = load_run(two_runs[0]).rows
    s = summarize(rows, target_accuracy=0.8)
    assert s["rounds"] == 4 and s["last_round"] == 4
    assert s["final"]["test_accuracy"] == 0.91 and s["final"]["train_loss"] == 0.5
    assert s["best_test_accuracy"] == 0.91
    assert s["totals"] == {
        "uplink_bytes": 700_000,
        "downlink_bytes": 16_000_000,
        "clients_sampled": 20,
        "clients_ok": 14,
        "clients_failed": 6,
        "wall_s": 2.0,
        "dense_uplink_bytes": 14_000_000,
    }
    assert (s["bytes_to_target"], s["round_to_target"], s["downlink_bytes_to_target"]) == (400_000, 2, 8_000_000)
    assert s["compression_factor"] == pytest.approx(20.0)
    assert summarize(rows)["bytes_to_target"] is None
    assert summarize(rows, target_accuracy=0.99)["bytes_to_target"] is None
    assert summarize([])["rounds"] == 0


def test_comparison_table_numbers(two_runs):
    runs = [load_run(p) for p in two_runs]
    topk, ef21 = comparison_rows(runs)
    # topk: target 0.9 from its config, first reached at round 3 with 500_000 cumulative uplink bytes
    assert topk.run == "topk" and topk.rounds == 4
    assert topk.final_accuracy == 0.91 and topk.best_accuracy == 0.91
    assert topk.total_uplink_mb == pytest.approx(0.7) and topk.total_downlink_mb == pytest.approx(16.0)
    assert topk.target_accuracy == 0.9 and topk.mb_to_target == pytest.approx(0.5) and topk.round_to_target == 3
    assert topk.compression_factor == pytest.approx(14_000_000 / 700_000)
    assert topk.final_subopt is None
    # ef21: no target, no dense byte record
    assert ef21.target_accuracy is None and ef21.mb_to_target is None and ef21.compression_factor is None
    assert ef21.total_uplink_mb == pytest.approx(2.5) and ef21.final_subopt == 0.0 and ef21.final_grad_norm_sq == 1e-9
    # an explicit target overrides the runs' own
    topk75, ef75 = comparison_rows(runs, target_accuracy=0.75)
    assert topk75.mb_to_target == pytest.approx(0.4) and ef75.mb_to_target == pytest.approx(2.5)
    md = render_markdown([topk, ef21])
    assert md.splitlines()[0].startswith("| run | rounds | final acc")
    assert "| topk | 4 | 91.00 % | 91.00 % | 0.700 | 16.000 | 0.500 (round 3) | 20.0x |" in md
    assert "| ef21 | 3 | 80.00 % | 80.00 % | 2.500 | 0.000 | n/a | n/a | 0.000e+00 | 1.000e-09 |" in md


def test_report_writes_plots_and_tables(two_runs, tmp_path):
    from matplotlib.image import imread
    from rich.console import Console

    out = tmp_path / "report"
    rep = report([str(p) for p in two_runs], out, target_accuracy=0.8)
    names = {p.name for p in rep.plots}
    assert {"accuracy_vs_uplink.png", "accuracy_vs_rounds.png", "loss_vs_rounds.png"} <= names
    assert {"subopt_vs_rounds.png", "subopt_vs_uplink.png", "grad_norm_sq_vs_rounds.png"} <= names
    for p in rep.plots:
        assert p.parent == out and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        img = imread(p)
        assert img.shape[0] > 100 and img.shape[1] > 100
    assert [r.mb_to_target for r in rep.rows] == [pytest.approx(0.4), pytest.approx(2.5)]
    assert (out / "comparison.md").read_text() == rep.markdown and "MB to 80 %" in rep.markdown
    assert json.loads((out / "comparison.json").read_text())[0]["run"] == "topk"
    console = Console(record=True, width=220)
    console.print(render_rich(rep.rows))
    text = console.export_text()
    assert "topk" in text and "ef21" in text and "20.0x" in text


def test_report_non_convex_only_and_errors(two_runs, tmp_path):
    rep = report([two_runs[0]], tmp_path / "r1")
    assert len(rep.plots) == 3 and "f(x) - f*" not in rep.markdown
    with pytest.raises(TrackingError, match="at least one"):
        report([], tmp_path / "r2")
    with pytest.raises(TrackingError, match="does not exist"):
        report([tmp_path / "missing"], tmp_path / "r3")


def test_report_from_tracker_output(tmp_path):
    # the same path the runner takes: Tracker writes, report reads
    for name, per_round in (("dense", 4000), ("sparse", 400)):
        t = Tracker(RunDir.create(tmp_path, name, {"name": name}), target_accuracy=0.5)
        for r in range(1, 4):
            t.record(
                r,
                clients_sampled=1,
                clients_ok=1,
                uplink_bytes=per_round,
                downlink_bytes=4000,
                test_accuracy=0.2 * r,
                dense_uplink_bytes=4000,
            )
        t.finish()
    rows = report([tmp_path / "dense", tmp_path / "sparse"], tmp_path / "out").rows
    assert [r.compression_factor for r in rows] == [pytest.approx(1.0), pytest.approx(10.0)]
    assert [r.mb_to_target for r in rows] == [pytest.approx(0.012), pytest.approx(0.0012)]
    assert set(CONVEX_KEYS).isdisjoint(load_run(tmp_path / "dense").rows[0])


def test_toml_key_with_a_trailing_newline_is_quoted():
    doc = {"0\n": {}, "a\n": [], "b": 1}
    assert toml_loads(dumps_toml(doc)) == doc


def test_a_target_accuracy_of_zero_is_no_target(tmp_path):
    for name, summary in (("from-config", False), ("from-summary", True)):
        t = Tracker(RunDir.create(tmp_path, name, {"name": name, "target-accuracy": 0.0}), target_accuracy=None)
        t.record(1, clients_sampled=1, clients_ok=1, uplink_bytes=10, downlink_bytes=10, test_accuracy=0.5)
        if summary:
            t.finish()
    rows = report([tmp_path / "from-config", tmp_path / "from-summary"], tmp_path / "out").rows
    assert [r.target_accuracy for r in rows] == [None, None]
    assert [r.mb_to_target for r in rows] == [None, None]


def test_summary_counts_only_the_rounds_on_disk(tmp_path):
    """A Ctrl-C after a round entered the ledger but before its line reached metrics.jsonl."""
    run = RunDir.create(tmp_path, "cut")
    tracker = Tracker(run)
    tracker.record(1, clients_sampled=1, clients_ok=1, uplink_bytes=10, downlink_bytes=10)
    tracker.ledger.record(2, clients_sampled=1, clients_ok=1, uplink_bytes=10, downlink_bytes=10)
    summary = tracker.finish(status="interrupted")
    assert summary["rounds"] == 1 == len(run.read_rows())
    assert summary["totals"]["uplink_bytes"] == 10
