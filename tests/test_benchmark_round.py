"""The round benchmark runs end to end on a tiny model and writes its table and JSON (no timing assertions)."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import big_task  # noqa: E402


def test_big_task_has_the_benchmark_size():
    model = big_task.make_model()
    assert sum(p.numel() for p in model.parameters()) == 10_506_762


def test_round_benchmark_writes_its_table(tmp_path):
    out = tmp_path / "round.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "round.py"), "--model", "16,32,16,10", "--examples", "64",
         "--configs", "identity,topk+ef21,topk-down+ef21p", "--steps", "2", "--rounds", "2", "--quick", "--no-flower",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "| config | steps | clients | plain ms | round ms |" in done.stdout
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["name"], r["steps"]) for r in rows] == [("identity", 2), ("topk+ef21", 2), ("topk-down+ef21p", 2)]
    for r in rows:
        assert r["d"] == 16 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
        assert len(r["round_walls_s"]) == len(r["plain_rounds_s"]) == 2
        for key in ("round_s", "plain_s", "ratio", "clone_s", "clones", "peak_rss_mb"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert math.isfinite(r["fw_s_per_client_round"])
        codec = r["codec"]
        assert all(math.isfinite(v) and v > 0 for v in codec.values()), codec
        if r["name"] == "topk-down+ef21p":  # each client decodes its own broadcast
            assert codec["per_client_s"] == codec["uplink_s"] + codec["broadcast_decode_s"]
            assert codec["per_round_s"] == codec["broadcast_encode_s"]
        else:  # the plain broadcast is decoded once per round
            assert codec["per_client_s"] == codec["uplink_s"]
            assert codec["per_round_s"] == codec["broadcast_encode_s"] + codec["broadcast_decode_s"]
        share = (r["plain_s"] + r["cohort"] * codec["per_client_s"] + codec["per_round_s"]) / r["plain_s"]
        assert r["codec_ratio"] == share > 1.0
        assert all(b > 0 for b in r["uplink_bytes"]) and r["clients_failed"] == [0, 0]
        assert f"`{r['name']}`" in done.stdout
    assert result["stock_flower"] == []


def test_repeated_runs_of_a_config_are_pooled_into_its_row(tmp_path):
    out = tmp_path / "round.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "round.py"), "--model", "16,32,16,10", "--examples", "64",
         "--configs", "identity", "--steps", "2", "--rounds", "3", "--quick", "--no-flower", "--repeats", "2",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(out.read_text())["rows"]
    runs = row["runs"]
    assert len(runs) == 2 and all(len(r["round_walls_s"]) == 3 for r in runs)
    # the medians of both runs' rounds after the first
    assert row["round_s"] == statistics.median(w for r in runs for w in r["round_walls_s"][1:])
    assert row["plain_s"] == statistics.median(p for r in runs for p in r["plain_rounds_s"][1:])
    assert row["ratio"] == row["round_s"] / row["plain_s"]
    assert row["clones"] == (row["round_s"] - row["plain_s"]) / row["cohort"] / row["clone_s"]
    per_client = statistics.median(r["codec"]["per_client_s"] for r in runs)
    assert row["codec"]["per_client_s"] == per_client
    share = (row["plain_s"] + row["cohort"] * per_client + row["codec"]["per_round_s"]) / row["plain_s"]
    assert row["codec_ratio"] == share
    assert done.stdout.count("`identity`") == 1  # one row for the config
