"""Reproduce, at small scale, the Cohort-Squeeze experiment (Yi, Kharisov, Sokolov, Richtárik, arXiv 2406.01115).

L2 logistic regression over 100 heterogeneous clients; SPPM-AS (`sppm`, gd solver) with K local
communication rounds per cohort, K in {1, 2, 4, 8, 16, 32}, three gamma, nice and stratified sampling
(cohort 10; stratified: 10 k-means clusters of the clients' gradients at x^0), against LocalGD (FedAvg
with full-batch local steps, the same cohort, the best of a few local-step counts and stepsizes). For
each run: the total cost until f(x_t) - f* <= target (f(x_0) - f*) at a cohort's end, in the plain
cost model (c1 = 1, c2 = 0: cost T K) and the hierarchical one (c1 = 0.1 per round inside a cohort,
c2 = 1 per round between cohorts, read from the engine's total_cost column).

Runs drive the round engine directly (fedsqueeze.engine.run_round with LocalTransport: the same server
and client halves, compression and byte counting as a Flower run, without the Flower transport).

    .venv/bin/python simulations/cohort/run.py [--libsvm a9a.txt] [--quick]
writes docs/cohort-squeeze.png and docs/cohort-squeeze.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from fedsqueeze.config import resolve
from fedsqueeze.engine import LocalTransport, Server, run_round

KS = (1, 2, 4, 8, 16, 32)
GAMMAS = (0.5, 2.0, 8.0)
SAMPLINGS = {"nice": "nice", "stratified": "stratified(clusters=10, by=gradients)"}
C1, C2 = 0.1, 1.0  # hierarchical: a hub round is ten times cheaper than a server round
TARGET = 0.1  # f - f* relative to f(x0) - f*
BUDGET = 500  # plain cost (rounds) per run at most
BUILTIN = ("synthetic-logreg(num_features=20, num_classes=2, alpha=0.2, beta=0.2, reg=0.1, min_samples=50, "
           "max_samples=50)")


def first_hit(server, rounds: int, inner: int) -> dict[str, float] | None:
    """Run until a cohort ends at the target; its plain and hierarchical costs (None: not within budget)."""
    transport = LocalTransport(server.cfg)
    start = None
    for r in range(1, rounds + 1):
        row = run_round(server, transport, r)
        if start is None:  # f(x0) - f*
            start = server.task.objective.f(server.plan.x0.double()) - server.task.optimum.f
        if row["inner_round"] == inner and row["subopt"] <= TARGET * start:
            return {"plain": float(r), "hierarchical": row["total_cost"], "cohorts": row["cohort"]}
        if not math.isfinite(row["subopt"]) or row["subopt"] > 1e6 * start:
            return None
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--libsvm", help="a LibSVM file (else a built-in synthetic task)")
    ap.add_argument("--out", default="docs")
    ap.add_argument("--quick", action="store_true", help="fewer settings (a smoke run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    task = f'libsvm-logreg(path="{args.libsvm}", reg=0.05)' if args.libsvm else BUILTIN
    partition = "dirichlet(0.3)" if args.libsvm else "natural"
    base = [f"task={task}", f"partition={partition}", "num-clients=100", "cohort-size=10", "batch-size=0",
            "target-accuracy=0", "out-dir=/tmp/cohort-squeeze", f"local-round-cost={C1}",
            f"global-round-cost={C2}", "local-steps=1"]  # fmt: skip
    ks, gammas = (KS[::2], GAMMAS[1:]) if args.quick else (KS, GAMMAS)
    t0 = time.time()
    results: dict[str, dict] = {"sppm": {}, "localgd": {}}
    for sampling, spec in SAMPLINGS.items():
        for gamma in gammas:
            for k in ks:
                cfg = resolve(overrides=[*base, f"algorithm=sppm(gamma={gamma}, inner={k}, solver=gd)",
                                         f"sampling={spec}"])  # fmt: skip
                hit = first_hit(Server(cfg), BUDGET, k)
                results["sppm"][f"{sampling} {gamma:g} {k}"] = hit
                print(f"sppm {sampling:10s} gamma={gamma:<5g} K={k:<3d} {hit}  ({time.time() - t0:.0f} s)", flush=True)
    for steps in (1, 5):
        for lr in (0.05, 0.2):
            cfg = resolve(overrides=[*base, "algorithm=fedavg", f"local-steps={steps}", f"lr={lr}"])
            hit = first_hit(Server(cfg), BUDGET, 1)
            results["localgd"][f"{steps} {lr:g}"] = hit
            print(f"localgd steps={steps:<3d} lr={lr:<5g} {hit}  ({time.time() - t0:.0f} s)", flush=True)
    results["seconds"] = time.time() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "cohort-squeeze.json").write_text(json.dumps(results, indent=1) + "\n")
    write_table(results, ks, gammas, out / "cohort-squeeze.md", task)
    plot(results, ks, gammas, out / "cohort-squeeze.png")
    print(f"wrote {out}/cohort-squeeze.{{png,md,json}} in {results['seconds']:.0f} s")
    return 0


def _best(values: dict, model: str) -> tuple[str, float] | None:
    hits = [(key, v[model]) for key, v in values.items() if v is not None]
    return min(hits, key=lambda kv: kv[1]) if hits else None


def write_table(results: dict, ks, gammas, path: Path, task: str) -> None:
    lines = [f"Total cost to reach f(x) - f* <= {TARGET} (f(x0) - f*) (task `{task}`, 100 clients, cohort 10).",
             f"Plain: c1 = 1, c2 = 0 (cost = T K). Hierarchical: c1 = {C1}, c2 = {C2} (cost = T (c1 K + c2)).",
             "A dash: not reached within the budget of " f"{BUDGET} rounds.", ""]  # fmt: skip
    for model in ("plain", "hierarchical"):
        lines += [f"### {model}", "", "| sampling | gamma | " + " | ".join(f"K={k}" for k in ks) + " | best K |",
                  "|---|---|" + "---|" * (len(ks) + 1)]  # fmt: skip
        for sampling in SAMPLINGS:
            for gamma in gammas:
                row = {k: results["sppm"][f"{sampling} {gamma:g} {k}"] for k in ks}
                cells = [f"{row[k][model]:g}" if row[k] else "-" for k in ks]
                hits = {k: v[model] for k, v in row.items() if v}
                best = min(hits, key=hits.get) if hits else "-"
                lines.append(f"| {sampling} | {gamma:g} | " + " | ".join(cells) + f" | {best} |")
        base = _best(results["localgd"], model)
        sppm = _best(results["sppm"], model)
        lines.append("")
        if base:
            lines.append(f"LocalGD (FedAvg, best of local steps x lr = {base[0]}): {base[1]:g}.")
        if base and sppm:
            saving = 100 * (1 - sppm[1] / base[1])
            lines.append(f"Best SPPM-AS ({sppm[0]}): {sppm[1]:g}, {saving:.1f} % lower than LocalGD.")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


def plot(results: dict, ks, gammas, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, model in zip(axes, ("plain", "hierarchical"), strict=True):
        for sampling, style in (("nice", "-o"), ("stratified", "--s")):
            for gamma in gammas:
                ys = [results["sppm"][f"{sampling} {gamma:g} {k}"] for k in ks]
                pts = [(k, y[model]) for k, y in zip(ks, ys, strict=True) if y]
                if pts:
                    ax.plot([k for k, _ in pts], [y for _, y in pts], style, label=f"{sampling}, gamma={gamma:g}")
        base = _best(results["localgd"], model)
        if base:
            ax.axhline(base[1], color="k", lw=1, ls=":", label="LocalGD (best)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("K (communication rounds per cohort)")
        ax.set_ylabel("total cost to target")
        ax.set_title(f"{model} cost model")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
