"""Reproduce, at small scale, the Cohort-Squeeze experiment (Yi, Kharisov, Sokolov, Richtárik, arXiv 2406.01115).

L2 logistic regression over 100 heterogeneous clients (built in: scikit-learn's digits, 10 classes,
reg 0.01, two labels per client; or a LibSVM file). SPPM-AS (`sppm`, cg solver) with K communication
rounds per cohort, K in {1, 2, 4, 8, 16, 32}, three gamma, nice and stratified sampling (cohort 10;
stratified: 10 k-means clusters of the clients' gradients at x^0), against LocalGD (FedAvg with
full-batch local steps, nice sampling, the same cohort size; the best of a grid of local-step counts
and stepsizes). For each run: the total cost until f(x_t) - f* <= TARGET (f(x^0) - f*) at a cohort's
end, in the plain cost model (c1 = 1, c2 = 0: cost T K) and the hierarchical one (c1 = 0.1 per round
inside a cohort, c2 = 1 per round between cohorts, from the engine's total_cost column). LocalGD draws
a new cohort every round, so each of its rounds costs c1 + c2.

Why cg: the paper solves the prox with CG/BFGS in its convex runs. One gd step per round makes K
rounds no better than K rounds of cohort-switching gradient descent, so in the cost T K the best K
would be 1 by construction; cg's secant line searches extract more from each gradient of the cohort.

Runs drive the round engine directly (fedsqueeze.engine.run_round with LocalTransport: the same server
and client halves, compression and byte counting as a Flower run, without the Flower transport).

    python simulations/cohort/run.py [--libsvm a9a.txt] [--quick] [--out docs]
writes docs/cohort-squeeze.png, docs/cohort-squeeze.md and docs/cohort-squeeze.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from fedsqueeze.config import resolve
from fedsqueeze.engine import LocalTransport, Server, run_round

KS = (1, 2, 4, 8, 16, 32)
GAMMAS = (0.5, 4.0, 32.0)
SAMPLINGS = {"nice": "nice", "stratified": "stratified(clusters=10, by=gradients)"}
SOLVER = "cg"
C1, C2 = 0.1, 1.0  # hierarchical: a hub round is ten times cheaper than a server round
TARGET = 0.02  # f - f* relative to f(x0) - f*
BUDGET = 800  # plain cost (rounds) per run at most
LOCALGD = [(steps, lr) for steps in (1, 2, 4) for lr in (0.25, 0.5, 1.0, 1.5, 2.0, 3.0)]  # local steps x stepsize
STALL = 200  # a run whose best f - f* at a cohort's end has not improved for this many rounds has stalled
BUILTIN = ("digits-logreg(reg=0.01, test_fraction=0)", "shards(2)")
QUICK = {"ks": (1, 4), "gammas": (32.0,), "budget": 60, "localgd": [(1, 1.0)]}


def first_hit(server: Server, budget: int) -> dict[str, float] | None:
    """Run until a cohort ends at the target: its plain and hierarchical costs and cohorts (None: not
    within `budget` rounds, stalled, or diverged)."""
    transport = LocalTransport(server.cfg)
    objective, optimum = server.task.objective, server.task.optimum
    start = objective.f(server.plan.x0.double()) - optimum.f
    inner = getattr(server.algorithm, "inner", 1)
    lowest, since = math.inf, 0
    for r in range(1, budget + 1):
        row = run_round(server, transport, r)
        if not math.isfinite(row["subopt"]) or row["subopt"] > 1e6 * start:
            return None
        if row["inner_round"] != inner:
            continue
        if row["subopt"] <= TARGET * start:
            return {"plain": float(r), "hierarchical": round(row["total_cost"], 9), "cohorts": row["cohort"]}
        lowest, since = (row["subopt"], r) if row["subopt"] < lowest else (lowest, since)
        if r - since >= STALL:
            return None
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--libsvm", help="a LibSVM file (else scikit-learn's digits)")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--quick", action="store_true", help="two K, one gamma, one LocalGD setting (a smoke run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    task, partition = (f'libsvm-logreg(path="{args.libsvm}", reg=0.01, test_fraction=0)', "dirichlet(0.3)") \
        if args.libsvm else BUILTIN  # fmt: skip
    base = [f"task={task}", f"partition={partition}", "num-clients=100", "cohort-size=10", "batch-size=0",
            "target-accuracy=0", "out-dir=/tmp/cohort-squeeze", f"local-round-cost={C1}",
            f"global-round-cost={C2}", "local-steps=1"]  # fmt: skip
    grid = QUICK if args.quick else {"ks": KS, "gammas": GAMMAS, "budget": BUDGET, "localgd": LOCALGD}
    ks, gammas, budget = grid["ks"], grid["gammas"], grid["budget"]
    t0 = time.time()
    results: dict[str, Any] = {"task": task, "partition": partition, "solver": SOLVER, "target": TARGET,
                               "budget": budget, "c1": C1, "c2": C2, "ks": list(ks), "gammas": list(gammas),
                               "sppm": {}, "localgd": {}}  # fmt: skip
    for sampling, spec in SAMPLINGS.items():
        for gamma in gammas:
            for k in ks:
                cfg = resolve(overrides=[*base, f"algorithm=sppm(gamma={gamma}, inner={k}, solver={SOLVER})",
                                         f"sampling={spec}"])  # fmt: skip
                hit = first_hit(Server(cfg), budget)
                results["sppm"][f"{sampling} {gamma:g} {k}"] = hit
                print(f"sppm {sampling:10s} gamma={gamma:<5g} K={k:<3d} {hit}  ({time.time() - t0:.0f} s)", flush=True)
    for steps, lr in grid["localgd"]:  # tuned under nice sampling, then the best setting under stratified
        results["localgd"][f"{steps} {lr:g}"] = localgd(base, "nice", steps, lr, budget)
        print(f"localgd steps={steps:<3d} lr={lr:<5g} {results['localgd'][f'{steps} {lr:g}']}  "
              f"({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
    tuned = best(results["localgd"], "plain")
    if tuned:
        steps, lr = tuned[0].split()
        hit = localgd(base, SAMPLINGS["stratified"], int(steps), float(lr), budget)
        results["localgd_stratified"] = {tuned[0]: hit}
        print(f"localgd stratified steps={steps} lr={lr} {hit}", flush=True)
    results["seconds"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cohort-squeeze.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "cohort-squeeze.md").write_text(table(results))
    plot(results, out / "cohort-squeeze.png")
    print(f"wrote {out}/cohort-squeeze.{{png,md,json}} in {results['seconds']:.0f} s")
    return 0


def localgd(base: list[str], sampling: str, steps: int, lr: float, budget: int) -> dict[str, float] | None:
    """LocalGD: FedAvg with `steps` full-batch local steps of size `lr`, a new cohort every round."""
    cfg = resolve(overrides=[*base, "algorithm=fedavg", f"local-steps={steps}", f"lr={lr}", f"sampling={sampling}"])
    return first_hit(Server(cfg), budget)


def best(runs: dict[str, dict | None], model: str) -> tuple[str, float] | None:
    """The (key, cost) of the cheapest run that reached the target in a cost model."""
    hits = [(key, v[model]) for key, v in runs.items() if v is not None]
    return min(hits, key=lambda kv: kv[1]) if hits else None


def table(results: dict[str, Any]) -> str:
    ks, gammas, sppm = results["ks"], results["gammas"], results["sppm"]
    lines = [
        f"Total cost to reach f(x) - f* <= {results['target']:g} (f(x0) - f*): task `{results['task']}`, "
        f"partition `{results['partition']}`, 100 clients, cohort 10, SPPM-AS solver `{results['solver']}`.",
        f"Plain: c1 = 1, c2 = 0 (cost T K). Hierarchical: c1 = {results['c1']:g}, c2 = {results['c2']:g} "
        f"(cost T (c1 K + c2)). A dash: not reached within {results['budget']} rounds, or stalled "
        f"(no lower f - f* at a cohort's end for {STALL} rounds). "
        f"Written by `python simulations/cohort/run.py` in {results['seconds']:.0f} s.",
        "",
    ]
    for model in ("plain", "hierarchical"):
        lines += [f"### {model} cost model", "",
                  "| sampling | gamma | " + " | ".join(f"K={k}" for k in ks) + " | best K |",
                  "|---|---|" + "---:|" * (len(ks) + 1)]  # fmt: skip
        for sampling in SAMPLINGS:
            for gamma in gammas:
                row = {k: sppm[f"{sampling} {gamma:g} {k}"] for k in ks}
                cells = [f"{row[k][model]:g}" if row[k] else "-" for k in ks]
                hits = {k: v[model] for k, v in row.items() if v}
                lines.append(f"| {sampling} | {gamma:g} | " + " | ".join(cells)
                             + f" | {min(hits, key=hits.get) if hits else '-'} |")  # fmt: skip
        lines += [
            "",
            "| LocalGD (FedAvg, nice), local steps | "
            + " | ".join(f"lr={lr}" for lr in sorted({key.split()[1] for key in results["localgd"]}, key=float))
            + " |",
        ]
        lrs = sorted({key.split()[1] for key in results["localgd"]}, key=float)
        lines.append("|---|" + "---:|" * len(lrs))
        for steps in sorted({int(key.split()[0]) for key in results["localgd"]}):
            cells = []
            for lr in lrs:
                v = results["localgd"].get(f"{steps} {lr}")
                cells.append(f"{v[model]:g}" if v else "-")
            lines.append(f"| {steps} | " + " | ".join(cells) + " |")
        base = best(results["localgd"], model)
        strat = next(iter(results.get("localgd_stratified", {}).items()), None)
        lines.append("")
        if base:
            steps, lr = base[0].split()
            lines.append(f"- LocalGD, best of the grid (local steps {steps}, lr {lr}): **{base[1]:g}**.")
        if strat:
            steps, lr = strat[0].split()
            cost = f"{strat[1][model]:g}" if strat[1] else "not reached"
            lines.append(f"- LocalGD with stratified sampling at that setting: {cost}.")
        for sampling in SAMPLINGS:
            mine = best({k: v for k, v in sppm.items() if k.startswith(sampling + " ")}, model)
            if not mine:
                continue
            _, gamma, k = mine[0].split()
            against = [("LocalGD", base[1] if base else None)]
            if sampling == "stratified" and strat and strat[1]:
                against.append(("stratified LocalGD", strat[1][model]))
            said = "".join(f", {relative(mine[1], cost)} than {name}" for name, cost in against if cost)
            lines.append(f"- SPPM-AS {sampling}, best (gamma {gamma}, K = {k}): **{mine[1]:g}**{said}.")
        lines.append("")
    return "\n".join(lines)


def relative(cost: float, baseline: float) -> str:
    """'38.5 % lower' or '105.1 % higher'."""
    change = 100 * (1 - cost / baseline)
    return f"{change:.1f} % lower" if change >= 0 else f"{-change:.1f} % higher"


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks, gammas = results["ks"], results["gammas"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, model in zip(axes, ("plain", "hierarchical"), strict=True):
        for sampling, style in (("nice", "-o"), ("stratified", "--s")):
            for colour, gamma in zip(colours, gammas, strict=False):
                ys = [results["sppm"][f"{sampling} {gamma:g} {k}"] for k in ks]
                pts = [(k, y[model]) for k, y in zip(ks, ys, strict=True) if y]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, color=colour, label=f"{sampling}, gamma={gamma:g}")
        base = best(results["localgd"], model)
        if base:
            ax.axhline(base[1], color="k", lw=1, ls=":", label="LocalGD (best of grid)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.set_xlabel("K (communication rounds per cohort)")
        ax.set_ylabel(f"total cost to f - f* <= {results['target']:g} (f0 - f*)")
        costs = "c1=1, c2=0" if model == "plain" else f"c1={results['c1']:g}, c2={results['c2']:g}"
        ax.set_title(f"{model} cost model ({costs})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
