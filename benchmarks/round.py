"""Round benchmark: what fedsqueeze adds to a round of local training, at d = 10.5 M parameters.

    python benchmarks/round.py                      # every config, 2 and 10 local steps, stock Flower, scale runs
    python benchmarks/round.py --quick              # without the memory-at-scale runs (20 and 1000 clients)
    python benchmarks/round.py --configs identity,topk --steps 2 --rounds 3 --no-flower --out FILE.json
    python benchmarks/round.py --steps 10 --quick --no-flower --repeats 3   # each config 3 times, pooled

Model and data: benchmarks/big_task.py, a user task (`task = "big_task:build"`): an MLP
1024 -> 4096 -> 1536 -> 10 (d = 10,506,762) on synthetic data from the seed, 8 clients (iid, 320
examples each), mini-batches of 32, lr 0.01, in-process backend, `--rounds` rounds (4).

Each config runs in its own subprocess, which does, in this order:
1. one `clone()` of a d-float32 vector into fresh memory, one thread, median of 21 repeats: the
   unit of `clones` (first, before the run leaves freed memory in the process for clones to reuse);
2. the fedsqueeze run, through `fedsqueeze.simulation.runner.simulate(cfg, backend="inprocess")`;
   the round time is the median of metrics.jsonl's `wall_s` over the rounds after the first
   (start-up, task building and the first round are excluded; with EF21 the second round also
   commits each client's dense first message, a cost of the run's start, which the median of
   rounds 2 to 4 leaves out);
3. peak RSS of that process right after the run (/proc/self/status VmHWM, reset after 1.);
4. the plain PyTorch local steps of the same clients: the same model, the same number of steps on
   batches drawn as fedsqueeze's FedAvg draws them (seeded permutations of each client's data), a
   plain `torch.optim.SGD` loop, one torch thread (as fedsqueeze gives each client call); only the
   steps are timed (no model loading); summed over the round's clients, median over rounds after
   the first. They run in the same process after the run, so with the same memory allocator
   settings (fedsqueeze.simulation.allocator), which speed up their gradient buffers as well;
5. the codec alone (`codec_cost`), one torch thread, median of 5: the uplink plan's compress+encode
   of client 0's update after the same plain steps, the downlink plan's compress+encode of the
   broadcast and its decode, through the engine's own UpdatePlan and wire codec.

Columns:
  plain ms     plain local steps of the round's clients (3.)
  round ms     fedsqueeze round (1.)
  x plain      round ms / plain ms                               (target: <= 1.10 with 10 local steps)
  fw ms/cr     (round - plain) / clients per round: framework time per client-round
  clones       fw ms/cr in units of one clone() of the model vector  (target: <= 6)
  codec ms/cr  what the codec alone costs a client call (5.): the uplink compress+encode of a real
               update, and the broadcast's decode where each client decodes its own
  codec x      (plain + clients x codec ms/cr + the broadcast's encode and decode per round) / plain:
               x plain if the codec's own work, which the single client worker does between the
               clients' local steps, were all the framework added (the codec's share of x plain)
  peak MB      peak RSS of the subprocess that ran the config (2.)  (20 clients topk+ef21: <= 1.5 GB;
               1000 clients ef21 cohort 10: <= 4 GB)
Stock Flower (benchmarks/stock_flower.py): Flower's FedAvg + a minimal ClientApp doing the same plain
steps, on Flower's Ray simulation engine (one CPU per client); round times taken inside the ServerApp,
Ray start-up excluded; target: the in-process identity round <= 1.0 x stock Flower's.
With --repeats N every config runs N times, in turns (all configs once, then again), so that a slow
spell of the machine falls on every config; its row pools the N runs: the medians of all their rounds
after the first (fedsqueeze's and plain ones), the median clone, the highest peak.
Targets are printed, not asserted. Results go to --out (benchmarks/results/round.json).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

MODEL = {"in_dim": 1024, "h1": 4096, "h2": 1536, "classes": 10}
COMPRESSED = {"compressor": "topk(0.01)"}
CONFIGS: dict[str, dict[str, object]] = {
    "identity": {"compressor": "identity"},
    "topk": COMPRESSED,
    "topk+ef21": {**COMPRESSED, "feedback": "ef21"},
    # what the per-round checkpoint (and client state in files) costs: the same without them
    "topk+ef21 no checkpoint": {**COMPRESSED, "feedback": "ef21", "checkpoint": False},
    "qsgd": {"compressor": "qsgd(levels=16)"},
    "powersgd": {"rules": "*.weight=powersgd(rank=4); *.bias=identity"},
    "topk-down+ef21p": {**COMPRESSED, "downlink": "topk(0.01)", "downlink-feedback": "ef21p"},
}
#: a `state-dir` value the worker replaces with a folder inside its temporary output directory
STATES = "<tmp>/states"
#: memory-at-scale runs: (config keys, clients, cohort or None, rounds or None for --rounds, examples per client)
SCALE: dict[str, tuple[dict[str, object], int, int | None, int | None, int]] = {
    # the default: checkpoints on, so the clients' state lives in files (the run directory's clients/)
    "20c topk+ef21": ({**COMPRESSED, "feedback": "ef21"}, 20, None, None, 320),
    # no checkpoints: the clients' state in memory (Flower's context.state), as before resumable runs
    "20c topk+ef21 in memory": ({**COMPRESSED, "feedback": "ef21", "checkpoint": False}, 20, None, None, 320),
    "1000c ef21 cohort 10": (
        {**COMPRESSED, "feedback": "ef21", "cohort-size": 10, "state-dir": STATES},
        1000,
        10,
        2,
        64,
    ),
}
SCALE_STEPS = 2
TARGET_CLONES = 6.0
TARGET_RATIO_10 = 1.10
TARGET_RSS_MB = {"20c topk+ef21": 1500.0, "20c topk+ef21 in memory": 1500.0, "1000c ef21 cohort 10": 4000.0}
BATCH, LR, SEED = 32, 0.01, 0


# ---- inside a subprocess ----------------------------------------------------------------------
def derive_seed(*parts: object) -> int:
    """The per-(seed, round, client) batch seed fedsqueeze's client uses today (so the batches are the same)."""
    text = "\x1f".join(repr(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") >> 1


def peak_rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Start VmHWM afresh from the current RSS (Linux: /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def plain_rounds(task, cohort: int, rounds: int, steps: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Seconds of plain local SGD of `cohort` clients, per round (clients 0..cohort-1: same sizes as any)."""
    import big_task
    import torch

    torch.set_num_threads(1)
    model = task.new_model(seed=SEED)
    start = [p.detach().clone() for p in model.parameters()]
    per_round = []
    for rnd in range(1, rounds + 1):
        total = 0.0
        for pid in range(cohort):
            with torch.no_grad():
                for p, s in zip(model.parameters(), start, strict=True):
                    p.copy_(s)
            x, y = task.clients[pid].train.x, task.clients[pid].train.y
            t0 = time.perf_counter()
            big_task.local_steps(model, x, y, steps, BATCH, LR, derive_seed(SEED, rnd, pid, "local"))
            total += time.perf_counter() - t0
        per_round.append(total)
    return per_round


def codec_cost(cfg, task, steps: int, repeats: int = 5) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Seconds of the codec's work that a round does between the clients' local steps, not beside them,
    one torch thread, median of `repeats` after a warm-up: per client, the uplink compress+encode of a
    real update (client 0's delta after `steps` plain steps); per round, the broadcast's
    compress+encode on the server and its decode (the plain broadcast is decoded once per round;
    under downlink feedback each client decodes its own, counted per client)."""
    import big_task
    import torch

    from fedsqueeze import wire
    from fedsqueeze.algorithms import build
    from fedsqueeze.config import NO_DOWNLINK
    from fedsqueeze.engine.payloads import UpdatePlan
    from fedsqueeze.engine.plan import PLAIN_DOWNLINK

    torch.set_num_threads(1)
    model = task.new_model(seed=SEED)
    layout = build(cfg.algorithm).layout(model)
    flat = torch.nn.utils.parameters_to_vector
    start = flat(model.parameters()).detach()
    big_task.local_steps(model, task.clients[0].train.x, task.clients[0].train.y, steps, BATCH, LR, SEED)
    delta = flat(model.parameters()).detach() - start
    gen = torch.Generator().manual_seed(SEED)

    def median_s(fn) -> float:  # type: ignore[no-untyped-def]
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def encoded(plan: UpdatePlan, v: torch.Tensor) -> dict[str, bytes]:
        return plan.encode(plan.compress(v, gen))

    def decoded(plan: UpdatePlan, data: dict[str, bytes]) -> torch.Tensor:
        return plan.decompress([wire.decode(data[g.key], g.numel) for g in plan.groups])

    uplink, downlink = UpdatePlan.uplink(layout, cfg), UpdatePlan.downlink(layout, cfg)
    # a compressed broadcast carries a difference of models: the delta stands in for it
    sent = delta if cfg.downlink != NO_DOWNLINK else start
    broadcast = encoded(downlink, sent)
    up = median_s(lambda: encoded(uplink, delta))
    down_encode = median_s(lambda: encoded(downlink, sent))
    down_decode = median_s(lambda: decoded(downlink, broadcast))
    per_client_down = cfg.downlink != NO_DOWNLINK and cfg.downlink_feedback != PLAIN_DOWNLINK
    return {
        "uplink_s": up,
        "broadcast_encode_s": down_encode,
        "broadcast_decode_s": down_decode,
        "per_client_s": up + (down_decode if per_client_down else 0.0),
        "per_round_s": down_encode + (0.0 if per_client_down else down_decode),
    }


def clone_seconds(d: int, repeats: int = 21) -> float:
    """Median seconds of one `clone()` of a d-float32 vector into fresh memory, as every new d-vector
    of a round is: the copies are kept until the end, so the allocator cannot hand one's pages to
    the next (freed and reused at once, a clone here measured anywhere from 3 to 17 ms)."""
    import torch

    torch.set_num_threads(1)
    v = torch.randn(d)
    times, kept = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        kept.append(v.clone())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def codec_ratio(plain_s: float, cohort: int, codec: dict[str, float]) -> float:
    """round / plain if the codec's serial work were all that a round added to the plain steps."""
    return (plain_s + cohort * codec["per_client_s"] + codec["per_round_s"]) / plain_s


def after_first(values: list[float]) -> float:
    return statistics.median(values[1:] if len(values) > 1 else values)


def task_ref(model: dict[str, int], examples: int) -> str:
    opts = ", ".join(f"{k}={v}" for k, v in {**model, "examples": examples}.items())
    return f"big_task:build({opts})"


def worker(spec: dict) -> dict:  # type: ignore[type-arg]
    """One config: fedsqueeze run, peak RSS, plain steps, clone unit (see the module docstring)."""
    import big_task

    from fedsqueeze.config import Config
    from fedsqueeze.simulation.runner import simulate

    m = spec["model"]
    d = (m["in_dim"] + 1) * m["h1"] + (m["h1"] + 1) * m["h2"] + (m["h2"] + 1) * m["classes"]  # big_task's MLP
    clone = clone_seconds(d)
    reset_peak_rss()  # the clones' memory is not the run's
    with tempfile.TemporaryDirectory() as out:
        run_config = {
            "task": task_ref(spec["model"], spec["examples"]),
            "partition": "iid",
            "num-clients": spec["clients"],
            "rounds": spec["rounds"],
            "local-steps": spec["steps"],
            "batch-size": BATCH,
            "lr": LR,
            "seed": SEED,
            "out-dir": out,
            "name": "bench",
            **{k: (v.replace("<tmp>", out) if isinstance(v, str) else v) for k, v in spec["keys"].items()},
        }
        cfg = Config.from_run_config(run_config)
        t0 = time.perf_counter()
        result = simulate(cfg, backend="inprocess")
        wall = time.perf_counter() - t0
        rss = peak_rss_mb()
        rows = result.rows
        walls = [float(r["wall_s"]) for r in rows]
        cohort = cfg.cohort_count()
    task = big_task.build(spec["clients"], "iid", SEED, examples=spec["examples"], **spec["model"])
    assert task.num_params() == d
    plain = plain_rounds(task, cohort, spec["rounds"], spec["steps"])
    round_s, plain_s = after_first(walls), after_first(plain)
    fw = (round_s - plain_s) / cohort
    codec = codec_cost(cfg, task, spec["steps"])
    return {
        "name": spec["name"],
        "keys": spec["keys"],
        "steps": spec["steps"],
        "clients": spec["clients"],
        "cohort": cohort,
        "rounds": spec["rounds"],
        "examples_per_client": spec["examples"],
        "d": d,
        "data_mb": sum(c.train.x.numel() for c in task.clients) * 4 / 2**20,
        "round_s": round_s,
        "plain_s": plain_s,
        "ratio": round_s / plain_s,
        "fw_s_per_client_round": fw,
        "clone_s": clone,
        "clones": fw / clone,
        "codec": codec,
        "codec_ratio": codec_ratio(plain_s, cohort, codec),
        "peak_rss_mb": rss,
        "round_walls_s": walls,
        "plain_rounds_s": plain,
        "run_wall_s": wall,
        "client_calls_s": result.timings.get("client_s"),
        "uplink_bytes": [r["uplink_bytes"] for r in rows],
        "downlink_bytes": [r["downlink_bytes"] for r in rows],
        "test_accuracy": [r["test_accuracy"] for r in rows],
        "clients_failed": [r["clients_failed"] for r in rows],
    }


def flower_worker(spec: dict) -> dict:  # type: ignore[type-arg]
    import stock_flower

    out = stock_flower.run(spec["clients"], spec["rounds"], spec["steps"], BATCH, LR, SEED, spec["model"])
    out.update(name="stock Flower FedAvg (Ray)", steps=spec["steps"], clients=spec["clients"],
               round_median_s=after_first(out["round_s"]), peak_rss_driver_mb=peak_rss_mb())  # fmt: skip
    out["test_accuracy"] = {str(k): v for k, v in out["test_accuracy"].items()}
    return out


# ---- the driver -------------------------------------------------------------------------------
def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_sub(mode: str, spec: dict, timeout: float, rss_cap_mb: float) -> dict:  # type: ignore[type-arg]
    """Run one spec in a fresh Python process; its last stdout line is the JSON result.

    The process is stopped (and the row says so) if its RSS goes over `rss_cap_mb`, so that a config
    whose memory grows with the number of clients cannot take the machine down."""
    with tempfile.TemporaryDirectory(prefix="fedsqueeze-bench-flwr-") as home:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "FLWR_HOME": home,
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "RAY_DISABLE_USAGE_STATS": "1",
        }
        out_path, err_path = Path(home) / "stdout", Path(home) / "stderr"
        with open(out_path, "w") as out, open(err_path, "w") as err:
            proc = subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), mode, json.dumps(spec)],
                stdout=out, stderr=err, text=True, env=env, cwd=home,
            )  # fmt: skip
            deadline, seen = time.monotonic() + timeout, 0.0
            while proc.poll() is None:
                seen = max(seen, rss_mb(proc.pid))
                if seen > rss_cap_mb or time.monotonic() > deadline:
                    proc.kill()
                    proc.wait()
                    why = f"RSS over {rss_cap_mb:,.0f} MB" if seen > rss_cap_mb else f"over {timeout:.0f} s"
                    return {**spec, "stopped": why, "peak_rss_mb": seen}
                time.sleep(0.2)
        stdout, stderr = out_path.read_text(), err_path.read_text()
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{spec['name']} ({mode}) failed with code {proc.returncode}:\n{stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def pooled(runs: list[dict]) -> dict:  # type: ignore[type-arg]
    """One row from repeated runs of a config (see the module docstring); the runs are kept under "runs"."""
    done = [r for r in runs if "stopped" not in r]
    if len(done) < len(runs):
        return next(r for r in runs if "stopped" in r)
    if len(runs) == 1:
        return runs[0]
    round_s = statistics.median(w for r in runs for w in r["round_walls_s"][1:])
    plain_s = statistics.median(p for r in runs for p in r["plain_rounds_s"][1:])
    clone = statistics.median(r["clone_s"] for r in runs)
    fw = (round_s - plain_s) / runs[0]["cohort"]
    codec = {key: statistics.median(r["codec"][key] for r in runs) for key in runs[0]["codec"]}
    return {**runs[0], "round_s": round_s, "plain_s": plain_s, "ratio": round_s / plain_s,
            "fw_s_per_client_round": fw, "clone_s": clone, "clones": fw / clone,
            "codec": codec, "codec_ratio": codec_ratio(plain_s, runs[0]["cohort"], codec),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "runs": runs}  # fmt: skip


def fmt(x: float, digits: int = 1) -> str:
    return f"{x:,.{digits}f}" if math.isfinite(x) else "n/a"


def targets(row: dict) -> str:  # type: ignore[type-arg]
    notes = [f"clones<={TARGET_CLONES:g}: {'met' if row['clones'] <= TARGET_CLONES else 'MISSED'}"]
    if row["steps"] == 10:
        notes.append(f"x plain<={TARGET_RATIO_10:.2f}: {'met' if row['ratio'] <= TARGET_RATIO_10 else 'MISSED'}")
    if row["name"] in TARGET_RSS_MB:
        limit = TARGET_RSS_MB[row["name"]]
        notes.append(f"peak<={limit:,.0f} MB: {'met' if row['peak_rss_mb'] <= limit else 'MISSED'}")
    return "; ".join(notes)


HEADER = ("| config | steps | clients | plain ms | round ms | x plain | fw ms/cr | clones | codec ms/cr | codec x "
          "| peak MB | targets |")


def table_row(row: dict) -> str:  # type: ignore[type-arg]
    if "stopped" in row:
        return (f"| `{row['name']}` | {row['steps']} | {row['clients']} | stopped: {row['stopped']} "
                f"| | | | | | | > {fmt(row['peak_rss_mb'], 0)} | |")  # fmt: skip
    clients = f"{row['cohort']}/{row['clients']}" if row["cohort"] != row["clients"] else str(row["clients"])
    cells = [
        f"`{row['name']}`", str(row["steps"]), clients, fmt(row["plain_s"] * 1e3), fmt(row["round_s"] * 1e3),
        fmt(row["ratio"], 2), fmt(row["fw_s_per_client_round"] * 1e3), fmt(row["clones"]),
        fmt(row["codec"]["per_client_s"] * 1e3), fmt(row["codec_ratio"], 2), fmt(row["peak_rss_mb"], 0), targets(row),
    ]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def parse_model(text: str) -> dict[str, int]:
    dims = [int(v) for v in text.split(",")]
    if len(dims) != 4:
        raise SystemExit("--model takes four sizes: in_dim,h1,h2,classes")
    return dict(zip(("in_dim", "h1", "h2", "classes"), dims, strict=True))


def main(argv: list[str] | None = None) -> dict:  # type: ignore[type-arg]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--steps", default="2,10", help="local steps, comma-separated")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--examples", type=int, default=320, help="training examples per client")
    parser.add_argument("--model", default="1024,4096,1536,10", help="in_dim,h1,h2,classes")
    parser.add_argument("--quick", action="store_true", help="skip the memory-at-scale runs (20 and 1000 clients)")
    parser.add_argument("--scale", default=",".join(SCALE), help="memory-at-scale runs to do, comma-separated")
    parser.add_argument("--no-flower", action="store_true", help="skip the stock Flower (Ray) reference")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each config, in turns, pooled")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per subprocess")
    parser.add_argument("--rss-cap-mb", type=float, default=12000.0, help="stop a subprocess whose RSS goes over this")
    parser.add_argument("--out", default=str(HERE / "results" / "round.json"))
    args = parser.parse_args(argv)

    names = [c for c in args.configs.split(",") if c]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; valid: {', '.join(CONFIGS)}")
    steps = [int(s) for s in args.steps.split(",") if s]
    model = parse_model(args.model)
    scale = [] if args.quick else [s for s in args.scale.split(",") if s]
    for s in scale:
        if s not in SCALE:
            parser.error(f"unknown scale run {s!r}; valid: {', '.join(SCALE)}")

    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    base = {"model": model, "clients": args.clients, "examples": args.examples, "rounds": args.rounds}
    specs = [{**base, "name": name, "keys": CONFIGS[name], "steps": k} for k in steps for name in names]
    for name in scale:
        keys, clients, _, rounds, examples = SCALE[name]
        specs.append({**base, "name": name, "keys": keys, "steps": SCALE_STEPS, "clients": clients,
                      "examples": examples, "rounds": rounds or args.rounds})  # fmt: skip
    flower: list[dict] = []  # type: ignore[type-arg]
    runs: list[list[dict]] = [[] for _ in specs]  # type: ignore[type-arg]
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|")
    for repeat in range(args.repeats):
        for spec, done in zip(specs, runs, strict=True):
            done.append(run_sub("--worker", spec, args.timeout, args.rss_cap_mb))
            if repeat == args.repeats - 1:
                print(table_row(pooled(done)), flush=True)
    rows = [pooled(done) for done in runs]
    if not args.no_flower:
        for k in steps:
            spec = {**base, "name": "stock-flower", "steps": k}
            flower.append(run_sub("--flower-worker", spec, args.timeout, args.rss_cap_mb))
        print()
        print("| steps | stock Flower round ms | fedsqueeze identity round ms | in-process / stock | target |")
        print("|---|---:|---:|---:|---|")
        for ref in flower:
            if "stopped" in ref:
                print(f"| {ref['steps']} | stopped: {ref['stopped']} | | | |")
                continue
            same = [r for r in rows if r["name"] == "identity" and r["steps"] == ref["steps"] and "round_s" in r]
            ident = same[0] if same else None
            ratio = ident["round_s"] / ref["round_median_s"] if ident else math.nan
            mine = fmt(ident["round_s"] * 1e3) if ident else "n/a"
            verdict = "n/a" if not math.isfinite(ratio) else ("met" if ratio <= 1.0 else "MISSED")
            ref["inprocess_over_stock"] = ratio
            stock = fmt(ref["round_median_s"] * 1e3)
            print(f"| {ref['steps']} | {stock} | {mine} | {fmt(ratio, 2)} | <= 1.00: {verdict} |")

    import torch

    result = {
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()},
        "args": vars(args),
        "rows": rows,
        "stock_flower": flower,
    }
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in ("--worker", "--flower-worker"):
        sys.path[:0] = [str(HERE), str(ROOT)]
        fn = worker if sys.argv[1] == "--worker" else flower_worker
        print("RESULT " + json.dumps(fn(json.loads(sys.argv[2]))), flush=True)
    else:
        main()
