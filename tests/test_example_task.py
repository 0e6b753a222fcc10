"""The README's own-task example runs exactly as the README says, and learns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fedsqueeze.config import resolve
from fedsqueeze.simulation.runner import _import_roots

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_user_task_example_trains_from_its_folder(tmp_path):
    """`cd examples && fedsqueeze simulate --set 'task=my_task:build(...)'`: the console script, no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = [
        str(Path(sys.executable).parent / "fedsqueeze"), "simulate", "--quiet", "--set", "task=my_task:build(width=8)",
        "--set", "num-clients=4", "--set", "rounds=8", "--set", "compressor=topk(0.5)", "--set", "name=mine",
        "--set", f"out-dir={tmp_path}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=EXAMPLES, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "mine" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 8 and all(r["clients_failed"] == 0 for r in rows)
    assert rows[-1]["test_accuracy"] > 0.8


def test_ray_processes_import_a_user_task_from_where_this_process_does(monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    try:
        assert _import_roots(resolve(overrides=["task=my_task:build(width=8)"])) == [str(EXAMPLES)]
    finally:
        sys.modules.pop("my_task", None)
    assert _import_roots(resolve(overrides=["task=digits-mlp"])) == []
