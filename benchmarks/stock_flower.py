"""The reference a user would pick instead of fedsqueeze: stock Flower, no compression.

Flower's own `FedAvg` strategy (`flwr.serverapp.strategy.FedAvg`) and a minimal ClientApp whose
`@app.train()` loads the ArrayRecord, runs the same plain local SGD steps on the same task
(big_task) and returns the new ArrayRecord, on Flower's simulation engine
(`flwr.simulation.run_simulation`, Ray backend, one CPU per client). Centralised evaluation on the
global test set after each round, as fedsqueeze's ServerApp does; no federated evaluation.

`run(options)` returns the round times measured inside the ServerApp: from the strategy's
`configure_train` of a round to the end of that round's centralised evaluation (Ray start-up,
node start-up and the initial evaluation are outside every round).
"""

from __future__ import annotations

import functools
import time
from typing import Any

import big_task
import torch
import torch.nn.functional as F
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg


@functools.lru_cache(maxsize=2)
def task_for(num_clients: int, seed: int, model_opts: tuple[tuple[str, int], ...]):
    return big_task.build(num_clients, "iid", seed, **dict(model_opts))


def make_client_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        cfg = msg.content["config"]
        opts = tuple(sorted((k.removeprefix("model-"), int(v)) for k, v in cfg.items() if k.startswith("model-")))
        task = task_for(int(context.node_config["num-partitions"]), int(cfg["seed"]), opts)
        pid = int(context.node_config["partition-id"])
        data = task.clients[pid].train
        model = task.build_model()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        loss = big_task.local_steps(model, data.x, data.y, int(cfg["steps"]), int(cfg["batch"]), float(cfg["lr"]),
                           int(cfg["seed"]) * 100_003 + int(cfg["server-round"]) * 1009 + pid)  # fmt: skip
        metrics = MetricRecord({"train-loss": loss, "num-examples": len(data.y)})
        return Message(RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": metrics}), reply_to=msg)

    return app


class TimedFedAvg(FedAvg):
    """FedAvg that notes when each round's training starts."""

    def __init__(self, starts: dict[int, float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.starts = starts

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        self.starts[server_round] = time.perf_counter()
        return super().configure_train(server_round, arrays, config, grid)


def run(num_clients: int, rounds: int, steps: int, batch: int, lr: float, seed: int,
        model_opts: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    starts: dict[int, float] = {}
    ends: dict[int, float] = {}
    evals: dict[int, float] = {}
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        task = task_for(num_clients, seed, tuple(sorted(model_opts.items())))
        model = task.new_model(seed)
        test = task.global_test

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            with torch.no_grad():
                out = model(test.x)
            acc = float((out.argmax(1) == test.y).float().mean())
            ends[server_round] = time.perf_counter()
            evals[server_round] = acc
            return MetricRecord({"accuracy": acc, "loss": float(F.cross_entropy(out, test.y))})

        strategy = TimedFedAvg(starts, fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=num_clients,
                               min_train_nodes=num_clients)  # fmt: skip
        config = {"steps": steps, "batch": batch, "lr": lr, "seed": seed}
        config.update({f"model-{k}": v for k, v in model_opts.items()})
        strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=rounds, train_config=ConfigRecord(config),
                       evaluate_fn=evaluate)  # fmt: skip

    from flwr.simulation import run_simulation

    t0 = time.perf_counter()
    run_simulation(
        server_app=server,
        client_app=make_client_app(),
        num_supernodes=num_clients,
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"include_dashboard": False, "log_to_driver": False},
        },
    )
    wall = time.perf_counter() - t0
    round_s = [ends[r] - starts[r] for r in sorted(starts) if r in ends]
    return {"round_s": round_s, "wall_s": wall, "rounds_s": sum(round_s), "test_accuracy": evals}
