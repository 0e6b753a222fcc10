"""The run directory `runs/<name>/`: config.toml, metrics.jsonl and summary.json.

metrics.jsonl gets one JSON object per round, flushed and fsync'ed before `append` returns, so an
interrupted run keeps every round it finished. Non-finite floats (a diverged loss) are written as
null, which keeps every line valid JSON; summary.json records `"diverged": true` in that case.
summary.json and config.toml are replaced atomically.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import TrackingError
from .ledger import Ledger, summarize
from .toml_writer import write_toml

CONFIG_FILE = "config.toml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@-]*$")
#: what a run name may contain (a run directory's name)
RUN_NAME_RULE = "starts with a letter or digit and contains only letters, digits and ._+=@-"


def valid_run_name(name: object) -> bool:
    return isinstance(name, str) and bool(_SAFE_NAME.match(name)) and name not in (".", "..")


Exist = Literal["unique", "overwrite", "error"]


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _json_safe(value.item())
    if isinstance(value, Path):
        return str(value)
    return value


def dumps_row(row: Mapping[str, Any]) -> str:
    """One metrics.jsonl line (without the newline): strict JSON, non-finite floats as null."""
    return json.dumps(_json_safe(row), allow_nan=False, separators=(", ", ": "))


class RunDir:
    """A run's directory: where config.toml, metrics.jsonl and summary.json live."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def summary_path(self) -> Path:
        return self.path / SUMMARY_FILE

    @classmethod
    def create(
        cls,
        out_dir: str | os.PathLike[str],
        name: str,
        config: Mapping[str, Any] | None = None,
        *,
        exist: Exist = "unique",
    ) -> RunDir:
        """Make `out_dir/name/` and write its config.toml.

        If that directory already holds files: exist="unique" picks name-2, name-3, ... (nothing recorded
        is ever overwritten), "overwrite" deletes its run files first, "error" raises TrackingError.
        """
        if not valid_run_name(name):
            raise TrackingError(
                f"run name {name!r} must start with a letter or digit and contain only letters, digits and ._+=@-"
            )
        if exist not in ("unique", "overwrite", "error"):
            raise TrackingError(f"exist={exist!r}; valid choices: 'unique', 'overwrite', 'error'")
        root = Path(out_dir)
        path = root / name
        if path.exists() and any(path.iterdir()):
            if exist == "error":
                raise TrackingError(f"run directory {str(path)!r} already exists and is not empty")
            if exist == "overwrite":
                for f in (CONFIG_FILE, METRICS_FILE, SUMMARY_FILE):
                    (path / f).unlink(missing_ok=True)
                for png in path.glob("*.png"):
                    png.unlink()
            else:
                k = 2
                while (root / f"{name}-{k}").exists():
                    k += 1
                path = root / f"{name}-{k}"
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        if config is not None:
            run.write_config(config)
        return run

    def write_config(self, config: Mapping[str, Any]) -> None:
        write_toml(self.config_path, config)

    def append(self, row: Mapping[str, Any]) -> None:
        """Append one row to metrics.jsonl and make it durable (flush + fsync) before returning."""
        line = dumps_row(row) + "\n"
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        tmp = self.summary_path.with_name(SUMMARY_FILE + ".tmp")
        tmp.write_text(json.dumps(_json_safe(summary), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        os.replace(tmp, self.summary_path)

    def read_rows(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path)

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            return {}
        toml = _toml_reader()
        if toml is None:  # Python 3.10 without tomli: the report falls back to directory names
            return {}
        try:
            return toml.loads(self.config_path.read_text(encoding="utf-8"))
        except toml.TOMLDecodeError as exc:
            raise TrackingError(f"{str(self.config_path)!r} is not valid TOML: {exc}") from exc

    def read_summary(self) -> dict[str, Any]:
        if not self.summary_path.is_file():
            return {}
        try:
            return json.loads(self.summary_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise TrackingError(f"{str(self.summary_path)!r} is not valid JSON: {exc}") from exc


def _toml_reader() -> Any:
    try:
        import tomllib

        return tomllib
    except ImportError:  # Python 3.10
        try:
            import tomli

            return tomli
        except ImportError:
            return None


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a metrics.jsonl file. A torn last line (the process died mid-write) is skipped;
    a bad line elsewhere raises TrackingError with its line number."""
    p = Path(path)
    if not p.is_file():
        return []
    lines = p.read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if i == len(lines):
                break
            raise TrackingError(f"{str(p)!r} line {i} is not valid JSON: {exc}") from exc
        if not isinstance(row, dict):
            raise TrackingError(f"{str(p)!r} line {i} is not a JSON object")
        rows.append(row)
    return rows


@dataclass
class Run:
    """A recorded run, read back from its directory."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        name = self.config.get("name")
        return str(name) if isinstance(name, str) and name else self.path.name

    @property
    def is_convex(self) -> bool:
        return any(r.get("subopt") is not None for r in self.rows)


def load_run(path: str | os.PathLike[str]) -> Run:
    run = RunDir(path)
    if not run.path.is_dir():
        raise TrackingError(f"run directory {str(run.path)!r} does not exist")
    if not run.metrics_path.is_file():
        raise TrackingError(f"{str(run.path)!r} is not a run directory: it has no {METRICS_FILE}")
    return Run(run.path, run.read_config(), run.read_rows(), run.read_summary())


class Tracker:
    """Ledger + run directory: `record` appends each round durably, `finish` writes summary.json.

    tracker = Tracker(RunDir.create("runs", "demo", config), convex=task.is_convex, target_accuracy=0.9)
    try:
        for t in range(rounds):
            tracker.record(t + 1, clients_sampled=..., uplink_bytes=..., ...)
    finally:
        tracker.finish(status="completed" or "interrupted")
    """

    def __init__(
        self,
        run_dir: RunDir | None = None,
        *,
        convex: bool = False,
        target_accuracy: float | None = None,
        resume: bool = False,
    ) -> None:
        self.run_dir = run_dir
        self.target_accuracy = target_accuracy
        rows = run_dir.read_rows() if (resume and run_dir is not None) else []
        self.ledger = Ledger(convex=convex, rows=rows)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.ledger.rows

    def record(self, round: int, **metrics: Any) -> dict[str, Any]:
        row = self.ledger.record(round, **metrics)
        if self.run_dir is not None:
            self.run_dir.append(row)
        return row

    def summary(self, **extra: Any) -> dict[str, Any]:
        return self.ledger.summary(target_accuracy=self.target_accuracy, **extra)

    def finish(self, *, status: str = "completed", **extra: Any) -> dict[str, Any]:
        """Write summary.json (status, final metrics, totals, bytes to target, anything extra) and return it.

        The summary covers the rounds metrics.jsonl holds: a Ctrl-C between a round's ledger entry and
        its line on disk must not leave a summary that counts a round the file lacks."""
        if self.run_dir is None:
            return self.summary(status=status, **extra)
        rows = self.ledger.rows[: len(self.run_dir.read_rows())]
        summary = summarize(rows, target_accuracy=self.target_accuracy, status=status, **extra)
        self.run_dir.write_summary(summary)
        return summary
