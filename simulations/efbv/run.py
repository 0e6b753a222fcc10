"""Reproduce, at small scale, the EF-BV comparison (Condat, Yi, Richtárik, NeurIPS 2022, Fig. 1 style):
||grad f(x)||^2 against the uplink bytes actually sent, for no feedback, classic EF, EF21, EF-BV and DIANA.

Setting (every *.toml in this directory is one curve, a full `fedsqueeze simulate` config):
- binary L2 logistic regression, Synthetic(1, 1) with 60 features (d = 61), reg = 1, 20 clients with
  their natural (heterogeneous) data; L = 19.32 exact, L_tilde = 47.2, max_i L_i = 158.9;
- gradient mode: every round each client sends one compressed full-batch gradient (or the mechanism's
  quantity) and the server steps x <- x - lr g; all clients every round; exact float32 downlink;
- compressors with about the same bytes per client and round (2 values and their indices, about 38 bytes):
  top-2 for none / EF / EF21; comp-(2,32) (top-32, then 2 of those at random, scaled by 16: eta = 0.69,
  omega = 15, not contractive) for EF-BV; DIANA with scaled rand-2 (unbiased, omega = 29.5);
- EF-BV with its theory parameters lam* = 0.0206, nu* = 0.367 (omega_av = omega / 20); "EF21 on lam*C"
  is EF-BV with nu = lam = lam*, the paper's EF21 baseline for a non-contractive compressor (EF21 itself
  needs one); GD uncompressed (80 rounds, the same byte budget) as the reference.

Stepsize: one common lr = 1/L = 0.05175 for every curve, so that the curves differ by the mechanism
alone. The theory stepsizes (`lr = "theory"`) are 3.5e-4 for EF21, 3.6e-5 for EF-BV, 3.4e-5 for EF21
on lam*C and 5.3e-3 for DIANA: 146, 1437, 1517 and 10 times smaller than 1/L (r(lam*) is close to 1,
so s* is tiny, and L_tilde = 2.4 L on these heterogeneous clients); with them nothing would move within
the rounds this small run can afford, and with n = 20 EF-BV's theory step is only 5 % above that of
EF21 on lam*C (omega_av = 0.75 is not small; the paper ran n = 1000 and 8124). Classic EF
and top-2 without feedback have no theory rule. Sensitivity (float64 driver
the float64 reference `tests/reference/gradient_mode.py`, 500 rounds, lr in {1/8, 1/4, 1/2, 1, 2}/L, final
||grad f||^2): EF-BV 3e-5, 4e-6, 8e-7, 4e-8, 4e-8; EF21 on lam*C 3e-4, 2e-3, 5e-4, 9e-3, 8e-3;
classic EF 2e-3, 4e-2, 5e-2, 0.13, 0.6; DIANA 9e-5, 8e-7, 3e-7, 6e-6, 0.6 (unstable at 2/L); EF21
top-2 and GD reach the float precision floor at 1/L and 2/L; no feedback stalls near 1 at every lr.
So EF-BV stays 1 to 5 orders of magnitude below EF21 on lam*C at every common lr tried; classic EF and DIANA would
look better at smaller steps (1/(8L), 1/(2L)) than at 1/L.

    .venv/bin/python simulations/efbv/run.py [--rounds N] [--out-dir runs/efbv] [--docs docs]

writes the runs and the full report to runs/efbv/ (not committed), then docs/efbv-grad-vs-bytes.png
and docs/efbv-comparison.md (a run with --rounds writes docs only when --docs is given). About 4 to 5
minutes on 2 cores (3.7 min on an idle machine). One curve alone:

    .venv/bin/fedsqueeze simulate --config simulations/efbv/<file>.toml   (into runs/efbv/<name>/)
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from fedsqueeze.config import resolve
from fedsqueeze.simulation.runner import preflight, simulate
from fedsqueeze.tracking.report import comparison_rows, plot_runs, render_markdown
from fedsqueeze.tracking.rundir import load_run

HERE = Path(__file__).parent
#: legend labels (run names must be plain directory names: no spaces, parentheses or commas)
LABELS = {
    "none_top-2": "no feedback, top-2",
    "EF_top-2": "EF (classic), top-2",
    "EF21_top-2": "EF21, top-2",
    "EF-BV_comp-2-32": "EF-BV, comp-(2,32)",
    "EF21_lamC_comp-2-32": "EF21 on lam*C, comp-(2,32)",
    "DIANA_rand-2": "DIANA, rand-2",
    "GD_uncompressed": "GD, uncompressed",
}
PLOT = "grad_norm_sq_vs_uplink.png"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, help="at most this many rounds per curve (default: each config's)")
    ap.add_argument("--out-dir", default="runs/efbv", help="scratch directory for the runs and the report")
    ap.add_argument("--docs", help="where the figure and table go (default: docs, or none with --rounds)")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    docs = Path(args.docs) if args.docs else (None if args.rounds else Path("docs"))

    configs = sorted(HERE.glob("*.toml"))
    cfgs = []
    for path in configs:  # every config checked before anything runs
        base = resolve(path)
        overrides = [f"out-dir={out}"]
        if args.rounds:
            overrides.append(f"rounds={min(args.rounds, base.rounds)}")
        cfg = resolve(path, overrides)
        preflight(cfg)
        cfgs.append((path, cfg))

    run_dirs = []
    for path, cfg in cfgs:
        shutil.rmtree(out / cfg.name, ignore_errors=True)  # this curve's previous run, not a name-2 next to it
        started = time.perf_counter()
        result = simulate(cfg)
        last = result.rows[-1]
        steady = result.rows[-1]["uplink_bytes"]
        print(
            f"{LABELS.get(cfg.name, cfg.name):28s} {path.name:26s} {len(result.rows):4d} rounds  "
            f"||grad f||^2 = {last['grad_norm_sq']:.3e}  uplink {last['cum_uplink_bytes']:8d} bytes "
            f"({steady} per round)  {time.perf_counter() - started:5.1f} s",
            flush=True,
        )
        run_dirs.append(result.run_dir)

    runs = [load_run(d) for d in run_dirs]
    for run in runs:  # the legend and the table show the labels
        run.config = {**run.config, "name": LABELS.get(run.name, run.name)}
    report_dir = out / "report"
    plot_runs(runs, report_dir)
    rows = comparison_rows(runs)
    table = render_markdown(rows)
    budget = min(int(r.rows[-1]["cum_uplink_bytes"]) for r in runs)
    lines = [
        f"| curve | config | rounds | uplink bytes | final ‖∇f‖² | best ‖∇f‖² within {budget} bytes |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for (path, _cfg), run in zip(cfgs, runs, strict=True):
        # n/a: the first round alone (uncompressed under init=full) sent more than the budget
        within = [r["grad_norm_sq"] for r in run.rows if int(r["cum_uplink_bytes"]) <= budget]
        lines.append(
            f"| {run.name} | `{path.name}` | {len(run.rows)} | {int(run.rows[-1]['cum_uplink_bytes'])} | "
            f"{run.rows[-1]['grad_norm_sq']:.3e} | {f'{min(within):.3e}' if within else 'n/a'} |"
        )
    equal_bytes = "\n".join(lines) + "\n"
    (report_dir / "comparison.md").write_text(table, encoding="utf-8")
    (report_dir / "equal-bytes.md").write_text(equal_bytes, encoding="utf-8")
    print(f"\nbest ||grad f||^2 within {budget} uplink bytes (the smallest total of all curves):\n{equal_bytes}")
    print(f"report: {report_dir}")

    if docs is not None:
        docs.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(report_dir / PLOT, docs / "efbv-grad-vs-bytes.png")
        (docs / "efbv-comparison.md").write_text(
            "# EF-BV comparison: ||grad f||^2 against uplink bytes\n\n"
            "Written by `.venv/bin/python simulations/efbv/run.py` (settings in its docstring and in\n"
            "`simulations/efbv/*.toml`): L2 logistic regression, Synthetic(1, 1), d = 61, 20 heterogeneous\n"
            "clients, gradient mode, lr = 1/L for every curve. Figure: `docs/efbv-grad-vs-bytes.png`.\n"
            "Bytes are the real payload sizes on the wire (values, indices and headers).\n\n"
            f"{equal_bytes}\n"
            "The report's table (`fedsqueeze report`; the accuracy columns are the test accuracy of the\n"
            "logistic model):\n\n"
            f"{table}",
            encoding="utf-8",
        )
        print(f"wrote {docs / 'efbv-grad-vs-bytes.png'} and {docs / 'efbv-comparison.md'}")
    return 0


if __name__ == "__main__":
    started = time.time()
    code = main()
    print(f"{time.time() - started:.0f} s", file=sys.stderr)
    sys.exit(code)
