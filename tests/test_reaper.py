"""fedsqueeze.reaper: a runner's processes end with it, also when it is SIGKILLed (no Flower here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from fedsqueeze.reaper import Family, read_stat

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl")

ROOT = Path(__file__).resolve().parents[1]

#: a runner: a watchdog, a temporary folder, `sleep` children started three ways; prints what it
#: started, then waits to be killed
RUNNER = textwrap.dedent(
    """
    import json, subprocess, sys, tempfile, time
    from fedsqueeze.reaper import Watchdog, child_options
    mode = sys.argv[1]
    dog = Watchdog("test runner") if mode != "no-watchdog" else None
    tmp = tempfile.mkdtemp(prefix="reaper-test-", dir=sys.argv[2])
    if dog: dog.remove(tmp)
    plain = subprocess.Popen(["sleep", "300"], **child_options())
    # a child that starts a grandchild in a session of its own, then exits: the grandchild is
    # re-parented to init, as flower-superexec is when the SuperLink dies
    orphaner = subprocess.Popen([sys.executable, "-c",
        "import subprocess, time; subprocess.Popen(['sleep', '301'], start_new_session=True); time.sleep(300)"],
        **child_options())
    for p in (plain, orphaner):
        if dog: dog.track(p.pid)
    time.sleep(1.0)  # the watchdog scans a few times a second
    print(json.dumps({"tmp": tmp, "watchdog": dog.pid if dog else None}), flush=True)
    if mode == "release":
        plain.kill(); orphaner.kill(); plain.wait(); orphaner.wait()
        dog.release()
        print("released", flush=True)
    time.sleep(300)
    """
)


def _family_of(pid: int, seconds: float) -> Family:
    """Everything below `pid` (kept up to date for `seconds`), as the test's own record."""
    family = Family()
    family.add(pid)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        family.scan()
        time.sleep(0.05)
    return family


def _start(mode: str, tmp_path: Path) -> tuple[subprocess.Popen[str], dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, mode, str(tmp_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    info = json.loads(proc.stdout.readline())
    return proc, info


def _wait_gone(family: Family, limit: float) -> list[int]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if not family.alive():
            return []
        time.sleep(0.1)
    return [st.pid for st in family.alive()]


@pytest.mark.parametrize("mode", ["watchdog", "no-watchdog"])
def test_sigkilled_runner_takes_its_processes_with_it(tmp_path, mode):
    proc, info = _start(mode, tmp_path)
    family = _family_of(proc.pid, 0.5)
    try:
        below = [st.pid for st in family.alive() if st.pid != proc.pid]
        # the sleeps, the orphaner, the re-parented grandchild (found by its session), the watchdog
        assert len(below) == (4 if mode == "watchdog" else 3), below
        proc.kill()
        proc.wait()
        if mode == "no-watchdog":
            # the parent-death signal stops the direct children; the re-parented grandchild lives on
            time.sleep(1.0)
            left = [st.pid for st in family.alive()]
            assert len(left) == 1 and read_stat(left[0]) is not None and read_stat(left[0]).ppid != proc.pid
            return
        assert _wait_gone(family, 15) == [], "processes outlived the runner"
        assert not Path(info["tmp"]).exists()
        err = proc.stderr.read()
        assert "ended without stopping what it started" in err and "removed" in err, err
    finally:
        family.stop(grace=1.0)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_released_watchdog_leaves_alone(tmp_path):
    proc, info = _start("release", tmp_path)
    try:
        assert proc.stdout.readline().strip() == "released"
        assert read_stat(info["watchdog"]) is None or not read_stat(info["watchdog"]).alive
        proc.kill()
        proc.wait()
        time.sleep(0.5)
        assert Path(info["tmp"]).exists()  # not the watchdog's to remove any more
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_family_follows_sessions_and_ignores_reused_pids():
    # the outer process waits until the family has seen its child: the test never races its exit
    code = (
        "import subprocess, sys; p = subprocess.Popen(['sleep', '60'], start_new_session=True); "
        "print(p.pid, flush=True); sys.stdin.readline()"
    )
    outer = subprocess.Popen(
        [sys.executable, "-c", code], start_new_session=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    family = Family()
    family.add(outer.pid)
    try:
        child = int(outer.stdout.readline())
        deadline = time.monotonic() + 10
        while child not in family.members and time.monotonic() < deadline:
            family.scan()
            time.sleep(0.01)
        outer.stdin.write("\n")
        outer.stdin.close()
        outer.wait(timeout=10)
        family.scan()
        alive = family.alive()
        assert [st.pid for st in alive] == [child] and alive[0].ppid != outer.pid  # the re-parented sleep
        stopped = family.stop(grace=2.0)
        assert [st.pid for st in stopped] == [alive[0].pid]
        assert family.alive() == []
        # a member whose start time no longer matches its pid is another process
        family.members[os.getpid()] = -1
        assert family.alive() == []
    finally:
        family.stop(grace=0.5)
