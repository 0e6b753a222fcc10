"""`flwr run .` as the README types it: every partition of the federation takes part (num-clients follows
the nodes' num-partitions, logged), the run ends in seconds, not after a round timeout, the log names the
run directory, and every process `flwr run` starts (its local SuperLink and what that starts) is stopped
by pid. Also: num-clients follows the nodes through the in-process Grid, and nodes that disagree fail at once."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsqueeze.config import ConfigError, resolve
from fedsqueeze.reaper import Family, process_table
from fedsqueeze.simulation.grid import run_inprocess

ROOT = Path(__file__).resolve().parents[1]


def test_num_clients_follows_the_nodes_num_partitions(tmp_path, caplog):
    cfg = resolve(overrides=["num-clients=20", "rounds=2", "task=digits-logreg", "local-steps=2",
                             f"out-dir={tmp_path}"])  # fmt: skip
    t0 = time.monotonic()
    with caplog.at_level("WARNING", logger="flwr"):
        run_inprocess("fedsqueeze.server.app:app", "fedsqueeze.client.app:app", 3, cfg.to_run_config())
    rows = [json.loads(line) for line in (tmp_path / "default" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["clients_sampled"], r["clients_ok"], r["clients_failed"]) for r in rows] == [(3, 3, 0)] * 2
    assert time.monotonic() - t0 < 60  # not the 600 s round timeout
    assert "num-clients = 3, not the 20 of the run config" in caplog.text
    assert json.loads((tmp_path / "default" / "summary.json").read_text())["status"] == "completed"


def test_nodes_that_disagree_about_num_partitions_fail_at_once(tmp_path):
    cfg = resolve(overrides=["num-clients=2", "rounds=1", "task=digits-logreg", f"out-dir={tmp_path}"])
    nodes = [{"partition-id": 0, "num-partitions": 2}, {"partition-id": 1, "num-partitions": 3}]
    with pytest.raises(ConfigError, match="disagree about num-partitions"):
        run_inprocess("fedsqueeze.server.app:app", "fedsqueeze.client.app:app", 2, cfg.to_run_config(),
                      node_configs=nodes)  # fmt: skip


def _readme_flwr_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [line.split("#")[0].strip() for line in text.splitlines() if line.startswith("flwr run .")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _superlinks_of(home: Path) -> list[int]:
    """The pids of the local SuperLinks `flwr run` started with this FLWR_HOME (its log file is in it)."""
    out = []
    for pid in process_table():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(b"flower-superlink" in a for a in argv[:2]) and any(str(home).encode() in a for a in argv):
            out.append(pid)
    return out


@pytest.mark.slow
def test_readme_flwr_run_commands_work_as_typed(tmp_path):
    commands = _readme_flwr_commands()
    assert commands, "the README shows no `flwr run .` command"
    # a fresh clone: the repository's files as they are in the working tree, nothing else (no runs/)
    app = tmp_path / "clone"
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (app / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, app / name)
    home = tmp_path / "flwr-home"
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_DISABLE_USAGE_STATS": "1",
        # the local SuperLink's ports, free ones (another run on this machine may hold the defaults)
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        "PYTHONPATH": str(ROOT),
    }
    family = Family()
    try:
        for command in commands:
            t0 = time.monotonic()
            done = subprocess.run(command, shell=True, cwd=app, env=env, capture_output=True, text=True, timeout=300)
            for pid in _superlinks_of(home):
                family.add(pid)
            family.scan()
            out = done.stdout + done.stderr
            assert done.returncode == 0, out[-3000:]
            wall = time.monotonic() - t0
            summaries = list(app.glob("runs/*/summary.json"))
            assert len(summaries) == 1, out[-3000:]
            summary = json.loads(summaries[0].read_text())
            rows = [json.loads(x) for x in (summaries[0].parent / "metrics.jsonl").read_text().splitlines()]
            rounds = int(re.search(r"rounds=(\d+)", command).group(1))
            assert summary["status"] == "completed" and len(rows) == rounds
            # Flower's default local federation has 2 simulated SuperNodes: both partitions, every round
            assert all(r["clients_sampled"] == r["clients_ok"] == 2 and r["clients_failed"] == 0 for r in rows)
            assert "num-clients = 2, not the 20 of the run config" in out
            assert str(summaries[0].parent.resolve()) in out  # where the run is, in the streamed log
            assert wall < 240, f"{command} took {wall:.0f} s"
            shutil.rmtree(app / "runs")
        assert _superlinks_of(home), "flwr run started no local SuperLink under this FLWR_HOME"
    finally:
        family.scan()
        for pid in _superlinks_of(home):
            family.add(pid)
        left = family.stop(grace=10.0)
    assert not family.alive(), f"still running after stop: {[s.pid for s in family.alive()]} ({left})"
