"""The quickstart-style Flower app of examples/flower_app, put together for tests: its train and evaluate
functions in a ClientApp with the given mods, and a ServerApp that runs a given strategy on its model."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

APP_DIR = Path(__file__).resolve().parents[1] / "examples" / "flower_app"
if str(APP_DIR) not in sys.path:
    sys.path.insert(0, str(APP_DIR))

from digits_flower import client_app as quickstart  # noqa: E402
from digits_flower.task import Net  # noqa: E402

LR = 0.1


def client_app(*mods: Any) -> ClientApp:
    """The example's own train and evaluate functions, behind `mods` (none: the stock ClientApp)."""
    app = ClientApp(mods=list(mods))
    app.train()(quickstart.train)
    app.evaluate()(quickstart.evaluate)
    return app


def initial_arrays() -> ArrayRecord:
    torch.manual_seed(0)
    return ArrayRecord(Net().state_dict())


def server_app(strategies: dict[str, Any], rounds: int, results: dict[str, Any]) -> ServerApp:
    """A ServerApp that runs each strategy in turn from the same initial model; results[name] = its Result."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        for name, strategy in strategies.items():
            results[name] = strategy.start(grid=grid, initial_arrays=initial_arrays(), num_rounds=rounds,
                                           train_config=ConfigRecord({"lr": LR}), timeout=120)  # fmt: skip

    return app


def final_accuracy(result: Any) -> float:
    """The clients' example-weighted test accuracy after the last round."""
    last = max(result.evaluate_metrics_clientapp)
    return float(result.evaluate_metrics_clientapp[last]["eval_acc"])


def num_test_examples(num_partitions: int) -> int:
    """How many test examples the clients evaluate on together."""
    from digits_flower.task import load_data

    return sum(len(load_data(p, num_partitions)[1].dataset) for p in range(num_partitions))
