"""The README's own-task example runs through `fedsqueeze simulate` and learns."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fedsqueeze.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_user_task_example_trains(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    try:
        code = main([
            "simulate", "--quiet", "--set", "task=my_task:build(width=8)", "--set", "num-clients=4",
            "--set", "rounds=8", "--set", "compressor=topk(0.5)", "--set", "name=mine", "--set", f"out-dir={tmp_path}",
        ])  # fmt: skip
    finally:
        sys.modules.pop("my_task", None)
    assert code == 0
    rows = [json.loads(line) for line in (tmp_path / "mine" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["clients_failed"] == 0 for r in rows)
    assert rows[-1]["test_accuracy"] > 0.8
