"""Processes that end with the run that started them, also when the run's own process is SIGKILLed.

A runner (the Ray backend, a loopback `Deployment`) starts Flower's processes, and those start more:
flower-superlink starts flower-superexec in a session of its own, which starts flwr-simulation,
which starts Ray's daemons (gcs_server, raylet, dashboard, log monitor, autoscaler monitor), and
raylet starts Ray's workers, all in superexec's session. A runner killed with SIGKILL (or by the
OOM killer, or a crash) runs no `finally`: all of them went on training, and its temporary folder
stayed (measured: 13 processes, 1 row at the kill and 24 three seconds later).

Three layers:

- `child_options()`: `subprocess.Popen` options that put a child in its own session (its pid is then
  its process group and session id) and, when it is started from the main thread, give it a
  parent-death signal (prctl PR_SET_PDEATHSIG: SIGTERM when this process dies), so the direct
  children stop at once whatever else happens;
- `Family`: the processes a runner started and everything below them, found by scanning /proc: by
  parent, and by the sessions and process groups that members lead (which keep the processes whose
  parent died and that were re-parented to init). `stop()` ends them all: SIGTERM, then SIGKILL;
- `Watchdog`: a small process (this file run as a script: standard library only, starts in tens of
  milliseconds) in its own session, which reads a pipe from the runner. It keeps its own `Family`
  of the processes the runner tells it about, scanning a few times a second; when the pipe closes
  without `release()` (the runner is gone, by any signal), it stops the family, removes the folders
  it was told about, and reports both on its stderr (the runner's).

Processes are identified by (pid, start time), so a reused pid is never taken for a member.
Linux only (/proc, prctl); elsewhere the runners still stop what they started on a normal exit.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: how often the watchdog looks for new processes below the ones it tracks
SCAN_S = 0.2
#: after the runner died: how long members have after SIGTERM before SIGKILL
DEATH_GRACE_S = 2.0
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Stat:
    pid: int
    state: str
    ppid: int
    pgrp: int
    session: int
    #: start time in clock ticks after boot (with pid: the process's identity)
    start: int

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X", "x")


def read_stat(pid: int) -> Stat | None:
    """/proc/PID/stat of a process, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().decode(errors="replace").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    try:
        return Stat(pid, fields[0], int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]))
    except (IndexError, ValueError):
        return None


def process_table() -> dict[int, Stat]:
    """Every process of this machine (that /proc lets us see)."""
    table: dict[int, Stat] = {}
    if not os.path.isdir("/proc"):
        return table
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = read_stat(int(entry))
            if st is not None:
                table[st.pid] = st
    return table


class Family:
    """Processes started by a runner and everything below them (see the module docstring)."""

    def __init__(self) -> None:
        #: pid -> start time of every process known to belong
        self.members: dict[int, int] = {}
        #: session or process group id -> start time of its leader, a member
        self.leaders: dict[int, int] = {}
        self._lock = threading.Lock()

    def add(self, pid: int, start: int | None = None) -> None:
        """A process the runner started (`start`: its start time, read now if not given)."""
        if start is None:
            st = read_stat(pid)
            if st is None:
                return
            start = st.start
        with self._lock:
            self.members[pid] = start
        self.scan()

    def scan(self, table: dict[int, Stat] | None = None) -> dict[int, Stat]:
        """Add the processes now below the members or in the sessions and groups members lead."""
        table = process_table() if table is None else table
        me = os.getpid()
        with self._lock:
            changed = True
            while changed:
                changed = False
                for st in table.values():
                    if st.pid in self.members or st.pid == me:
                        continue
                    parent = table.get(st.ppid)
                    by_parent = parent is not None and self.members.get(st.ppid) == parent.start
                    by_group = any(st.start >= self.leaders.get(gid, sys.maxsize) for gid in (st.session, st.pgrp))
                    if by_parent or by_group:
                        self.members[st.pid] = st.start
                        changed = True
                for pid, start in self.members.items():
                    st = table.get(pid)
                    leads = st is not None and st.start == start and pid in (st.session, st.pgrp)
                    if leads and pid not in self.leaders:
                        self.leaders[pid] = start
                        changed = True
        return table

    def alive(self, table: dict[int, Stat] | None = None) -> list[Stat]:
        """The members still running (zombies do not count)."""
        table = self.scan(table)
        with self._lock:
            return [st for st in table.values() if st.alive and self.members.get(st.pid) == st.start]

    def stop(self, grace: float = 10.0, kill_wait: float = 5.0) -> list[Stat]:
        """SIGTERM every member, SIGKILL what is left after `grace` seconds; returns the ones signalled.

        Members that appear meanwhile (a process forking while it stops) get the same signal."""
        signalled: dict[int, Stat] = {}
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, kill_wait)):
            sent: set[tuple[int, int]] = set()
            deadline = time.monotonic() + wait
            while True:
                alive = self.alive()
                if not alive:
                    return list(signalled.values())
                for st in alive:
                    if (st.pid, st.start) in sent:
                        continue
                    try:
                        os.kill(st.pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
                    sent.add((st.pid, st.start))
                    signalled.setdefault(st.pid, st)
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        return list(signalled.values())


# ---- children with a parent-death signal ---------------------------------------------------------


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


_PRCTL = _prctl()


def child_options(death_signal: int = signal.SIGTERM) -> dict[str, Any]:
    """`subprocess.Popen` keyword arguments: a session of its own, and `death_signal` when this process dies.

    The parent-death signal follows the *thread* that started the child, so it is set only for
    children started from the main thread (which lives as long as the process); the watchdog covers
    the others. The prctl function is looked up here, in the parent; the child only calls it.
    """
    options: dict[str, Any] = {"start_new_session": True}
    if _PRCTL is None or threading.current_thread() is not threading.main_thread():
        return options
    prctl, parent = _PRCTL, os.getpid()

    def set_death_signal() -> None:  # runs in the child between fork and exec
        prctl(PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: the signal would never come
            os.kill(os.getpid(), death_signal)

    options["preexec_fn"] = set_death_signal
    return options


# ---- the watchdog ---------------------------------------------------------------------------------


class Watchdog:
    """The runner's half: starts the watchdog process and tells it what to clean up if the runner dies.

    `remove(folder)`: removed if the runner dies; `track(pid)` after starting a child (with
    `child_options()`): it and everything below it is stopped if the runner dies; `release()` after
    the runner's own orderly stop: the watchdog exits without touching anything.
    """

    def __init__(self, label: str = "fedsqueeze") -> None:
        self.label = label
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        if not os.path.isdir("/proc"):
            return
        self._proc = subprocess.Popen(
            [sys.executable, "-I", str(Path(__file__).resolve()), "--runner", str(os.getpid()), "--label", label],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C or a killpg of the runner's group does not reach it
            close_fds=True,
        )

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def track(self, pid: int) -> None:
        """Stop `pid` and every process below it if the runner dies."""
        st = read_stat(pid)
        if st is not None:
            self._send({"track": pid, "start": st.start})

    def remove(self, path: str | os.PathLike[str]) -> None:
        """Remove the folder `path` (after the processes are stopped) if the runner dies."""
        self._send({"remove": str(Path(path).resolve())})

    def release(self, timeout: float = 10.0) -> None:
        """The runner stopped everything itself: let the watchdog exit without doing anything."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            assert proc.stdin is not None
            proc.stdin.write(b'{"release": true}\n')
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _send(self, message: dict[str, Any]) -> None:
        with self._lock:
            if self._proc is None or self._proc.stdin is None:
                return
            try:
                self._proc.stdin.write(json.dumps(message).encode() + b"\n")
                self._proc.stdin.flush()
            except (BrokenPipeError, OSError):
                print(f"{self.label}: the watchdog process exited; processes may outlive a crash", file=sys.stderr)
                self._proc = None

    def __enter__(self) -> Watchdog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _watch(runner: int, label: str) -> int:
    """The watchdog process: read commands until the runner's end of the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is the runner's to handle, and its end ours
    family = Family()
    folders: list[str] = []
    released = False
    fd = sys.stdin.fileno()
    pending = b""
    while True:
        ready, _, _ = select.select([fd], [], [], SCAN_S)
        if ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if "track" in message:
                    with family._lock:
                        family.members[int(message["track"])] = int(message["start"])
                if "remove" in message:
                    folders.append(str(message["remove"]))
                if message.get("release"):
                    released = True
        family.scan()
    if released:
        return 0
    stopped = family.stop(grace=DEATH_GRACE_S)
    left = [str(st.pid) for st in family.alive()]
    removed, kept = [], []
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
        (kept if os.path.exists(folder) else removed).append(folder)
    lines = [f"{label}: the runner (pid {runner}) ended without stopping what it started"]
    lines.append(f"  stopped {len(stopped)} process(es): {' '.join(str(st.pid) for st in stopped) or '-'}")
    if left:
        lines.append(f"  still running (could not be stopped): {' '.join(left)}")
    if removed:
        lines.append(f"  removed {' '.join(removed)}")
    if kept:
        lines.append(f"  could not remove {' '.join(kept)}")
    try:
        print("\n".join(lines), file=sys.stderr, flush=True)
    except OSError:
        pass
    return 1 if left or kept else 0


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="stop a runner's processes when the runner dies")
    parser.add_argument("--runner", type=int, required=True)
    parser.add_argument("--label", default="fedsqueeze")
    args = parser.parse_args()
    sys.exit(_watch(args.runner, args.label))
