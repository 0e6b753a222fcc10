"""The `fedsqueeze` command.

    fedsqueeze simulate [--config FILE] [--set key=value ...] [--backend inprocess|ray] [--resume RUN_DIR]
    fedsqueeze report RUN_DIR [RUN_DIR ...] [--out DIR] [--target-accuracy A]
    fedsqueeze demo [--out-dir DIR] [--backend inprocess|ray]
    fedsqueeze keys DIR --nodes N [--san HOST_OR_IP ...] [--force]
    fedsqueeze prune RUN_DIR --method magnitude|wanda|ria|symwanda [--sparsity S] [--nm N:M] [--int8]

`simulate` shows a progress bar per round (test accuracy, cumulative uplink MB); Ctrl-C (SIGINT)
stops the run cleanly and keeps every round already written to the run directory (exit code 130),
also when the command was started with SIGINT ignored (a background job of a script); `--resume RUN_DIR`
goes on with it (or with a run that was killed) from its last complete round. Configuration errors
are reported before anything starts (exit code 2).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130

#: the default comparison of `fedsqueeze demo` (and `make demo`): name -> uplink compressor
DEMO_RUNS = {
    "uncompressed": "identity",
    "topk-10pct": "topk(0.1)",
    "topk-1pct": "topk(0.01)",
    "qsgd-4": "qsgd(levels=4)",
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    _setup_logging(args.verbose)
    if os.getcwd() not in sys.path and "" not in sys.path:
        # as `python -m` does: a user's task module in the working directory is importable
        sys.path.insert(0, os.getcwd())
    return int(args.func(args))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsqueeze", description="Federated compressed training on Flower.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every round and client event")
    sub = parser.add_subparsers(dest="command")

    sim = sub.add_parser("simulate", help="run one federated training simulation")
    sim.add_argument("--config", "-c", metavar="FILE", help="TOML file with config keys (see README)")
    sim.add_argument(
        "--set", "-s", dest="overrides", metavar="KEY=VALUE", action="append", default=[], help="override one key"
    )
    sim.add_argument("--backend", choices=("inprocess", "ray"), default="inprocess", help="simulation backend")
    sim.add_argument(
        "--resume", metavar="RUN_DIR", help="go on with an interrupted run from its last complete round"
    )
    sim.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    sim.set_defaults(func=cmd_simulate)

    rep = sub.add_parser("report", help="plots and a comparison table for run directories")
    rep.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    rep.add_argument("--out", "-o", metavar="DIR", help="where to write (default: the run dir, or <parent>/report)")
    rep.add_argument("--target-accuracy", type=float, default=None, help="accuracy for 'MB to target'")
    rep.set_defaults(func=cmd_report)

    demo = sub.add_parser("demo", help="the default comparison: uncompressed vs top-k vs qsgd, then its report")
    demo.add_argument("--out-dir", default="runs/demo", metavar="DIR")
    demo.add_argument("--set", "-s", dest="overrides", metavar="KEY=VALUE", action="append", default=[])
    demo.add_argument("--backend", choices=("inprocess", "ray"), default="inprocess")
    demo.add_argument("--quiet", "-q", action="store_true")
    demo.set_defaults(func=cmd_demo)

    keys = sub.add_parser("keys", help="TLS certificates and SuperNode key pairs for a deployment (docs/deploy.md)")
    keys.add_argument("directory", metavar="DIR")
    keys.add_argument("--nodes", "-n", type=int, required=True, help="how many SuperNode key pairs")
    keys.add_argument(
        "--san", action="append", default=[], metavar="HOST_OR_IP", help="server certificate name (repeatable)"
    )
    keys.add_argument("--force", action="store_true", help="replace existing files")
    keys.set_defaults(func=cmd_keys)
    prune_cmd = sub.add_parser("prune", help="prune a finished run's model, calibrated on the clients' data")
    _prune_arguments(prune_cmd)
    prune_cmd.set_defaults(func=cmd_prune)
    return parser


def _setup_logging(verbose: bool) -> None:
    from rich.logging import RichHandler

    handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
    logger = logging.getLogger("fedsqueeze")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    logger.propagate = False


def _console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


# ---- simulate ------------------------------------------------------------------------------------


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedsqueeze.config import ConfigError, resolve
    from fedsqueeze.simulation.runner import preflight

    console = _console()
    try:
        cfg = _resumed(args) if args.resume else resolve(args.config, args.overrides)
        preflight(cfg)  # a missing data file, bad task option or unmatched rule fails here, before anything starts
    except ConfigError as exc:
        console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        return EXIT_CONFIG
    return _run_one(cfg, args.backend, console, quiet=args.quiet)[0]


def _resumed(args: argparse.Namespace) -> Any:
    """The config of `--resume RUN_DIR`: the run's own config.toml, with any --config and --set on top
    (which must not change it: preflight names the keys that differ)."""
    from fedsqueeze.config import ConfigError, build, parse_overrides, read_toml
    from fedsqueeze.tracking.rundir import CONFIG_FILE

    stored = Path(args.resume) / CONFIG_FILE
    if not stored.is_file():
        raise ConfigError("resume", args.resume, f"not a run directory: it has no {CONFIG_FILE}")
    values = read_toml(stored)
    if args.config:
        values.update(read_toml(args.config))
    values.update(parse_overrides(args.overrides))
    values["resume"] = str(args.resume)
    return build(values)


def _run_one(cfg: Any, backend: str, console: Any, quiet: bool = False) -> tuple[int, Path | None]:
    """Run one config with a progress bar; (exit code, run directory)."""
    from fedsqueeze.simulation.runner import FLOWER_LOG, simulate

    progress = _RoundProgress(console, cfg.name, cfg.rounds, quiet=quiet)
    try:
        with _sigint_interrupts(), progress:
            result = simulate(cfg, backend=backend, observer=progress.observe)
    except KeyboardInterrupt:
        from fedsqueeze.tracking import read_metrics

        where = Path(progress.run_dir or Path(cfg.out_dir) / cfg.name)
        kept = len(read_metrics(where / "metrics.jsonl"))
        console.print(f"[yellow]interrupted[/yellow]: kept {kept} round(s) in {where}", highlight=False)
        return EXIT_INTERRUPTED, None
    summary = result.summary
    final = summary.get("final", {})
    acc = final.get("test_accuracy")
    up = summary.get("totals", {}).get("uplink_bytes", 0) / 1e6
    to_target = summary.get("bytes_to_target")
    line = f"{cfg.name}: {summary.get('rounds')} rounds, "
    line += f"test accuracy {acc:.4f}, " if isinstance(acc, (int, float)) else ""
    line += f"uplink {up:.3f} MB"
    if cfg.target_accuracy:
        line += (
            f", {to_target / 1e6:.3f} MB to {cfg.target_accuracy:g}"
            if to_target is not None
            else f", target {cfg.target_accuracy:g} not reached"
        )
    failed = summary.get("totals", {}).get("clients_failed", 0)
    if failed:
        line += f", {failed} failed client replies"
        if (result.run_dir / FLOWER_LOG).exists():
            line += f" (which and why: {result.run_dir / FLOWER_LOG})"
    console.print(line, highlight=False)
    console.print(f"run directory: {result.run_dir}", highlight=False)
    return 0, result.run_dir


@contextmanager
def _sigint_interrupts() -> Iterator[None]:
    """SIGINT raises KeyboardInterrupt in here, whatever disposition this process inherited.

    Python installs its KeyboardInterrupt handler only when SIGINT is at its default at start-up. A
    command a non-interactive shell starts in the background (`make test &`, `cmd &` in a script or a
    CI step) inherits SIGINT *ignored*, and so does every process that one starts: such a run used to
    go on to its last round after a SIGINT and exit 0. A run's SIGINT is its clean stop (rows kept,
    summary "interrupted", every process it started stopped), so it is honoured here in any case.
    """
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread; leave the process's as they are
        return
    previous = signal.getsignal(signal.SIGINT)
    replace = previous in (signal.SIG_IGN, signal.SIG_DFL)  # not a handler of Python code or of C
    if replace:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if replace:
            signal.signal(signal.SIGINT, previous)


class _RoundProgress:
    """A rich progress bar fed by the runner's observer events."""

    def __init__(self, console: Any, name: str, rounds: int, quiet: bool = False) -> None:
        self.console = console
        self.name = name
        self.rounds = rounds
        self.quiet = quiet
        self.run_dir: str | None = None
        self.rounds_done = 0
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> _RoundProgress:
        if not self.quiet:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("acc {task.fields[acc]}"),
                TextColumn("up {task.fields[up]} MB"),
                TextColumn("{task.fields[note]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.name, total=self.rounds, acc="-", up="0.000", note="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)

    def observe(self, event: str, data: dict[str, Any]) -> None:
        if event == "start":
            self.run_dir = data.get("run_dir")
        elif event == "round":
            self.rounds_done = int(data.get("round", self.rounds_done + 1))
            if self._progress is not None:
                acc = data.get("test_accuracy")
                failed = int(data.get("clients_failed") or 0)
                self._progress.update(
                    self._task,
                    completed=self.rounds_done,
                    acc=f"{acc:.3f}" if isinstance(acc, (int, float)) else "-",
                    up=f"{(data.get('cum_uplink_bytes') or 0) / 1e6:.3f}",
                    note=f"[yellow]{failed} failed[/yellow]" if failed else "",
                )


# ---- report --------------------------------------------------------------------------------------


def cmd_report(args: argparse.Namespace) -> int:
    from fedsqueeze.tracking import TrackingError, report

    console = _console()
    dirs = [Path(d) for d in args.run_dirs]
    out = Path(args.out) if args.out else _default_report_dir(dirs)
    try:
        rep = report(dirs, out, target_accuracy=args.target_accuracy)
    except TrackingError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return EXIT_CONFIG
    _print_report(rep, out)
    return 0


def _default_report_dir(dirs: Sequence[Path]) -> Path:
    if len(dirs) == 1:
        return dirs[0]
    parents = {d.resolve().parent for d in dirs}
    return (parents.pop() if len(parents) == 1 else Path.cwd()) / "report"


def _print_report(rep: Any, out: Path) -> None:
    from rich.console import Console

    console = Console()
    console.print(rep.rich_table())
    for plot in getattr(rep, "plots", []) or []:
        console.print(f"plot: {plot}", highlight=False)
    console.print(f"table: {out / 'comparison.md'}", highlight=False)


# ---- demo ----------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    """digits MLP, 20 clients, Dirichlet(0.3): uncompressed vs top-k vs qsgd, then the report."""
    from fedsqueeze.config import ConfigError, resolve
    from fedsqueeze.simulation.runner import preflight
    from fedsqueeze.tracking import report

    console = _console()
    dirs = []
    for name, spec in DEMO_RUNS.items():
        try:
            cfg = resolve(overrides=[f"name={name}", f"compressor={spec}", f"out-dir={args.out_dir}", *args.overrides])
            preflight(cfg)
        except ConfigError as exc:
            console.print(f"[red]error:[/red] {exc}", highlight=False)
            return EXIT_CONFIG
        code, run_dir = _run_one(cfg, args.backend, console, quiet=args.quiet)
        if code or run_dir is None:
            return code
        dirs.append(run_dir)  # a new directory each time (name-2, ...): earlier runs are kept
    out = Path(args.out_dir) / "report"
    _print_report(report(dirs, out), out)
    return 0


# ---- keys ----------------------------------------------------------------------------------------


def cmd_keys(args: argparse.Namespace) -> int:
    from fedsqueeze.deploy.credentials import DEFAULT_SANS, CredentialsError, make_credentials

    console = _console()
    try:
        creds = make_credentials(args.directory, args.nodes, sans=args.san or DEFAULT_SANS, force=args.force)
    except CredentialsError as exc:
        console.print(f"[red]error:[/red] {exc}", highlight=False)
        return EXIT_CONFIG
    console.print(f"CA: {creds.ca_cert}; server: {creds.server_cert}, {creds.server_key}", highlight=False)
    for i, key in enumerate(creds.node_keys):
        console.print(f"node {i + 1}: {key} (register {creds.public_key(i)})", highlight=False)
    return 0


# ---- prune ---------------------------------------------------------------------------------------


def _prune_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run (config.toml and model.pt)")
    p.add_argument("--method", "-m", required=True, choices=("magnitude", "wanda", "ria", "symwanda"))
    p.add_argument("--sparsity", type=float, default=None, help="fraction of weights to zero, in [0, 1) (default 0.5)")
    p.add_argument("--nm", metavar="N:M", help="keep N of every M consecutive weights of a row, e.g. 2:4")
    p.add_argument(
        "--group", choices=("row", "layer"), help="comparison group (default: wanda/symwanda row, else layer)"
    )
    p.add_argument(
        "--calibration-rounds",
        default="1",
        metavar="K",
        help="1: all statistics on the dense model; K: K sequential exchanges; per-layer: one per layer",
    )
    p.add_argument("--calibration-samples", type=int, default=0, metavar="N", help="examples per client (0: all)")
    p.add_argument("--int8", action="store_true", help="also write and evaluate int8 per-row weights")
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB", help="layer names to keep dense")
    p.add_argument("--out", "-o", metavar="DIR", help="where to write (default RUN_DIR/pruned-...)")


def cmd_prune(args: argparse.Namespace) -> int:
    from fedsqueeze.pruning import PruneError, PruneSpec, parse_nm
    from fedsqueeze.simulation.prune import run_prune

    console = _console()
    try:
        nm = parse_nm(args.nm) if args.nm else None
        sparsity = args.sparsity if args.sparsity is not None else (nm.sparsity if nm else 0.5)
        rounds_arg = str(args.calibration_rounds).strip()
        if rounds_arg == "per-layer":
            rounds = 0
        elif rounds_arg.isdigit() and int(rounds_arg) >= 1:
            rounds = int(rounds_arg)
        else:
            raise PruneError(f"--calibration-rounds must be a positive integer or 'per-layer', got {rounds_arg!r}")
        if args.calibration_samples < 0:
            raise PruneError(f"--calibration-samples must be >= 0, got {args.calibration_samples}")
        spec = PruneSpec(args.method, sparsity, nm, args.group, rounds, tuple(args.exclude))
        rep = run_prune(args.run_dir, spec, int8=args.int8, out=args.out, max_examples=args.calibration_samples)
    except PruneError as exc:
        console.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        return EXIT_CONFIG
    _print_prune(rep)
    return 0


def _print_prune(rep: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    acc = rep["accuracy"]
    columns = [("dense", acc["before"]), ("pruned", acc["after"])]
    if "after_int8" in acc:
        columns.append(("pruned int8", acc["after_int8"]))
    table = Table(title=f"{rep['spec']['method']}: {rep['sparsity']:.1%} of the prunable weights zeroed")
    table.add_column("test split")
    for name, _ in columns:
        table.add_column(name, justify="right")
    table.add_row("global", *(f"{a['global']:.4f}" for _, a in columns))
    for i in range(len(acc["before"]["clients"])):
        table.add_row(f"client {i}", *(_fmt_acc(a["clients"][i]) for _, a in columns))
    console.print(table)
    for layer in rep["layers"]:
        if layer["pattern"].startswith("dense"):
            console.print(f"left dense: {layer['name']} {layer['pattern'].removeprefix('dense ')}", highlight=False)
    size = rep["size"]
    line = f"model: dense {size['dense_bytes']:,} B, packed {size['packed_bytes']:,} B"
    if "packed_int8_bytes" in size:
        line += f", packed int8 {size['packed_int8_bytes']:,} B"
    console.print(line, highlight=False)
    cal = rep["calibration"]
    console.print(
        f"calibration: {cal['rounds']} exchange(s), uplink {cal['uplink_bytes']:,} B, "
        f"downlink {cal['downlink_bytes']:,} B",
        highlight=False,
    )
    console.print(f"written to {rep['out']}", highlight=False)


def _fmt_acc(a: float | None) -> str:
    return "-" if a is None else f"{a:.4f}"


if __name__ == "__main__":
    sys.exit(main())
