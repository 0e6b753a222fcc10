"""Reproduce, at small scale, the Scafflix experiment (Yi, Condat, Richtárik, arXiv 2305.13170, Fig. 1 style).

For each alpha, the FLIX objective f~(x) = (1/n) sum_i f_i(alpha x + (1 - alpha) x_i*) and its exact optimum
(Newton), then f~(x^t) - f~* against communication rounds for
- Scafflix: per-client gamma_i = 1/L_i (estimated locally), p = sqrt(min_i gamma_i mu), K ~ Geometric(p);
- FLIX-GD: one gradient step per round, stepsize 1/L~ with L~ = (1/n) sum_i alpha^2 L_i;
- FedAvg: local GD on the FLIX objective, K = round(1/p) steps per round at stepsize 1/(alpha^2 max_i L_i).
All three run through the float64 reference loop tests/reference/algorithms.py (the algorithms' own client
and server halves, full participation, no compression).

    .venv/bin/python simulations/scafflix/run.py [--config simulations/scafflix/config.toml] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from fedsqueeze.algorithms import build
from fedsqueeze.tasks import build_task

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from reference.algorithms import FlixObjective, local_optima, run  # noqa: E402 (the float64 reference)

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def main(argv: list[str] | None = None) -> int:
    here = Path(__file__).parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(here / "config.toml"))
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    conf = tomllib.loads(Path(args.config).read_text())
    t, r = conf["task"], conf["run"]
    rounds = args.rounds or int(r["rounds"])
    out = Path(args.out or r["out"])
    torch.set_num_threads(1)
    options = {k.replace("-", "_"): v for k, v in t.items() if k not in ("name", "num-clients", "partition", "seed")}
    task = build_task(t["name"], num_clients=t["num-clients"], partition=t["partition"], seed=t["seed"], **options)
    obj = task.objective
    x_stars = local_optima(obj)
    results: dict[str, dict[str, list[float]]] = {}
    for alpha in r["alphas"]:
        flix = FlixObjective(obj, [alpha] * obj.num_clients, x_stars)
        _, f_opt = flix.optimum()

        def measure(x, outs, flix=flix, f_opt=f_opt):
            return {"subopt": max(flix.f(x) - f_opt, 1e-16)}

        scafflix = build(f"scafflix(alpha={alpha})")
        scafflix.setup(task)
        k = max(1, round(1 / scafflix.p))
        runs = {
            "Scafflix": run(scafflix, task, rounds=rounds, lr=0.0, measure=measure),
            "FLIX-GD": run(build(f"flix(alpha={alpha})"), task, rounds=rounds, lr=1 / flix.L, measure=measure),
            f"FedAvg (K={k})": run(
                build(f"flix(alpha={alpha})"),
                task,
                rounds=rounds,
                lr=1 / (alpha * alpha * max(obj.L_i)),
                local_steps=k,
                measure=measure,
            ),
        }
        results[str(alpha)] = {name: tr.column("subopt") for name, tr in runs.items()}
        finals = {name: f"{v[-1]:.2e}" for name, v in results[str(alpha)].items()}
        print(f"alpha={alpha}: p={scafflix.p:.3f}; f~ - f~* after {rounds} rounds: {finals}", flush=True)
    plot(results, out)
    out.with_suffix(".json").write_text(json.dumps({"rounds": rounds, "subopt": results}) + "\n")
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0


def plot(results: dict[str, dict[str, list[float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(4 * len(results), 3.2), sharey=True)
    for ax, (alpha, curves) in zip(axes, results.items(), strict=True):
        for name, values in curves.items():
            ax.semilogy(range(1, len(values) + 1), values, label=name)
        ax.set_title(f"alpha = {alpha}")
        ax.set_xlabel("communication rounds")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("f~(x) - f~*")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    started = time.time()
    code = main()
    print(f"{time.time() - started:.0f} s", file=sys.stderr)
    sys.exit(code)
