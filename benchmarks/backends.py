"""Backend overhead: per-round wall time of each backend against the local-training compute of the round.

    python benchmarks/backends.py [--rounds 10] [--set key=value ...] [--no-ray] [--out FILE.json]

For one config (default: the default run, digits MLP, 20 clients, full participation) it measures, in
this order and in the same process:
1. local compute: each round's client work called directly (the engine's client half: decode the broadcast,
   local SGD, compress, encode), no Flower at all; the baseline;
2. in-process backend: the same rounds through the real ServerApp/ClientApp on the in-process Grid;
3. Ray backend: the same rounds on Flower's simulation engine (SuperLink + Ray), start-up reported apart;
4. the default run (`fedsqueeze simulate`, every default) end to end, in-process, as a user would run it.
Overhead = (round wall time - local compute of that round) / local compute, median over rounds.
Server-side work (aggregation, evaluation, metrics) counts as overhead: it is not client compute.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedsqueeze.config import Config, build_task, resolve
from fedsqueeze.engine import Exchange, LocalTransport, Server, run_round
from fedsqueeze.simulation.runner import CLIENT_THREADS, run_inprocess, run_ray


def local_compute(cfg: Config) -> list[float]:
    """Seconds of client work per round, with no Flower (the engine replays the rounds through its local transport).

    One torch thread, as both backends give each client call."""
    threads = torch.get_num_threads()
    torch.set_num_threads(CLIENT_THREADS)
    try:
        return _local_compute(cfg)
    finally:
        torch.set_num_threads(threads)


class _TimedTransport(LocalTransport):
    """The engine's local transport, timing the client calls of each round."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.per_round: list[float] = []

    def exchange(self, server_round, outbox, partition_ids):
        t0 = time.perf_counter()
        out = super().exchange(server_round, outbox, partition_ids)
        arrivals = list(out.arrivals)  # the client calls run as the arrivals are drawn
        self.per_round.append(time.perf_counter() - t0)
        return Exchange(arrivals, out.downlink_bytes)


def _local_compute(cfg: Config) -> list[float]:
    server = Server(cfg)
    transport = _TimedTransport(cfg)
    for rnd in range(1, cfg.rounds + 1):
        run_round(server, transport, rnd)
    return transport.per_round


def overhead(walls: list[float], compute: list[float]) -> float:
    return statistics.median((w - c) / c for w, c in zip(walls, compute, strict=True))


def default_run_wall() -> dict[str, float]:
    """`fedsqueeze simulate` with every default, as a subprocess (imports included)."""
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "fedsqueeze.cli", "simulate", "--quiet", "--set", f"out-dir={out}"],
            check=True,
            capture_output=True,
        )
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(out) / "default" / "metrics.jsonl").read_text().splitlines()]
    return {
        "wall_s": wall,
        "rounds_s": sum(r["wall_s"] for r in rows),
        "final_test_accuracy": rows[-1]["test_accuracy"],
        "rounds": len(rows),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray backend (it needs ~15-60 s to start)")
    parser.add_argument("--out", default="benchmarks/results/backends.json")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as out:
        cfg = resolve(overrides=[f"rounds={args.rounds}", f"out-dir={out}", "name=bench", *args.overrides])
        build_task(cfg)  # data loading is not part of a round
        compute = local_compute(cfg)
        inproc = run_inprocess(cfg.replace(name="inprocess"))
        in_walls = [r["wall_s"] for r in inproc.rows]
        result: dict[str, object] = {
            "machine": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "cpus": torch.get_num_threads(),
            },
            "config": cfg.to_run_config(),
            "local_compute_s_per_round": statistics.median(compute),
            "inprocess": {
                "round_s": statistics.median(in_walls),
                "overhead": overhead(in_walls, compute),
                "client_calls_s": inproc.timings["client_s"],
                "wall_s": inproc.timings["wall_s"],
            },
        }
        if not args.no_ray:
            ray = run_ray(cfg.replace(name="ray"))
            ray_walls = [r["wall_s"] for r in ray.rows]
            result["ray"] = {
                "round_s": statistics.median(ray_walls),
                "overhead": overhead(ray_walls, compute),
                "startup_s": ray.timings["wall_s"] - ray.timings["rounds_s"],
                **{k: v for k, v in ray.timings.items()},
            }
            same = all(
                a["uplink_bytes"] == b["uplink_bytes"] and abs(a["test_accuracy"] - b["test_accuracy"]) < 1e-9
                for a, b in zip(inproc.rows, ray.rows, strict=True)
            )
            result["ray"]["same_metrics_as_inprocess"] = same
    result["default_run"] = default_run_wall()

    comp = result["local_compute_s_per_round"]
    print(f"config: {cfg.task}, {cfg.num_clients} clients, cohort {cfg.cohort_count()}, {cfg.local_steps} local steps")
    print(f"{'':24}{'round (ms)':>12}{'overhead':>10}{'start-up (s)':>14}")
    print(f"{'local compute':24}{comp * 1e3:12.1f}{'-':>10}{'-':>14}")
    ip = result["inprocess"]
    print(f"{'in-process backend':24}{ip['round_s'] * 1e3:12.1f}{ip['overhead']:10.2f}{'-':>14}")
    if "ray" in result:
        ray_r = result["ray"]
        print(f"{'Ray backend':24}{ray_r['round_s'] * 1e3:12.1f}{ray_r['overhead']:10.2f}{ray_r['startup_s']:14.1f}")
    dr = result["default_run"]
    print(
        f"default run ({dr['rounds']} rounds, in-process, `fedsqueeze simulate`): {dr['wall_s']:.1f} s wall, "
        f"{dr['rounds_s']:.1f} s in rounds, final accuracy {dr['final_test_accuracy']:.3f}"
    )
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
