"""A secure loopback deployment next to the same config in simulation: per-round wall time and bytes.

    .venv/bin/python scripts/deploy_loopback.py [--rounds 5] [--set key=value ...] [--workdir DIR] [--json FILE]

Runs what docs/deploy.md describes, on 127.0.0.1 with free ports and a private FLWR_HOME:
`fedsqueeze keys`, `flower-superlink` with TLS, SuperNode authentication and `--database`,
`flwr supernode register`, two `flower-supernode`s with `partition-id` and `state-dir` in their node
config, `flwr run . fedsqueeze --run-config FILE --stream`, then `fedsqueeze report` on the run.
It prints every command it ran, then a table: per round, the wall time in deployment and in the
in-process simulation, and the uplink/downlink bytes of both (they must be equal; exit code 1 if not).
Every process it starts is stopped by its PID (process group) when it ends, fails or is interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--set", "-s", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temporary directory")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    args = parser.parse_args(argv)

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fedsqueeze-deploy-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["FLWR_HOME"] = str(workdir / "deploy" / "flwr-home")
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"

    from fedsqueeze.cli import main as fedsqueeze
    from fedsqueeze.config import resolve
    from fedsqueeze.deploy.credentials import planned
    from fedsqueeze.deploy.processes import Deployment, wait_for
    from fedsqueeze.simulation.runner import simulate
    from fedsqueeze.tracking import read_metrics

    overrides = [
        "name=deploy",
        "num-clients=2",
        f"rounds={args.rounds}",
        "local-steps=10",
        "compressor=topk(0.1)",
        "round-timeout=120",
        f"out-dir={workdir / 'runs'}",
        *args.overrides,
    ]
    cfg = resolve(overrides=overrides)
    if fedsqueeze(["keys", str(workdir / "keys"), "--nodes", str(cfg.num_clients), "--force"]) != 0:
        return 2
    creds = planned(workdir / "keys", cfg.num_clients)
    run_dir = workdir / "runs" / cfg.name
    t0 = time.perf_counter()
    with Deployment(workdir / "deploy", creds) as dep:
        dep.start_superlink(database="superlink.db")
        t_link = time.perf_counter()
        for i in range(cfg.num_clients):
            dep.register(creds.public_key(i))
        print(dep.flwr("supernode", "list", "fedsqueeze").stdout)
        nodes = [
            dep.start_supernode(
                f"node{i}", creds.node_keys[i], {"partition-id": i, "state-dir": str(workdir / "state")}
            )
            for i in range(cfg.num_clients)
        ]
        t_submit = time.perf_counter()
        run = dep.run_app(ROOT, cfg)
        wait_for(run_dir / "summary.json", 120 + 40 * cfg.rounds, [run, *nodes], "the run's summary")
        t_done = time.perf_counter()
        print("commands run (FLWR_HOME and the working directory are", dep.workdir, "):")
        print("  fedsqueeze keys", workdir / "keys", "--nodes", cfg.num_clients, "--force")
        for proc in dep.procs:
            print("  " + shlex.join(Path(proc.argv[0]).name if i == 0 else a for i, a in enumerate(proc.argv)))
        print("  flwr supernode register KEY.pub fedsqueeze  (once per node); flwr supernode list fedsqueeze")
    deployed = read_metrics(run_dir / "metrics.jsonl")
    fedsqueeze(["report", str(run_dir)])

    sim = simulate(cfg.replace(name="simulation"))
    table, equal = [], True
    for d, s in zip(deployed, sim.rows, strict=True):
        same = d["uplink_bytes"] == s["uplink_bytes"] and d["downlink_bytes"] == s["downlink_bytes"]
        equal &= same
        table.append(
            {
                "round": d["round"],
                "deploy_wall_s": round(d["wall_s"], 2),
                "simulation_wall_s": round(s["wall_s"], 3),
                "uplink_bytes": d["uplink_bytes"],
                "simulation_uplink_bytes": s["uplink_bytes"],
                "downlink_bytes": d["downlink_bytes"],
                "simulation_downlink_bytes": s["downlink_bytes"],
                "dense_uplink_bytes": d["dense_uplink_bytes"],
                "bytes_equal": same,
            }
        )
    print(f"\nconfig: {' '.join(overrides[1:-1])}")
    print(
        f"superlink start {t_link - t0:.1f} s; flwr run to summary {t_done - t_submit:.1f} s; "
        f"simulation (in-process) {sim.timings['wall_s']:.1f} s"
    )
    print("| round | deploy wall s | simulation wall s | uplink B (deploy / sim) | downlink B (deploy / sim) |")
    print("|---:|---:|---:|---:|---:|")
    for r in table:
        print(
            f"| {r['round']} | {r['deploy_wall_s']:.2f} | {r['simulation_wall_s']:.3f} | "
            f"{r['uplink_bytes']} / {r['simulation_uplink_bytes']} | "
            f"{r['downlink_bytes']} / {r['simulation_downlink_bytes']} |"
        )
    print("bytes equal in every round:", equal)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "config": overrides,
                    "rounds": table,
                    "superlink_start_s": t_link - t0,
                    "run_s": t_done - t_submit,
                    "simulation_s": sim.timings["wall_s"],
                    "bytes_equal": equal,
                },
                indent=2,
            )
            + "\n"
        )
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
