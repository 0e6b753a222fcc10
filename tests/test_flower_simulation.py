"""The quickstart-style app of examples/flower_app on Flower's simulation engine (Ray, `run_simulation`),
stock and with fedsqueeze's two lines, with FedAvg, FedAdam and FedMedian as the inner strategy: the same
accuracy within the binomial spread of the clients' test examples, and the uplink bytes cut by the codec's
factor. One simulation (one Ray start) runs every strategy in turn; `python tests/test_flower_simulation.py`
prints the table of docs/flower.md."""

from __future__ import annotations

import math
import os
import sys

import pytest
from flower_quickstart import client_app, final_accuracy, num_test_examples, server_app
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian

from fedsqueeze.flower import Compressed, compress_mod

NODES = 5
ROUNDS = 5
SPEC = "qsgd(levels=16)"


def _strategies():
    kw = {"min_train_nodes": NODES, "min_available_nodes": NODES, "min_evaluate_nodes": NODES}
    adam = {"eta": 0.01, "eta_l": 0.1}
    return {
        "FedAvg": FedAvg(**kw),
        "Compressed(FedAvg)": Compressed(FedAvg(**kw), uplink=SPEC),
        "FedAdam": FedAdam(**kw, **adam),
        "Compressed(FedAdam)": Compressed(FedAdam(**kw, **adam), uplink=SPEC),
        "FedMedian": FedMedian(**kw),
        "Compressed(FedMedian)": Compressed(FedMedian(**kw), uplink=SPEC),
    }


def measure() -> dict[str, dict[str, float]]:
    """Run every strategy on Ray; per strategy: final accuracy, uplink bytes per round, compression factor."""
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
    strategies = _strategies()
    results: dict = {}
    # the stock strategies' train messages carry no fedsqueeze settings: the mod passes them on as they are
    run_simulation(server_app(strategies, ROUNDS, results), client_app(compress_mod(uplink=SPEC)), NODES,
                   backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": 2}})  # fmt: skip
    table = {}
    for name, strategy in strategies.items():
        row = {"accuracy": final_accuracy(results[name])}
        if isinstance(strategy, Compressed):
            up = sum(r["uplink_bytes"] for r in strategy.rounds.values())
            dense = sum(r["dense_uplink_bytes"] for r in strategy.rounds.values())
            row |= {"uplink_per_round": up / ROUNDS, "dense_per_round": dense / ROUNDS, "factor": dense / up,
                    "ok": min(r["clients_ok"] for r in strategy.rounds.values())}  # fmt: skip
        table[name] = row
    return table


@pytest.mark.slow
def test_two_lines_keep_accuracy_and_cut_uplink_bytes_on_flowers_simulation_engine():
    table = measure()
    m = num_test_examples(NODES)
    for inner in ("FedAvg", "FedAdam", "FedMedian"):
        stock, packed = table[inner], table[f"Compressed({inner})"]
        p = stock["accuracy"]
        # two runs' accuracies on the same m examples: 4 standard deviations of their difference
        tolerance = 4 * math.sqrt(2 * p * (1 - p) / m)
        assert abs(packed["accuracy"] - p) <= tolerance, (inner, table)
        assert packed["ok"] == NODES
        assert packed["accuracy"] > 0.5, table  # it learns (chance is 0.1)
        assert packed["factor"] > 8, table


if __name__ == "__main__":
    rows = measure()
    print("| strategy | final accuracy | uplink bytes per round | compression |")
    print("|---|---:|---:|---:|")
    for name, row in rows.items():
        if "factor" in row:
            up = row["uplink_per_round"]
            print(f"| `{name}` | {100 * row['accuracy']:.2f} % | {up:,.0f} | {row['factor']:.1f}x |")
        else:
            dense = rows[f"Compressed({name})"]["dense_per_round"]
            print(f"| `{name}` | {100 * row['accuracy']:.2f} % | {dense:,.0f} (float32) | 1.0x |")
    sys.exit(0)
