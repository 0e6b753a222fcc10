"""The same ServerApp and ClientApp on Flower's Ray simulation engine (`flwr run .` from the repository root).

Slow (Ray takes 10-30 s to start on two cores) but part of `make test`: one run, compared with the
in-process backend on the same config and seed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedsqueeze.config import resolve
from fedsqueeze.simulation.runner import run_ray, simulate

ROOT = Path(__file__).resolve().parents[1]


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if marker.encode() in fh.read():
                    found.append(int(pid))
        except OSError:
            continue
    return found


@pytest.mark.slow
def test_ray_backend_matches_inprocess(tmp_path):
    cfg = resolve(
        overrides=[
            "num-clients=3",
            "cohort-size=2",
            "rounds=3",
            "local-steps=3",
            "compressor=topk(0.2) | qsgd(levels=16)",
            # client memory in Ray's node contexts, server halves across rounds, EF21-P resyncs
            "feedback=efbv",
            "downlink=topk(0.5)",
            "downlink-feedback=ef21p",
            f"out-dir={tmp_path}",
        ]
    )
    home = tmp_path / "flwr-home"
    ray = run_ray(cfg.replace(name="ray"), app_dir=ROOT, flwr_home=home, timeout=240)
    assert not _processes_with(str(home)), "a SuperLink or simulation process outlived the run"
    local = simulate(cfg.replace(name="inprocess"))

    assert ray.summary["status"] == "completed"
    assert ray.run_dir == tmp_path / "ray"
    assert [r["round"] for r in ray.rows] == [1, 2, 3]
    # Flower's log of the run (where a failed node's warning lands) stays in the run directory
    assert "fedsqueeze: writing the run to" in (ray.run_dir / "flower.log").read_text()
    # the same numbers, to the last bit: both backends give each client call one torch thread
    for a, b in zip(ray.rows, local.rows, strict=True):
        assert a.keys() == b.keys()
        assert {k: v for k, v in a.items() if k != "wall_s"} == {k: v for k, v in b.items() if k != "wall_s"}


@pytest.mark.slow
def test_sigkilled_ray_run_leaves_no_process_and_no_temporary_folder(tmp_path):
    """`kill -9` of `fedsqueeze simulate --backend ray` mid-run: the SuperLink, SuperExec, `flwr run`,
    flwr-simulation, Ray's daemons and workers all end within seconds, and the temporary FLWR_HOME and
    Ray's temporary folder are removed (the watchdog reports both on the runner's stderr)."""
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    from _lifetime import Tracked, clean_up, record_until_a_row, rows

    # the runner's temporary folders go here (short: Ray's Unix socket paths must stay under 108 bytes)
    tmp = Path(tempfile.mkdtemp(prefix="fsqt-", dir="/tmp"))
    metrics = tmp_path / "runs" / "r" / "metrics.jsonl"
    err = tmp_path / "stderr.log"
    argv = [sys.executable, "-m", "fedsqueeze.cli", "simulate", "--backend", "ray", "--quiet",
            "--set", "num-clients=2", "--set", "rounds=500", "--set", "local-steps=2",
            "--set", f"out-dir={tmp_path / 'runs'}", "--set", "name=r"]  # fmt: skip
    with open(err, "wb") as err_file:
        runner = subprocess.Popen(
            argv, env={**os.environ, "TMPDIR": str(tmp)}, stdout=subprocess.DEVNULL, stderr=err_file,
            start_new_session=True,
        )  # fmt: skip
    tracked = Tracked(runner)
    try:
        expected = ("flower-superlink", "flower-superexec", "flwr run", "flwr-simulation", "raylet", "gcs_server")
        record_until_a_row(tracked, metrics, err, 240, expected)
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        at_kill = rows(metrics)
        left, waited = tracked.wait_gone(30)
        assert left == [], f"alive {waited:.0f} s after the runner's SIGKILL:\n" + "\n".join(left)
        assert list(tmp.iterdir()) == [], "temporary folders left"
        after = rows(metrics)
        time.sleep(2)
        assert rows(metrics) == after, "training went on"
        report = err.read_text()
        assert "ended without stopping what it started" in report and "removed" in report, report[-3000:]
        print(f"{len(tracked.procs)} processes, all gone {waited:.1f} s after SIGKILL; rows {at_kill} -> {after}")
    finally:
        clean_up(tracked, tmp)
