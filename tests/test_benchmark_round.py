"""The round benchmark runs end to end on a tiny model and writes its table and JSON (no timing assertions)."""

from __future__ import annotations

import json
import math
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
         "--configs", "identity,topk+ef21", "--steps", "2", "--rounds", "2", "--quick", "--no-flower",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "| config | steps | clients | plain ms | round ms |" in done.stdout
    result = json.loads(out.read_text())
    rows = result["rows"]
    assert [(r["name"], r["steps"]) for r in rows] == [("identity", 2), ("topk+ef21", 2)]
    for r in rows:
        assert r["d"] == 16 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10
        assert len(r["round_walls_s"]) == len(r["plain_rounds_s"]) == 2
        for key in ("round_s", "plain_s", "ratio", "clone_s", "clones", "peak_rss_mb"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert math.isfinite(r["fw_s_per_client_round"])
        assert all(b > 0 for b in r["uplink_bytes"]) and r["clients_failed"] == [0, 0]
        assert f"`{r['name']}`" in done.stdout
    assert result["stock_flower"] == []
