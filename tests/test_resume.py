"""Checkpoint and resume: a run killed with SIGKILL and resumed gives the rows of a run never interrupted.

The config is the hardest case the engine has: top-k with EF21 on the uplink (client memory with
pending updates and acknowledgements, the server's running mean), EF21-P on the downlink (each
client's copy of w, resynchronisation), and partial participation (clients that skip rounds).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from fedsqueeze.config import ConfigError, resolve
from fedsqueeze.engine import checkpoint
from fedsqueeze.simulation.runner import simulate
from fedsqueeze.tracking import RunDir, read_metrics

HARD = [
    "num-clients=6",
    "cohort-size=0.5",
    "compressor=topk(0.1)",
    "feedback=ef21",
    "downlink=topk(0.2)",
    "downlink-feedback=ef21p",
]


def _argv(*sets: str) -> list[str]:
    out = [sys.executable, "-m", "fedsqueeze.cli", "simulate", "--quiet"]
    for s in sets:
        out += ["--set", s]
    return out


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def _kill_after(argv: list[str], metrics: Path, at_rows: int, err: Path, limit: float = 240):
    """Start the runner in a session of its own, SIGKILL it once `metrics` has `at_rows` rows."""
    from _lifetime import Tracked, rows

    with open(err, "wb") as err_file:
        runner = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err_file, start_new_session=True)
    tracked = Tracked(runner)
    deadline = time.monotonic() + limit
    while rows(metrics) < at_rows:
        assert time.monotonic() < deadline, f"fewer than {at_rows} rows within {limit:g} s"
        assert runner.poll() is None, err.read_text()[-3000:]
        tracked.record()
        time.sleep(0.02)
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    return tracked


def _resume(run_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "fedsqueeze.cli", "simulate", "--quiet", "--resume", str(run_dir), *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=600)


def test_killed_run_resumes_to_the_rows_of_an_uninterrupted_one(tmp_path):
    common = [*HARD, "rounds=10", "local-steps=20", f"out-dir={tmp_path}"]
    reference = simulate(resolve(overrides=[*common, "name=reference"]))
    run_dir = tmp_path / "killed"
    tracked = _kill_after(_argv(*common, "name=killed"), run_dir / "metrics.jsonl", 3, tmp_path / "err.log")
    try:
        assert tracked.wait_gone(10)[0] == []
        at_kill = read_metrics(run_dir / "metrics.jsonl")
        assert 3 <= len(at_kill) < 10 and not (run_dir / "summary.json").exists()
        # what the crash leaves: a usable model of a complete round, and the clients' state files
        model = torch.load(run_dir / "model.pt", weights_only=True)
        assert set(model) == set(torch.load(reference.run_dir / "model.pt", weights_only=True))
        # killed between a round's row and its checkpoint, or after both
        last = checkpoint.last_round(RunDir(run_dir))
        assert last in (len(at_kill) - 1, len(at_kill))
        assert any((run_dir / "clients").rglob("*.fsqstate"))

        done = _resume(run_dir)
        assert done.returncode == 0, done.stderr[-3000:]
        rows = read_metrics(run_dir / "metrics.jsonl")
        assert _strip(rows) == _strip(reference.rows)
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["resumed_after_round"] == last
        assert summary["totals"]["uplink_bytes"] == reference.summary["totals"]["uplink_bytes"]
        final = torch.load(run_dir / "model.pt", weights_only=True)
        expected = torch.load(reference.run_dir / "model.pt", weights_only=True)
        assert all(torch.equal(final[k], expected[k]) for k in expected)
        assert not (run_dir / "clients").exists()  # a completed run keeps no client state
    finally:
        tracked.kill_all()


#: a cohort kept for 3 rounds, with the cg solver's server state and the s_i / p_i weights of stratified
#: sampling; and localgd, whose clients keep the cohort's anchor x_t in their state
COHORTS = [
    "task=synthetic-logreg", "num-clients=8", "cohort-size=4", "sampling=stratified(clusters=4, by=labels)",
    "compressor=qsgd(levels=16)", "mode=delta", "lr=0.1", "local-steps=2", "batch-size=0",
]  # fmt: skip


@pytest.mark.parametrize(
    "config",
    [
        [*HARD, "local-steps=3"],
        [*COHORTS, "algorithm=sppm(gamma=2.0, inner=3, solver=cg)"],
        [*COHORTS, "algorithm=sppm(gamma=2.0, inner=3, solver=localgd)"],
    ],
    ids=["ef21-ef21p", "sppm-cg", "sppm-localgd"],
)
def test_a_round_begun_but_not_completed_is_done_again(tmp_path, config):
    """A crash between a round's row and its checkpoint (and a torn last line): the row goes, the round runs
    again, also inside a cohort's inner rounds."""
    common = [*config, "rounds=5", f"out-dir={tmp_path}"]
    reference = simulate(resolve(overrides=[*common, "name=reference"]))

    seen = []

    def crash_after_round_2(event, data):
        if event == "round" and data["round"] == 2:
            seen.append(data)
            raise RuntimeError("the machine went down")

    cfg = resolve(overrides=[*common, "name=crashed"])
    with pytest.raises(RuntimeError, match="went down"):
        simulate(cfg, observer=crash_after_round_2)
    run_dir = tmp_path / "crashed"
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "interrupted"
    # as if the process had died while round 3 was written: its row is there, its checkpoint is not
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({**reference.rows[2], "test_accuracy": 0.0}) + "\n" + '{"round": 4, "clients_s')
    resumed = simulate(cfg.replace(resume=str(run_dir)))
    assert _strip(resumed.rows) == _strip(reference.rows)
    assert resumed.summary["resumed_after_round"] == 2


def test_resume_refuses_a_changed_config_naming_the_keys(tmp_path):
    cfg = resolve(overrides=[*HARD, "rounds=3", "local-steps=2", f"out-dir={tmp_path}", "name=r"])

    def stop_after_round_1(event, data):
        if event == "round":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(cfg, observer=stop_after_round_1)
    run_dir = tmp_path / "r"
    refused = _resume(run_dir, "--set", "lr=0.05", "--set", "compressor=topk(0.2)")
    assert refused.returncode == 2
    message = " ".join(refused.stderr.split())
    assert "lr: 0.2 -> 0.05" in message and "compressor: 'topk(0.1)' -> 'topk(0.2)'" in message
    assert "rounds" not in message
    with pytest.raises(ConfigError, match="these keys differ: local-steps"):
        simulate(cfg.replace(resume=str(run_dir), local_steps=3))
    # the same keys again are no change; the run then completes, and a completed run has nothing to resume
    assert _resume(run_dir, "--set", "lr=0.2").returncode == 0
    again = _resume(run_dir)
    assert again.returncode == 2 and "completed all its 3 rounds" in " ".join(again.stderr.split())
    with pytest.raises(ConfigError, match="no such run directory"):
        simulate(cfg.replace(resume=str(tmp_path / "nothing")))


def test_one_process_writes_a_run_at_a_time(tmp_path):
    run_dir = RunDir.create(tmp_path, "r")
    with checkpoint.locked(run_dir):
        with pytest.raises(ConfigError, match="another process is running this run"):
            with checkpoint.locked(run_dir, wait_s=0.2):
                pass
    with checkpoint.locked(run_dir, wait_s=0.2):  # released with the first
        pass


@pytest.mark.slow
def test_killed_ray_run_resumes_on_ray_to_the_rows_of_an_uninterrupted_one(tmp_path, monkeypatch):
    import shutil

    from _lifetime import clean_up

    common = [*HARD, "rounds=30", "local-steps=10", f"out-dir={tmp_path / 'runs'}"]
    reference = simulate(resolve(overrides=[*common, "name=reference"]))
    tmp = Path(tempfile.mkdtemp(prefix="fsqt-", dir="/tmp"))  # short: Ray's socket paths
    run_dir = tmp_path / "runs" / "killed"
    monkeypatch.setenv("TMPDIR", str(tmp))
    tracked = None
    try:
        tracked = _kill_after(
            [*_argv(*common, "name=killed"), "--backend", "ray"], run_dir / "metrics.jsonl", 2, tmp_path / "err.log"
        )
        left, waited = tracked.wait_gone(30)
        assert left == [], "\n".join(left)
        at_kill = len(read_metrics(run_dir / "metrics.jsonl"))
        assert at_kill < 30
        done = _resume(run_dir, "--backend", "ray")
        assert done.returncode == 0, done.stderr[-3000:]
        assert _strip(read_metrics(run_dir / "metrics.jsonl")) == _strip(reference.rows)
        print(f"killed at {at_kill} rows; resumed on Ray to 30 rows equal to the in-process run")
    finally:
        if tracked is not None:
            clean_up(tracked, tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def test_a_checkpoint_waits_for_the_state_files_its_clients_write_behind(tmp_path, monkeypatch):
    """In-process, clients write their state files behind their replies; the server's checkpoint of a
    round must not be written before every file of that round is (a resumed run would read older ones)."""
    from fedsqueeze.deploy import state as client_state

    real_save = client_state.StateStore.save

    def slow_save(self, tensors, server_round):
        time.sleep(0.05)  # a slow disk: without the wait, the checkpoint would overtake these writes
        real_save(self, tensors, server_round)

    behind_at_checkpoint = []
    real_checkpoint = checkpoint.save

    def checked_save(state, run_dir):
        files = [f for f in (Path(run_dir.path) / "clients").rglob("partition-*.fsqstate") if ".prev." not in f.name]
        written = {f.name: client_state._round_of(f) for f in files}
        behind_at_checkpoint.append((state["round"], written))
        real_checkpoint(state, run_dir)

    monkeypatch.setattr(client_state.StateStore, "save", slow_save)
    monkeypatch.setattr(checkpoint, "save", checked_save)
    cfg = resolve(overrides=["num-clients=4", "compressor=topk(0.1)", "feedback=ef21", "rounds=3", "local-steps=2",
                             f"out-dir={tmp_path}"])  # fmt: skip
    simulate(cfg, backend="inprocess")
    assert [r for r, _ in behind_at_checkpoint] == [0, 1, 2, 3]
    for server_round, written in behind_at_checkpoint[1:]:
        # every client trains every round: each has its file of this round (or of the next, already)
        assert len(written) == 4 and min(written.values()) >= server_round, (server_round, written)
