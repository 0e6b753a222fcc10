"""Start and stop a Flower SuperLink and SuperNodes on loopback, for tests and scripts.

    with Deployment(workdir, creds) as dep:
        dep.start_superlink()                      # TLS + --enable-supernode-auth + --database
        dep.register(creds.public_key(0))          # flwr supernode register node1.pub fedsqueeze
        dep.start_supernode("a", creds.node_keys[0], {"partition-id": 0, "state-dir": ...})
        dep.run_app(app_dir, cfg)                  # flwr run APP fedsqueeze --run-config FILE
        dep.wait_summary(run_dir)

Every process is started in its own session (its PID is its process group id) and stopped by that
id (SIGTERM, then SIGKILL): the ClientApp and ServerApp processes a SuperNode or the SuperLink
spawns are in the same group and stop with it. `close()` (or leaving the `with` block, also on an
exception) stops everything still running, then whatever left those groups (the SuperLink's
flower-superexec has a session of its own). Only 127.0.0.1 is bound; ports are picked free.

If the process that holds the Deployment dies, even by SIGKILL, its children get SIGTERM (a
parent-death signal) and a watchdog process stops everything below them and removes the working
directory if it was a temporary one (`Deployment(None)`); see `fedsqueeze.reaper`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedsqueeze.config import Config
from fedsqueeze.reaper import Family, Watchdog, child_options

from .credentials import Credentials

CONNECTION = "fedsqueeze"
#: the exit code of a SuperNode whose key the SuperLink does not know (flwr.supercore.exit.ExitCode)
EXIT_UNREGISTERED = 305
HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def executable(name: str) -> str:
    """A console script of this environment (next to the running Python), else from PATH."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found; install fedsqueeze with flwr")
    return found


def node_config_arg(values: Mapping[str, Any]) -> str:
    """`--node-config` text: strings quoted, numbers bare."""
    parts = []
    for k, v in values.items():
        parts.append(f'{k}="{v}"' if isinstance(v, (str, os.PathLike)) else f"{k}={v}")
    return " ".join(parts)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    argv: list[str]

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Deployment:
    """A SuperLink and its SuperNodes in `workdir` (which also holds FLWR_HOME and the logs).

    workdir=None: a new temporary directory, removed by `close()` (and by the watchdog if this
    process dies).
    """

    workdir: Path | None
    creds: Credentials | None = None  # None: --insecure
    port: int = 0
    procs: list[Proc] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        #: whether `workdir` is a temporary directory of this Deployment's (removed by close())
        self.temporary = self.workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="fedsqueeze-deploy-") if self.workdir is None else self.workdir)
        self._family = Family()
        self._watchdog: Watchdog | None = None
        self.home = self.workdir / "flwr-home"
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = {
            **os.environ,
            "FLWR_HOME": str(self.home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            # the SuperLink and SuperNodes start flower-superexec, flwr-serverapp, flwr-clientapp from PATH
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
            **self.env,
        }

    # ---- context manager ----------------------------------------------------------------------
    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._family.scan()  # while the parents still live: the processes below them, in their own sessions
        for proc in reversed(self.procs):
            stop(proc)
        self._family.stop(grace=5.0)  # what left the process groups (flower-superexec, re-parented ones)
        if self.temporary:
            shutil.rmtree(self.workdir, ignore_errors=True)
        if self._watchdog is not None:
            self._watchdog.release()
            self._watchdog = None

    def _watchdog_started(self) -> Watchdog:
        """The watchdog of this Deployment's processes, started before the first of them."""
        if self._watchdog is None:
            self._watchdog = Watchdog("fedsqueeze deployment")
            if self.temporary:
                self._watchdog.remove(self.workdir)
        return self._watchdog

    # ---- processes ----------------------------------------------------------------------------
    def spawn(self, name: str, argv: list[str], env: Mapping[str, str] | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        watchdog = self._watchdog_started()
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                argv,
                cwd=str(self.workdir),
                env={**self.env, **(env or {})},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                **child_options(),  # its own session, SIGTERM if this process dies
            )
        self._family.add(popen.pid)
        watchdog.track(popen.pid)
        proc = Proc(name, popen, log, argv)
        self.procs.append(proc)
        return proc

    def start_superlink(self, database: str | os.PathLike[str] | None = "superlink.db", limit: float = 60) -> Proc:
        self.port = self.port or free_port()
        argv = [executable("flower-superlink"), "--host", HOST, "--port", str(self.port)]
        if self.creds is None:
            argv.append("--insecure")
        else:
            argv += [
                "--ssl-ca-certfile",
                str(self.creds.ca_cert),
                "--ssl-certfile",
                str(self.creds.server_cert),
                "--ssl-keyfile",
                str(self.creds.server_key),
                "--enable-supernode-auth",
            ]
        if database is not None:
            argv += ["--database", str(Path(self.workdir, database))]
        argv.append("--disable-runtime-dependency-installation")
        proc = self.spawn("superlink", argv)
        self.write_connection()
        self._wait_ready(proc, limit)
        return proc

    def write_connection(self, name: str = CONNECTION) -> Path:
        """FLWR_HOME/config.toml with a `[superlink.<name>]` entry for this SuperLink."""
        lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{HOST}:{self.port}"']
        if self.creds is None:
            lines.append("insecure = true")
        else:
            lines.append(f'root-certificates = "{self.creds.ca_cert}"')
        path = self.home / "config.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _wait_ready(self, proc: Proc, limit: float) -> None:
        import httpx

        scheme = "http" if self.creds is None else "https"
        verify: Any = True if self.creds is None else ssl.create_default_context(cafile=str(self.creds.ca_cert))
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"flower-superlink exited with {proc.popen.returncode}:\n{proc.log_text()[-3000:]}")
            try:
                if httpx.get(f"{scheme}://{HOST}:{self.port}/health", verify=verify, timeout=1.0).is_success:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"flower-superlink did not answer within {limit:.0f} s:\n{proc.log_text()[-3000:]}")

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a `flwr` CLI command against this deployment (FLWR_HOME set); raises if it fails."""
        out = subprocess.run(
            [executable("flwr"), *args],
            cwd=str(self.workdir),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            **child_options(),
        )
        if out.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(args)} failed ({out.returncode}):\n{out.stdout}\n{out.stderr}")
        return out

    def register(self, public_key: str | os.PathLike[str]) -> int:
        """`flwr supernode register KEY.pub fedsqueeze`; returns the node id."""
        out = self.flwr("supernode", "register", str(public_key), CONNECTION, "--format", "json")
        data = json.loads(out.stdout[out.stdout.index("{") :])
        return int(data["node-id"]) if "node-id" in data else int(data.get("node_id", 0))

    def start_supernode(
        self,
        name: str,
        private_key: str | os.PathLike[str] | None,
        node_config: Mapping[str, Any],
        root_certificates: str | os.PathLike[str] | None | bool = True,
        max_wait_time: float | None = None,
    ) -> Proc:
        """A SuperNode with its own FLWR_HOME and Runtime API port. root_certificates=True: the CA."""
        argv = [executable("flower-supernode"), "--superlink", f"{HOST}:{self.port}", "--port", str(free_port())]
        if self.creds is None:
            argv.append("--insecure")
        else:
            ca = self.creds.ca_cert if root_certificates is True else root_certificates
            if ca:
                argv += ["--root-certificates", str(ca)]
        if private_key is not None:
            argv += ["--auth-supernode-private-key", str(private_key)]
        if max_wait_time is not None:
            argv += ["--max-wait-time", str(max_wait_time)]
        argv += ["--node-config", node_config_arg(node_config)]
        home = self.workdir / f"home-{name}"
        home.mkdir(exist_ok=True)
        # one torch thread per ClientApp, as in the simulation backends: the same floats, the same bytes
        return self.spawn(name, argv, env={"FLWR_HOME": str(home), "OMP_NUM_THREADS": "1"})

    def run_app(self, app_dir: str | os.PathLike[str], cfg: Config) -> Proc:
        """`flwr run APP fedsqueeze --run-config FILE --stream` (FILE: the whole config as TOML)."""
        path = self.workdir / f"run-config-{len(self.procs)}.toml"
        path.write_text(cfg.to_toml())
        argv = [executable("flwr"), "run", str(app_dir), CONNECTION, "--run-config", str(path), "--stream"]
        return self.spawn(f"flwr-run-{len(self.procs)}", argv)


def stop(proc: Proc, grace: float = 10.0) -> None:
    """Stop a process and its process group (by its PID, the group id), SIGTERM then SIGKILL."""
    pgid = proc.pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not group_alive(pgid) and proc.popen.poll() is not None:
            break
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.popen.poll()
            if not group_alive(pgid):
                break
            time.sleep(0.1)
    if proc.popen.poll() is None:
        proc.popen.kill()
    proc.popen.wait(timeout=5)


def group_alive(pgid: int) -> bool:
    """Whether any process is left in the process group (zombies of our own child do not count)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().decode(errors="replace").rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def wait_for(path: Path, limit: float, procs: list[Proc] = (), what: str = "") -> None:  # type: ignore[assignment]
    """Wait until `path` exists; RuntimeError if a watched process exits first or the limit passes."""
    deadline = time.monotonic() + limit
    while not path.exists():
        for p in procs:
            if p.popen.poll() is not None:
                raise RuntimeError(
                    f"{p.name} exited with {p.popen.returncode} before {what or path}:\n{p.log_text()[-3000:]}"
                )
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what or path} did not appear within {limit:.0f} s")
        time.sleep(0.2)
