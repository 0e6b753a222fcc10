"""The `fedsqueeze` command: simulate, report, demo, configuration errors and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedsqueeze.cli import main
from fedsqueeze.tracking import load_run

FAST = ["--set", "num-clients=4", "--set", "rounds=2", "--set", "local-steps=2"]


def test_simulate_then_report(tmp_path, capsys):
    config = tmp_path / "exp.toml"
    config.write_text('name = "exp"\ncompressor = "topk(0.1)"\nrounds = 5\n')
    code = main(["simulate", "--config", str(config), *FAST, "--set", f"out-dir={tmp_path}", "--quiet"])
    assert code == 0
    err = capsys.readouterr().err
    assert "exp: 2 rounds" in err and "uplink" in err and str(tmp_path / "exp") in err
    run = load_run(tmp_path / "exp")
    assert len(run.rows) == 2  # --set wins over the file
    assert run.config["compressor"] == "topk(0.1)"

    assert main(["simulate", *FAST, "--set", f"out-dir={tmp_path}", "--set", "name=dense", "--quiet"]) == 0
    out_dir = tmp_path / "cmp"
    assert main(["report", str(tmp_path / "exp"), str(tmp_path / "dense"), "--out", str(out_dir)]) == 0
    assert (out_dir / "comparison.md").exists()
    assert list(out_dir.glob("*.png"))
    out = capsys.readouterr().out
    assert "exp" in out and "dense" in out


def test_config_errors_exit_2_before_anything_starts(tmp_path, capsys):
    assert main(["simulate", "--set", "compresor=topk(0.1)", "--set", f"out-dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "compresor" in err and "compressor" in err  # the key and the valid ones
    assert main(["simulate", "--set", "rules=nope.*=identity", "--set", f"out-dir={tmp_path}"]) == 2
    assert "matches no parameter" in capsys.readouterr().err
    assert main(["simulate", "--set", "task=libsvm-logreg(path=missing.svm)", "--set", f"out-dir={tmp_path}"]) == 2
    assert "missing.svm" in capsys.readouterr().err
    assert main(["simulate", "--config", str(tmp_path / "none.toml")]) == 2
    assert not any(tmp_path.iterdir())  # nothing was written
    assert main(["report", str(tmp_path / "no-such-run")]) == 2


def test_demo_writes_runs_and_report(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out-dir", str(out), *FAST, "--set", "rounds=1", "--quiet"]) == 0
    for name in ("uncompressed", "topk-1pct", "topk-10pct", "qsgd-4"):
        assert (out / name / "metrics.jsonl").exists()
    assert (out / "report" / "comparison.md").exists()


@pytest.mark.parametrize("inherited", ["default", "ignored"])
def test_ctrl_c_stops_cleanly_and_keeps_rounds(tmp_path, inherited):
    # "ignored": as a command a non-interactive shell starts in the background (`make test &`) gets it,
    # SIGINT ignored from the start; Python then installs no KeyboardInterrupt handler of its own, and
    # such a run used to go on to 500/500 and exit 0
    disposition = signal.SIG_IGN if inherited == "ignored" else signal.SIG_DFL
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedsqueeze.cli", "simulate", "--set", "num-clients=4", "--set", "rounds=500",
         "--set", f"out-dir={tmp_path}", "--set", "name=long"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, disposition),
    )  # fmt: skip
    metrics = Path(tmp_path / "long" / "metrics.jsonl")
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err.decode()
    assert b"interrupted" in err
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert 2 <= len(rows) < 500
    summary = json.loads((tmp_path / "long" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["rounds"] == len(rows)
