"""The server's checkpoint: what a run needs to go on after a crash, written after every round.

    run_dir/checkpoint.pt   the last complete round (0: before round 1), the run's uid, the global
                            vector x, the mechanism's server half (running means), the ef21p copy w
                            and its step, which partitions are in step with w and which replies the
                            server acknowledged, and the algorithm's own server state
    run_dir/model.pt        the global model of that round (a state_dict for torch.load)

Both are replaced atomically (a temporary file, fsync, rename), so a `kill -9` leaves the previous
round's or this round's, never a torn one. The checkpoint holds tensors, numbers and strings only:
`torch.load(weights_only=True)` reads it without running any code from the file.

Resuming (`resume = RUN_DIR`, `fedsqueeze simulate --resume RUN_DIR`):
- the config must equal the run's own config.toml in every key but name, out-dir and resume;
  otherwise ConfigError names the keys that differ;
- rows of metrics.jsonl after the checkpoint's round (a round that began but did not complete)
  and summary.json are removed, and the tracker goes on from the rows that remain;
- the server's state is loaded and the loop goes on with the next round. Sampling and every
  client's randomness are seeded by (seed, round), and clients read the state they wrote before
  the round they are in (fedsqueeze.deploy.state), so a resumed run repeats the interrupted round
  exactly and its rows equal those of a run that was never interrupted (wall_s aside).

One process writes a run directory at a time: the server holds an exclusive lock on `run_dir/.lock`
while it runs (released by the kernel when the process dies, however it dies).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fedsqueeze.config import RESOLVED_TABLE, Config, ConfigError
from fedsqueeze.tracking import RunDir, read_metrics
from fedsqueeze.tracking.rundir import dumps_row

CHECKPOINT_FILE = "checkpoint.pt"
LOCK_FILE = ".lock"
FORMAT = 1
#: keys that say where a run is, not what it computes: they may differ on resume
PLACE_KEYS = ("name", "out-dir", "resume")
#: how long taking a run's lock waits for a process that is still dying (a killed run's server)
LOCK_WAIT_S = 30.0


def save(state: dict[str, Any], run_dir: RunDir) -> None:
    """Write a server's `state_dict` as the run's checkpoint, atomically and durably."""
    path = run_dir.path / CHECKPOINT_FILE
    tmp = path.with_name(f".{CHECKPOINT_FILE}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save({"format": FORMAT, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _path(run_dir: RunDir) -> Path:
    path = run_dir.path / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError("resume", str(run_dir.path), f"no {CHECKPOINT_FILE} there (a run with checkpoint = false?)")
    return path


def load(run_dir: RunDir) -> dict[str, Any]:
    """The run's checkpoint (ConfigError if it has none or it is unreadable)."""
    path = _path(run_dir)
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 (whatever torch raises for a damaged file)
        raise ConfigError("resume", str(run_dir.path), f"{CHECKPOINT_FILE} is unreadable: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError("resume", str(run_dir.path), f"{CHECKPOINT_FILE} is not a format-{FORMAT} checkpoint")
    return state


def last_round(run_dir: RunDir) -> int:
    """The last round the run's checkpoint completed, read without loading its tensors."""
    path = _path(run_dir)
    try:
        return int(torch.load(path, weights_only=True, map_location="cpu", mmap=True)["round"])
    except Exception as exc:  # noqa: BLE001
        raise ConfigError("resume", str(run_dir.path), f"{CHECKPOINT_FILE} is unreadable: {exc}") from None


def differences(cfg: Config, run_dir: RunDir) -> list[str]:
    """`key: run's value -> this value` for every key (but name, out-dir, resume) that differs."""
    stored = {k: v for k, v in run_dir.read_config().items() if k != RESOLVED_TABLE}
    if not stored:
        raise ConfigError("resume", str(run_dir.path), "not a run directory: it has no config.toml")
    theirs = Config.from_run_config(stored, check_specs=False).to_run_config()
    ours = cfg.to_run_config()
    return [f"{k}: {theirs[k]!r} -> {ours[k]!r}" for k in ours if k not in PLACE_KEYS and theirs.get(k) != ours[k]]


def check(cfg: Config) -> int:
    """Whether `cfg` can resume its run directory; returns the round it goes on from (ConfigError if not)."""
    run_dir = RunDir(cfg.resume)
    if not run_dir.path.is_dir():
        raise ConfigError("resume", cfg.resume, "no such run directory")
    diffs = differences(cfg, run_dir)
    if diffs:
        raise ConfigError(
            "resume", cfg.resume, "a run goes on only with its own config; these keys differ: " + "; ".join(diffs)
        )
    done = last_round(run_dir)
    if done >= cfg.rounds:
        raise ConfigError("resume", cfg.resume, f"the run completed all its {cfg.rounds} rounds: nothing to resume")
    return done


def rewind(run_dir: RunDir, done: int) -> list[dict[str, Any]]:
    """Drop the rows after round `done` and the summary; returns the rows kept (call it under the lock)."""
    rows = read_metrics(run_dir.metrics_path)
    kept = [r for r in rows if isinstance(r.get("round"), int) and r["round"] <= done]
    if run_dir.metrics_path.is_file():  # rewritten: a torn last line must not stay in the middle
        tmp = run_dir.metrics_path.with_name(f".{run_dir.metrics_path.name}.tmp{os.getpid()}")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(dumps_row(r) + "\n" for r in kept)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, run_dir.metrics_path)
    run_dir.summary_path.unlink(missing_ok=True)
    return kept


@contextlib.contextmanager
def locked(run_dir: RunDir, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold the run directory's lock (waits up to `wait_s` for a dying holder; ConfigError after that)."""
    if not run_dir.path.is_dir():
        raise ConfigError("resume", str(run_dir.path), "no such run directory")
    fd = os.open(run_dir.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConfigError(
                        "resume", str(run_dir.path), "another process is running this run (its lock is held)"
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # releases the lock

