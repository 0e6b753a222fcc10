"""End to end on Flower's deployment engine, on loopback: one SuperLink with TLS, SuperNode
authentication and a database; SuperNodes with keys from `fedsqueeze keys`; `flwr run .`.

One SuperLink serves every scenario (each start costs seconds, each round ~17 s on two cores):
  run A: 2 rounds with a compressor and error feedback (EF21); metrics and bytes equal the in-process
         simulation's;
         meanwhile a SuperNode with an unregistered key is refused and one without the CA cannot connect;
  run B: 3 rounds; SuperNode 0 is restarted after round 1 and restores its state from state-dir;
  run C: 2 rounds of secure aggregation (shared rand-k, masked sums) between the same TLS nodes: every
         stage of the protocol crosses the deployment, with the in-process simulation's byte counts.
Every process is stopped by its PID (process group) in a finally block, also when an assertion fails.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fedsqueeze.cli import main
from fedsqueeze.config import resolve
from fedsqueeze.deploy.credentials import planned
from fedsqueeze.deploy.processes import Deployment, group_alive, stop, wait_for
from fedsqueeze.deploy.state import StateError, StateIdentity, StateStore, config_digest
from fedsqueeze.simulation.runner import simulate

ROOT = Path(__file__).resolve().parents[1]
RUN_LIMIT_S = 150


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


@pytest.mark.slow
def test_deployment_on_loopback(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    assert main(["keys", str(tmp_path / "keys"), "--nodes", "3"]) == 0
    creds = planned(tmp_path / "keys", 3)
    state_dir = tmp_path / "state"
    runs = tmp_path / "runs"
    common = ["num-clients=2", "local-steps=3", "compressor=topk(0.1)", "feedback=ef21", f"out-dir={runs}"]
    cfg_a = resolve(overrides=[*common, "name=deploy-a", "rounds=2", "round-timeout=120"])
    cfg_b = resolve(overrides=[*common, "name=deploy-b", "rounds=3", "round-timeout=40", "min-replies=1"])

    dep = Deployment(tmp_path / "deploy", creds)
    try:
        dep.start_superlink(database="superlink.db")
        assert (dep.workdir / "superlink.db").exists()
        for i in range(2):
            dep.register(creds.public_key(i))
        # node3's key is never registered; the fourth node trusts only the system CAs
        unregistered = dep.start_supernode("unregistered", creds.node_keys[2], {"partition-id": 0})
        no_ca = dep.start_supernode("no-ca", creds.node_keys[0], {"partition-id": 0}, root_certificates=None)
        nodes = [
            dep.start_supernode(f"node{i}", creds.node_keys[i], {"partition-id": i, "state-dir": str(state_dir)})
            for i in range(2)
        ]

        # ---- run A: two rounds with a compressor, compared with the in-process simulation -------------
        run_a = dep.run_app(ROOT, cfg_a)
        wait_for(runs / "deploy-a" / "summary.json", RUN_LIMIT_S, [run_a, *nodes], "run A's summary")
        summary = json.loads((runs / "deploy-a" / "summary.json").read_text())
        assert summary["status"] == "completed"
        rows = _rows(runs / "deploy-a")
        assert [r["round"] for r in rows] == [1, 2]
        assert all(r["clients_ok"] == 2 and r["clients_failed"] == 0 and r["applied"] for r in rows)
        # EF21's first message is the dense delta (init=full), then top-k of the change
        assert rows[0]["uplink_bytes"] > rows[0]["dense_uplink_bytes"]
        assert 0 < rows[1]["uplink_bytes"] < rows[1]["dense_uplink_bytes"] / 4

        local = simulate(cfg_a.replace(name="sim-a"))
        for dep_row, sim_row in zip(rows, local.rows, strict=True):
            assert dep_row["uplink_bytes"] == sim_row["uplink_bytes"]
            assert dep_row["downlink_bytes"] == sim_row["downlink_bytes"]
            assert dep_row["cum_uplink_bytes"] == sim_row["cum_uplink_bytes"]
            # one torch thread per ClientApp in both engines: the same floats
            assert {k: v for k, v in dep_row.items() if k != "wall_s"} == {
                k: v for k, v in sim_row.items() if k != "wall_s"
            }

        # ---- refused nodes ------------------------------------------------------------------------------
        for proc, why in ((unregistered, "Failed to activate SuperNode"), (no_ca, "CERTIFICATE_VERIFY_FAILED")):
            deadline = time.monotonic() + 30
            while proc.popen.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert proc.popen.returncode not in (None, 0), f"{proc.name} was not refused"
            assert why in proc.log_text(), proc.log_text()[-2000:]
            assert "Exit Code: 305" in proc.log_text()
            stop(proc)  # its SuperExec helper may still be retrying

        # ---- run B: node 0 restarts between rounds and keeps its state ----------------------------------
        run_b = dep.run_app(ROOT, cfg_b)
        run_dir_b = runs / "deploy-b"
        deadline = time.monotonic() + RUN_LIMIT_S
        while len(_rows(run_dir_b)) < 1:
            assert time.monotonic() < deadline, "run B's first round did not finish"
            assert run_b.popen.poll() is None or run_b.popen.returncode == 0, run_b.log_text()[-3000:]
            time.sleep(0.1)
        stop(nodes[0])
        assert not group_alive(nodes[0].pid)
        nodes[0] = dep.start_supernode(
            "node0-restarted", creds.node_keys[0], {"partition-id": 0, "state-dir": str(state_dir)}
        )
        wait_for(run_dir_b / "summary.json", RUN_LIMIT_S, [run_b, *nodes], "run B's summary")
        rows_b = _rows(run_dir_b)
        assert [r["round"] for r in rows_b] == [1, 2, 3]
        assert rows_b[0]["clients_ok"] == 2
        # round 2 may miss node 0 (its message may have been taken by the process that was stopped);
        # by round 3 the restarted node is back with the state it wrote after an earlier round
        assert rows_b[2]["clients_ok"] == 2, rows_b
        assert "restored the state of round" in nodes[0].log_text(), nodes[0].log_text()[-3000:]
        run_ids = [p.name for p in state_dir.iterdir()]
        assert len(run_ids) == 2  # one directory per run (its uid, which a resumed server would keep)
        # run A's directory also holds a state file of partition 0; only run B's matches run B's config
        digest = config_digest(cfg_b.to_run_config())
        loaded = []
        for name in run_ids:
            store = StateStore(state_dir, StateIdentity(name.removeprefix("run-"), 0, digest))
            try:
                loaded.append(store.load())
            except StateError as exc:
                assert "belongs to another client" in str(exc)
        assert [state.server_round for state in loaded] == [3]
        # EF21's g_i (what the restarted node restored) and the update of round 3, awaiting acknowledgement
        # as the payload it sent (top-k bytes, not a dense copy of g_i)
        assert {"feedback.g", "pending.payload.default", "pending.round"} <= set(loaded[0].tensors)

        # ---- run C: secure aggregation through the deployment ------------------------------------------
        cfg_c = resolve(overrides=["num-clients=2", "local-steps=3", "compressor=randk(0.2)", "randomness=shared",
                                   "secagg=masked(threshold=2, bits=8, clip=0.05)", f"out-dir={runs}",
                                   "name=deploy-c", "rounds=2", "round-timeout=120"])  # fmt: skip
        run_c = dep.run_app(ROOT, cfg_c)
        wait_for(runs / "deploy-c" / "summary.json", RUN_LIMIT_S, [run_c, *nodes], "run C's summary")
        assert json.loads((runs / "deploy-c" / "summary.json").read_text())["status"] == "completed"
        rows_c = _rows(runs / "deploy-c")
        assert [(r["clients_ok"], r["applied"]) for r in rows_c] == [(2, True), (2, True)], rows_c
        local_c = simulate(cfg_c.replace(name="sim-c"))
        assert [r["uplink_bytes"] for r in rows_c] == [r["uplink_bytes"] for r in local_c.rows]
        assert [r["downlink_bytes"] for r in rows_c] == [r["downlink_bytes"] for r in local_c.rows]
        # the rounding noise comes from each client's OS, so the floats differ, by little at 8 bits
        assert abs(rows_c[-1]["test_accuracy"] - local_c.rows[-1]["test_accuracy"]) < 0.1
    finally:
        dep.close()
    for proc in dep.procs:
        assert not group_alive(proc.pid), f"{proc.name} outlived the test"


#: a runner holding a Deployment in a temporary working directory: SuperLink, two SuperNodes, `flwr run`
KILLED_RUNNER = """
import json, sys, time
from pathlib import Path
from fedsqueeze.config import resolve
from fedsqueeze.deploy.processes import Deployment
cfg = resolve(overrides=["num-clients=2", "rounds=50", "local-steps=2", "round-timeout=60",
                         f"out-dir={sys.argv[1]}", "name=killed"])
dep = Deployment(None)  # --insecure; a temporary working directory (FLWR_HOME, logs)
dep.start_superlink(database=None)
for i in range(2):
    dep.start_supernode(f"node{i}", None, {"partition-id": i})
dep.run_app(sys.argv[2], cfg)
print(json.dumps({"workdir": str(dep.workdir)}), flush=True)
time.sleep(600)
"""


@pytest.mark.slow
def test_sigkilled_deployment_runner_leaves_no_process_and_no_temporary_folder(tmp_path):
    """SIGKILL of the process that holds a Deployment after the first round: the SuperLink, its SuperExec,
    the ServerApp, the SuperNodes and their ClientApps, `flwr run` all end; the temporary workdir goes."""
    import json
    import os
    import signal
    import subprocess
    import sys
    import tempfile

    from _lifetime import Tracked, clean_up, record_until_a_row, rows

    tmp = Path(tempfile.mkdtemp(prefix="fsqt-", dir="/tmp"))
    metrics = tmp_path / "runs" / "killed" / "metrics.jsonl"
    env = {
        **os.environ,
        "TMPDIR": str(tmp),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    err = tmp_path / "stderr.log"
    with open(err, "wb") as err_file:
        runner = subprocess.Popen(
            [sys.executable, "-c", KILLED_RUNNER, str(tmp_path / "runs"), str(ROOT)],
            env=env, stdout=subprocess.PIPE, stderr=err_file, text=True, start_new_session=True,
        )  # fmt: skip
    tracked = Tracked(runner)
    try:
        assert runner.stdout is not None
        workdir = Path(json.loads(runner.stdout.readline())["workdir"])
        assert workdir.parent == tmp
        expected = ("flower-superlink", "flower-superexec", "flower-supernode", "flwr run")
        record_until_a_row(tracked, metrics, err, RUN_LIMIT_S, expected)
        runner.send_signal(signal.SIGKILL)
        runner.wait()
        left, waited = tracked.wait_gone(30)
        assert left == [], f"alive {waited:.0f} s after the runner's SIGKILL:\n" + "\n".join(left)
        assert not workdir.exists() and list(tmp.iterdir()) == []
        after = rows(metrics)
        report = err.read_text()
        assert "ended without stopping what it started" in report and str(workdir) in report, report[-3000:]
        print(f"{len(tracked.procs)} processes, all gone {waited:.1f} s after SIGKILL; {after} row(s)")
    finally:
        clean_up(tracked, tmp)
