"""The runner behind `fedsqueeze simulate`: one config, two backends, the same ServerApp and ClientApp.

- `inprocess`: `InProcessGrid` calls `fedsqueeze.client.app:app` for each message in this process
  (fast, deterministic; what most tests use).
- `ray`: Flower's simulation engine. The runner starts its own SuperLink (`flower-superlink
  --simulation`, 127.0.0.1, free ports, a private FLWR_HOME), submits the app with `flwr run` and the
  resolved config as the app's `[tool.flwr.app.config]`, follows metrics.jsonl for progress, and
  stops every process it started (by process group of the SuperLink it spawned) when the run ends,
  fails or is interrupted.

Both write the same run directory (`out-dir/name/`); same config and seed give the same metrics.
"""

from __future__ import annotations

import json
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

Observer = Callable[[str, dict[str, Any]], None]
BACKENDS = ("inprocess", "ray")


@dataclass
class SimulationResult:
    run_dir: Path
    summary: dict[str, Any]
    rows: list[dict[str, Any]]
    #: backend timings: wall seconds, and (in-process) seconds inside ClientApp calls
    timings: dict[str, float]


def simulate(
    cfg: Config, backend: str = "inprocess", observer: Observer | None = None, **options: Any
) -> SimulationResult:
    """Run `cfg` on a backend ("inprocess" or "ray"); `observer(event, data)` sees start/round/finish."""
    if backend == "inprocess":
        return run_inprocess(cfg, observer)
    if backend == "ray":
        return run_ray(cfg, observer, **options)
    raise ValueError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")


def run_inprocess(cfg: Config, observer: Observer | None = None) -> SimulationResult:
    from fedsqueeze.tracking import read_metrics

    from .grid import run_inprocess as run_apps

    state: dict[str, Any] = {}

    def watch(event: str, data: dict[str, Any]) -> None:
        if event == "start":
            state["run_dir"] = data["run_dir"]
        if event == "finish":
            state["summary"] = data
        if observer is not None:
            observer(event, data)

    t0 = time.perf_counter()
    grid, _ = run_apps(
        "fedsqueeze.server.app:app",
        "fedsqueeze.client.app:app",
        cfg.num_clients,
        cfg.to_run_config(),
        seed=cfg.seed,
        observer=watch,
    )
    wall = time.perf_counter() - t0
    run_dir = Path(state["run_dir"])
    timings = {"wall_s": wall, "client_s": grid.client_seconds, "client_calls": float(grid.client_calls)}
    return SimulationResult(run_dir, state.get("summary", {}), read_metrics(run_dir / "metrics.jsonl"), timings)


# ---- Ray: Flower's simulation engine -------------------------------------------------------------

#: SuperLink start-up limit (its HTTP health endpoint must answer within this)
SUPERLINK_START_S = 60.0


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


def _stop_group(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Stop a process started with its own session, and everything it started in that session."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    try:  # children left behind in the group (the simulation process, Ray workers)
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if proc.poll() is None:
        proc.wait(timeout=grace)


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
    num_cpus_per_client: float = 1.0,
    timeout: float | None = None,
    flwr_home: str | os.PathLike[str] | None = None,
    keep_home: bool = False,
) -> SimulationResult:
    """Run on Flower's Ray simulation engine through its own SuperLink; see the module docstring."""
    from fedsqueeze.tracking import read_metrics

    cfg = _unique_run_name(cfg)
    run_dir = Path(cfg.out_dir) / cfg.name
    home = Path(flwr_home) if flwr_home is not None else Path(tempfile.mkdtemp(prefix="fedsqueeze-flwr-"))
    home.mkdir(parents=True, exist_ok=True)
    app_dir = home / "app"
    app_dir.mkdir(exist_ok=True)
    (app_dir / "pyproject.toml").write_text(app_pyproject(cfg))
    http_port, control_port = free_port(), free_port()
    (home / "config.toml").write_text(
        "[superlink]\n"
        'default = "fedsqueeze"\n\n'
        "[superlink.fedsqueeze]\n"
        f'address = "127.0.0.1:{control_port}"\n'
        "insecure = true\n"
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_DISABLE_USAGE_STATS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    log_path = home / "superlink.log"
    notify = observer or (lambda event, data: None)
    t0 = time.perf_counter()
    superlink = subprocess.Popen(
        [
            _bin("flower-superlink"),
            "--insecure",
            "--simulation",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(http_port),
            "--control-api-address",
            f"127.0.0.1:{control_port}",
            "--log-file",
            str(log_path),
        ],
        cwd=str(app_dir),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    run_proc: subprocess.Popen[bytes] | None = None
    rows: list[dict[str, Any]] = []
    try:
        _wait_http(http_port, superlink, log_path, SUPERLINK_START_S)
        started = time.perf_counter()
        federation = (
            f"num-supernodes={cfg.num_clients} client-resources-num-cpus={num_cpus_per_client} "
            "client-resources-num-gpus=0.0"
        )
        run_log = home / "flwr-run.log"
        with open(run_log, "wb") as out:
            run_proc = subprocess.Popen(
                [_bin("flwr"), "run", str(app_dir), "fedsqueeze", "--federation-config", federation, "--stream"],
                cwd=str(app_dir),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            notify("start", {"run_dir": str(run_dir), "rounds": cfg.rounds})
            deadline = None if timeout is None else time.monotonic() + timeout
            seen = 0
            while True:
                rows = read_metrics(run_dir / "metrics.jsonl") if run_dir.exists() else []
                for row in rows[seen:]:
                    notify("round", row)
                seen = len(rows)
                summary_path = run_dir / "summary.json"
                if summary_path.exists() or run_proc.poll() is not None:
                    # the run is over when the ServerApp wrote its summary (flwr run --stream may linger)
                    if summary_path.exists() or run_proc.poll() is not None:
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
        timings = {"wall_s": finished - t0, "startup_s": started - t0, "run_s": finished - started}
        return SimulationResult(run_dir, summary, rows, timings)
    finally:
        if run_proc is not None:
            _stop_group(run_proc, grace=5.0)
        _stop_group(superlink)
        if flwr_home is None and not keep_home:
            shutil.rmtree(home, ignore_errors=True)
