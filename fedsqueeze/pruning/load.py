"""A finished run's global model and task, read back from its run directory; accuracy per split.

A run directory (`fedsqueeze simulate`) holds `config.toml` (the resolved config, which rebuilds the
same task and data split) and `model.pt` (the global model's state_dict, written when the run ends).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedsqueeze.config import Config, ConfigError, build_task, resolve

from .errors import PruneError

MODEL_FILE = "model.pt"  # as fedsqueeze.server.app writes it
CONFIG_FILE = "config.toml"


@dataclass
class LoadedRun:
    path: Path
    cfg: Config
    task: Any  # fedsqueeze.tasks.Task
    model: nn.Module


def load_run(run_dir: str | os.PathLike[str]) -> LoadedRun:
    path = Path(run_dir)
    if not path.is_dir():
        raise PruneError(f"run directory {str(path)!r} does not exist")
    model_path, config_path = path / MODEL_FILE, path / CONFIG_FILE
    if not config_path.is_file():
        raise PruneError(f"{str(path)!r} has no {CONFIG_FILE}: not a fedsqueeze run directory")
    if not model_path.is_file():
        raise PruneError(
            f"{str(path)!r} has no {MODEL_FILE}: the global model is written when a run ends "
            "(an interrupted or still running run has none)"
        )
    try:
        cfg = resolve(config_path)
        task = build_task(cfg)
    except ConfigError as exc:
        raise PruneError(f"{config_path}: {exc}") from None
    model = task.new_model()
    try:
        state = torch.load(model_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except (RuntimeError, ValueError, OSError, EOFError) as exc:
        raise PruneError(f"{model_path} is not a state_dict of this run's model ({cfg.task}): {exc}") from None
    return LoadedRun(path, cfg, task, model)


def evaluate(task: Any, model: nn.Module) -> dict[str, Any]:
    """Accuracy on the global test set and on each client's test split (NaN where a client has none)."""
    _, acc = task.evaluate(model)
    clients = []
    for c in task.clients:
        _, a = task.evaluate(model, c.test)
        clients.append(None if math.isnan(a) else float(a))
    return {"global": float(acc), "clients": clients}
