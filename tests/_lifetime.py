"""For the tests that SIGKILL a runner: the processes below it, recorded while it runs, by pid (with
start time, against reuse) and by session; kept independent of `fedsqueeze.reaper`, which they test."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from fedsqueeze.simulation.runner import _descendants


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().decode(errors="replace").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")[:160]
    except OSError:
        return "?"


class Tracked:
    """Every process seen below `root` (call `record()` while it runs), and their sessions."""

    def __init__(self, root: subprocess.Popen) -> None:
        self.root = root
        self.procs: dict[int, str] = {}  # pid -> start time
        self.sessions: set[int] = set()
        self.names: dict[int, str] = {}

    def record(self) -> None:
        for pid, start in _descendants(self.root.pid):
            fields = _stat(pid)
            if fields is None or fields[0] == "Z":
                continue
            self.procs[pid] = start
            self.sessions.add(int(fields[3]))
            # read again every time: a child seen between fork and exec still shows its parent's command
            name = _cmdline(pid)
            if name != "?":
                self.names[pid] = name
        assert os.getsid(0) not in self.sessions, "a tracked process is in the test's own session"

    def alive(self) -> list[str]:
        """The recorded processes still running and anything else in their sessions."""
        out = []
        for entry in filter(str.isdigit, os.listdir("/proc")):
            pid = int(entry)
            fields = _stat(pid)
            if fields is None or fields[0] in ("Z", "X") or pid == self.root.pid:
                continue
            if self.procs.get(pid) == fields[19] or int(fields[3]) in self.sessions:
                out.append(f"{pid} (session {fields[3]}): {self.names.get(pid) or _cmdline(pid)}")
        return out

    def wait_gone(self, limit: float) -> tuple[list[str], float]:
        """Wait until nothing recorded is alive; (what is left, seconds waited)."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < limit:
            if not self.alive():
                return [], time.monotonic() - t0
            time.sleep(0.1)
        return self.alive(), time.monotonic() - t0

    def kill_all(self) -> None:
        """Clean-up after a failed assertion: SIGKILL whatever is left, by pid."""
        for line in self.alive():
            try:
                os.kill(int(line.split()[0]), 9)
            except OSError:
                pass


def rows(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def record_until_a_row(tracked: Tracked, metrics: Path, err: Path, limit: float, expected: tuple[str, ...]) -> None:
    """Record the runner's processes until `metrics` has a row; then every `expected` name must be among them."""
    deadline = time.monotonic() + limit
    while rows(metrics) < 1:
        assert time.monotonic() < deadline, f"no round within {limit:g} s"
        assert tracked.root.poll() is None, err.read_text()[-3000:]
        tracked.record()
        time.sleep(0.2)
    tracked.record()
    names = " ".join(tracked.names.values())
    for name in expected:
        assert name in names, f"{name} not seen below the runner: {names}"


def clean_up(tracked: Tracked, tmp: Path) -> None:
    """After a kill test, whatever it left: the runner, anything recorded still alive, the temporary folder."""
    import shutil

    if tracked.root.poll() is None:
        tracked.root.kill()
        tracked.root.wait()
    tracked.kill_all()
    shutil.rmtree(tmp, ignore_errors=True)
