"""The runner behind `fedsqueeze simulate`: one config, two backends, the same ServerApp and ClientApp.

- `inprocess`: `InProcessGrid` calls `fedsqueeze.client.app:app` for each message in this process
  (fast, deterministic; what most tests use).
- `ray`: Flower's simulation engine. The runner starts its own SuperLink (`flower-superlink
  --simulation`, 127.0.0.1, free ports, a private FLWR_HOME), submits the app with `flwr run` and the
  resolved config as the app's `[tool.flwr.app.config]`, follows metrics.jsonl for progress, and
  stops every process it started (the SuperLink's tree, and what left it) when the run ends, fails
  or is interrupted. If the runner itself dies (even by SIGKILL), its children get SIGTERM
  (parent-death signal) and a watchdog process stops everything below them, Ray's daemons and
  workers included, and removes the temporary FLWR_HOME and Ray's temporary folder
  (`fedsqueeze.reaper`).

Both write the same run directory (`out-dir/name/`); same config and seed give the same metrics.
With `checkpoint` on (the default) the clients' state lives in files between their rounds, under
`state-dir` or else the run directory's `clients/` (removed when the run completes), so that
`resume = RUN_DIR` can go on after a crash from the server's checkpoint (fedsqueeze.engine.checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsqueeze.config import Config
from fedsqueeze.reaper import Family, Watchdog, child_options

log = logging.getLogger(__name__)

Observer = Callable[[str, dict[str, Any]], None]
BACKENDS = ("inprocess", "ray")


@dataclass
class SimulationResult:
    run_dir: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    #: backend timings: wall seconds, and (in-process) seconds inside ClientApp calls
    timings: dict[str, float]


def preflight(cfg: Config) -> None:
    """Everything that can fail before a run starts: the task (data files, options), the model, the
    compression plans (rules that match no parameter, operators that reject the layout), the feedback
    mechanisms, `lr = "theory"` (compressor constants, a stepsize rule) and a resume. Raises ConfigError."""
    from fedsqueeze.engine import checkpoint
    from fedsqueeze.engine.plan import plan_for

    plan_for(cfg)
    if cfg.resume:
        checkpoint.check(cfg)  # its own config, a checkpoint, rounds left


def simulate(
    cfg: Config, backend: str = "inprocess", observer: Observer | None = None, **options: Any
) -> SimulationResult:
    """Run `cfg` on a backend ("inprocess" or "ray"); `observer(event, data)` sees start/round/finish."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    cfg = placed(cfg)
    if cfg.resume:
        from fedsqueeze.engine import checkpoint
        from fedsqueeze.tracking import RunDir

        run_dir = RunDir(cfg.resume)
        checkpoint.check(cfg)
        with checkpoint.locked(run_dir):  # before anything starts: rows of a round that did not complete go
            checkpoint.rewind(run_dir, checkpoint.check(cfg))
    result = run_inprocess(cfg, observer) if backend == "inprocess" else run_ray(cfg, observer, **options)
    owned = Path(cfg.state_dir) == result.run_dir / CLIENT_STATE_DIR
    if owned and result.summary.get("status") == "completed":
        shutil.rmtree(result.run_dir / CLIENT_STATE_DIR, ignore_errors=True)  # nothing is left to resume
    return result


#: the folder of a run directory where a simulation keeps its clients' state (checkpoint on, no state-dir)
CLIENT_STATE_DIR = "clients"


def placed(cfg: Config) -> Config:
    """The config with its run directory chosen now (absolute, as RunDir.create would pick it), so
    that the runner knows where to look and the clients' state can live in it."""
    if cfg.resume:
        run_dir = Path(cfg.resume).resolve()
        cfg = cfg.replace(resume=str(run_dir))
        from fedsqueeze.tracking import RunDir

        own = str(run_dir / CLIENT_STATE_DIR)
        if not cfg.state_dir and RunDir(run_dir).read_config().get("state-dir") == own:
            cfg = cfg.replace(state_dir=own)  # the folder the runner chose for the run's clients
        return cfg
    cfg = _unique_run_name(cfg)
    if cfg.checkpoint and not cfg.state_dir:
        cfg = cfg.replace(state_dir=str(Path(cfg.out_dir) / cfg.name / CLIENT_STATE_DIR))
    return cfg


#: torch threads per client call in the in-process backend: one, as Flower's Ray backend gives each
#: client one CPU (client-resources-num-cpus=1); so both backends compute the same floats, and the
#: small models here run faster on one thread than on two
CLIENT_THREADS = 1


def run_inprocess(
    cfg: Config, observer: Observer | None = None, client_threads: int | None = CLIENT_THREADS
) -> SimulationResult:
    from fedsqueeze.client.app import read_ahead
    from fedsqueeze.deploy import state as client_state
    from fedsqueeze.tracking import read_metrics

    from .allocator import keep_freed_memory
    from .grid import run_inprocess as run_apps

    keep_freed_memory()  # rounds allocate the same d-sized buffers again and again (see .allocator)
    state: dict[str, Any] = {}

    def watch(event: str, data: dict[str, Any]) -> None:
        if event == "start":
            state["run_dir"] = data["run_dir"]
        if event == "finish":
            state["summary"] = data
        if observer is not None:
            observer(event, data)

    t0 = time.perf_counter()
    # the clients live in this process, so their state files may be written behind their replies
    # and read ahead of their calls
    client_state.write_behind(True)
    try:
        grid, _ = run_apps(
            "fedsqueeze.server.app:app",
            "fedsqueeze.client.app:app",
            cfg.num_clients,
            cfg.to_run_config(),
            seed=cfg.seed,
            observer=watch,
            client_threads=client_threads,
            read_ahead=read_ahead,
        )
    finally:
        client_state.write_behind(False)
    wall = time.perf_counter() - t0
    run_dir = Path(state["run_dir"])
    timings = {"wall_s": wall, "client_s": grid.client_seconds, "client_calls": float(grid.client_calls)}
    return SimulationResult(run_dir, state.get("summary", {}), read_metrics(run_dir / "metrics.jsonl"), timings)


# ---- Ray: Flower's simulation engine -------------------------------------------------------------

#: SuperLink start-up limit (its HTTP health endpoint must answer within this)
SUPERLINK_START_S = 60.0
#: how long `flwr run --stream` may go on after the summary is written (it streams the last lines)
STREAM_GRACE_S = 5.0
#: the Ray backend's copy of Flower's log of the run, in the run directory
FLOWER_LOG = "flower.log"


def app_pyproject(cfg: Config) -> str:
    """A minimal Flower app whose components are fedsqueeze's apps and whose config is `cfg`."""
    from fedsqueeze import __version__

    lines = [
        "[build-system]",
        'requires = ["setuptools>=68"]',
        'build-backend = "setuptools.build_meta"',
        "",
        "[project]",
        'name = "fedsqueeze-run"',
        f'version = "{__version__}"',
        'description = "a fedsqueeze run (generated by fedsqueeze simulate --backend ray)"',
        'license = "Apache-2.0"',
        'dependencies = ["fedsqueeze"]',
        "",
        "[tool.flwr.app]",
        'publisher = "fedsqueeze"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "fedsqueeze.server.app:app"',
        'clientapp = "fedsqueeze.client.app:app"',
        "",
        "[tool.flwr.app.config]",
        cfg.to_toml().rstrip(),
        "",
    ]
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    """An executable of this environment (next to the running Python), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found; install flwr[simulation]")
    return found


def _import_roots(cfg: Config) -> list[str]:
    """The folder a user's task module ("package.module:function") is imported from in this process."""
    import importlib.util

    from fedsqueeze.config import parse_task

    name, _ = parse_task(cfg.task)
    if ":" not in name:
        return []
    top = name.partition(":")[0].split(".")[0]
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return []
    if spec is None or spec.origin is None:
        return []
    origin = Path(spec.origin).resolve()
    return [str(origin.parent.parent if spec.submodule_search_locations else origin.parent)]


def _wait_http(port: int, proc: subprocess.Popen[bytes], log_path: Path, limit: float) -> None:
    import httpx

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with code {proc.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=0.5).is_success:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"flower-superlink did not start within {limit:.0f} s; see {log_path}")


def _children() -> dict[int, list[int]]:
    """ppid -> pids of every process (Linux /proc)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process below `pid`: recorded before stopping anything, since
    children that outlive their parent are re-parented and can no longer be traced to it."""
    if not os.path.isdir("/proc"):
        return []
    tree = _children()
    out, todo = [], list(tree.get(pid, []))
    while todo:
        p = todo.pop()
        start = _start_time(p)
        if start is not None:
            out.append((p, start))
        todo.extend(tree.get(p, []))
    return out


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().decode(errors="replace").rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Stop a process this runner started and every process it started (by PID, checked against reuse)."""
    family = _descendants(proc.pid)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)
    family += [d for d in _descendants(proc.pid) if d not in family]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [(p, t) for p, t in family if _start_time(p) == t]
        if not alive:
            return
        for p, _ in alive:
            try:
                os.kill(p, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 2.0)
        while time.monotonic() < deadline and any(_start_time(p) == t for p, t in alive):
            time.sleep(0.1)


def _write_interrupted_summary(cfg: Config, run_dir: Path) -> None:
    """The ServerApp in the simulation process is stopped before it can write summary.json: write it here."""
    from fedsqueeze.tracking import RunDir, read_metrics, summarize

    if not run_dir.is_dir() or (run_dir / "summary.json").exists():
        return
    rows = read_metrics(run_dir / "metrics.jsonl")
    summary = summarize(rows, target_accuracy=cfg.target_accuracy or None, status="interrupted", run_dir=str(run_dir))
    RunDir(run_dir).write_summary(summary)


def _unique_run_name(cfg: Config) -> Config:
    """Pick the run directory now (as RunDir.create would), so the runner knows where to look."""
    root = Path(cfg.out_dir).resolve()
    name = cfg.name
    path = root / name
    if path.exists() and any(path.iterdir()):
        k = 2
        while (root / f"{name}-{k}").exists():
            k += 1
        name = f"{name}-{k}"
    return cfg.replace(name=name, out_dir=str(root))


def run_ray(
    cfg: Config,
    observer: Observer | None = None,
    *,
    num_cpus_per_client: int = 1,
    timeout: float | None = None,
    flwr_home: str | os.PathLike[str] | None = None,
    keep_home: bool = False,
    app_dir: str | os.PathLike[str] | None = None,
) -> SimulationResult:
    """Run on Flower's Ray simulation engine through its own SuperLink; see the module docstring.

    app_dir: a Flower app to submit (for example the repository root, whose pyproject declares the
    app) with the config as `--run-config`; by default a minimal app whose config is `cfg` is generated.
    """
    from fedsqueeze.tracking import read_metrics

    cfg = placed(cfg)
    run_dir = Path(cfg.resume) if cfg.resume else Path(cfg.out_dir) / cfg.name
    # first of all: if this process dies, even by SIGKILL, the watchdog stops every process below the
    # ones started here and removes the temporary folders
    watchdog = Watchdog("fedsqueeze simulate --backend ray")
    family = Family()
    superlink: subprocess.Popen[bytes] | None = None
    run_proc: subprocess.Popen[bytes] | None = None
    rows: list[dict[str, Any]] = []
    home: Path | None = None
    temporary: list[Path] = []
    try:
        home = Path(flwr_home) if flwr_home is not None else Path(tempfile.mkdtemp(prefix="fedsqueeze-flwr-"))
        home.mkdir(parents=True, exist_ok=True)
        temporary = [home] if flwr_home is None else []
        ray_tmp = _ray_temp_dir(home)
        if flwr_home is not None or ray_tmp != home.resolve() / "ray":
            temporary.append(ray_tmp)
        if not keep_home:
            for path in temporary:
                watchdog.remove(path)
        run_config: list[str] = []
        if app_dir is None:
            app_path = home / "app"
            app_path.mkdir(exist_ok=True)
            (app_path / "pyproject.toml").write_text(app_pyproject(cfg))
        else:
            app_path = Path(app_dir).resolve()
            (home / "run-config.toml").write_text(cfg.to_toml())
            run_config = ["--run-config", str(home / "run-config.toml")]
        port = free_port()
        (home / "config.toml").write_text(
            "[superlink]\n"
            'default = "fedsqueeze"\n\n'
            "[superlink.fedsqueeze]\n"
            f'address = "127.0.0.1:{port}"\n'
            "insecure = true\n"
        )
        env = {
            **os.environ,
            "FLWR_HOME": str(home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "RAY_DISABLE_USAGE_STATS": "1",
            # Ray's sessions (logs, sockets, spilled objects) in a folder of this run, not in a shared /tmp/ray
            "RAY_TMPDIR": str(ray_tmp),
            "PYTHONUNBUFFERED": "1",
            # the SuperLink starts flower-superexec and flwr-simulation from PATH: use this environment's
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            # a user's task module imports there as it does here
            "PYTHONPATH": os.pathsep.join([*_import_roots(cfg), *filter(None, [os.environ.get("PYTHONPATH")])]),
        }
        log_path = home / "superlink.log"
        notify = observer or (lambda event, data: None)
        t0 = time.perf_counter()
        superlink = _spawn(
            family,
            watchdog,
            [
                _bin("flower-superlink"),
                "--insecure",
                "--simulation",
                "--disable-runtime-dependency-installation",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-file",
                str(log_path),
            ],
            cwd=str(home),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_http(port, superlink, log_path, SUPERLINK_START_S)
        started = time.perf_counter()
        submitted_at = time.time()
        federation = f"num-supernodes={cfg.num_clients} client-resources-num-cpus={num_cpus_per_client}"
        run_log = home / "flwr-run.log"
        with open(run_log, "wb") as out:
            run_proc = _spawn(
                family,
                watchdog,
                [
                    _bin("flwr"),
                    "run",
                    str(app_path),
                    "fedsqueeze",
                    *run_config,
                    "--federation-config",
                    federation,
                    "--stream",
                ],
                cwd=str(home),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            notify("start", {"run_dir": str(run_dir), "rounds": cfg.rounds})
            deadline = None if timeout is None else time.monotonic() + timeout
            seen = len(read_metrics(run_dir / "metrics.jsonl")) if cfg.resume else 0
            while True:
                family.scan()  # processes re-parented away from the tree stay known, and are stopped
                rows = read_metrics(run_dir / "metrics.jsonl") if run_dir.exists() else []
                for row in rows[seen:]:
                    notify("round", row)
                seen = len(rows)
                summary_path = run_dir / "summary.json"
                # the run is over when the ServerApp wrote its summary (flwr run --stream may linger)
                if summary_path.exists() or run_proc.poll() is not None:
                    try:  # let the stream carry the run's last log lines into the log file
                        run_proc.wait(timeout=STREAM_GRACE_S)
                    except subprocess.TimeoutExpired:
                        pass
                    break
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"the Ray simulation did not finish within {timeout:.0f} s; see {run_log}")
                time.sleep(0.2)
        rows = read_metrics(run_dir / "metrics.jsonl") if run_dir.exists() else []
        for row in rows[seen:]:
            notify("round", row)
        summary_path = run_dir / "summary.json"
        if not summary_path.exists():
            tail = run_log.read_text(errors="replace")[-4000:] if run_log.exists() else ""
            raise RuntimeError(f"the Ray simulation ended without a summary ({run_dir}); flwr run said:\n{tail}")
        summary = json.loads(summary_path.read_text())
        finished = time.perf_counter()
        notify("finish", summary)
        timings = {"wall_s": finished - t0, "superlink_s": started - t0, "run_s": finished - started}
        if isinstance(summary.get("started_at"), (int, float)):
            # from `flwr run` to the ServerApp's first line (FAB install, simulation process, imports)
            timings["serverapp_start_s"] = summary["started_at"] - submitted_at
        if isinstance(summary.get("setup_s"), (int, float)):
            timings["setup_s"] = summary["setup_s"]  # model, task and node discovery (Ray starts here)
        timings["rounds_s"] = sum(float(r.get("wall_s") or 0.0) for r in rows)
        return SimulationResult(run_dir, summary, rows, timings)
    except KeyboardInterrupt:
        _write_interrupted_summary(cfg, run_dir)
        raise
    finally:
        family.scan()  # while the parents still live: the processes below them, in their own sessions
        if run_proc is not None:
            _stop(run_proc, grace=5.0)
        if superlink is not None:
            _stop(superlink)
        escaped = family.stop(grace=5.0)  # whatever left the tree (re-parented) and is still running
        if escaped:
            log.warning("stopped %d process(es) the SuperLink left running: %s", len(escaped),
                        " ".join(str(st.pid) for st in escaped))  # fmt: skip
        run_log = home / "flwr-run.log" if home is not None else None
        if run_dir.is_dir() and run_log is not None and run_log.exists():
            # Flower's log of the run (the ServerApp's warnings, failed nodes with their ids) stays with it
            shutil.copyfile(run_log, run_dir / FLOWER_LOG)
        if not keep_home:
            for path in temporary:
                shutil.rmtree(path, ignore_errors=True)
        watchdog.release()


def _spawn(family: Family, watchdog: Watchdog, argv: list[str], **options: Any) -> subprocess.Popen[bytes]:
    """A child in its own session with a parent-death signal, known to the run's family and its watchdog."""
    proc = subprocess.Popen(argv, **options, **child_options())
    family.add(proc.pid)
    watchdog.track(proc.pid)
    return proc


#: the longest folder Ray's temporary files can go in: its session folder adds up to ~66 characters
#: (ray/session_<date>_<time>_<us>_<pid>/sockets/plasma_store), and a Unix socket path has at most 107
RAY_TMP_MAX = 40


def _ray_temp_dir(home: Path) -> Path:
    """Where Ray keeps this run's sessions: `home/ray` when that path is short enough, else a new short folder."""
    if len(str(home.resolve() / "ray")) <= RAY_TMP_MAX:
        return home.resolve() / "ray"
    base = tempfile.gettempdir()
    if len(base) > RAY_TMP_MAX - 18 and os.access("/tmp", os.W_OK):
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="fsq-ray-", dir=base))
