"""The ServerApp, as in Flower's PyTorch quickstart; the one fedsqueeze line wraps the strategy."""

from __future__ import annotations

from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from digits_flower.task import Net

from fedsqueeze.flower import Compressed

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    num_rounds = int(context.run_config.get("num-server-rounds", 5))
    lr = float(context.run_config.get("lr", 0.1))
    arrays = ArrayRecord(Net().state_dict())
    strategy = Compressed(FedAvg(fraction_train=1.0), uplink="qsgd(levels=16)")
    result = strategy.start(grid=grid, initial_arrays=arrays, train_config=ConfigRecord({"lr": lr}),
                            num_rounds=num_rounds)  # fmt: skip
    print(result)
