"""fedsqueeze.flower's client mod and strategy wrapper around the quickstart-style app of examples/flower_app,
through the in-process Grid (the real ClientApp and strategies, no Ray): exact reconstruction, EF21 as its
definition says, a compressed broadcast, Flower's DP clipping, spec mismatches and refused combinations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flower_quickstart import client_app, final_accuracy, initial_arrays, server_app
from flwr.app import Context, Message
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    FedAvg,
    FedMedian,
    Krum,
)

from fedsqueeze import feedback as fb
from fedsqueeze.config import ConfigError
from fedsqueeze.flower import Compressed, compress_mod
from fedsqueeze.flower.settings import Layout, uplink_plan
from fedsqueeze.simulation.grid import run_inprocess

NODES = 4


def _run(strategies, client, rounds=2):
    results: dict = {}
    run_inprocess(server_app(strategies, rounds, results), client, NODES, seed=0)
    return results


def _flat(record) -> np.ndarray:
    return np.concatenate([a.numpy().reshape(-1) for a in record.values()])


def _fedavg(**kw):
    return FedAvg(min_train_nodes=NODES, min_available_nodes=NODES, min_evaluate_nodes=NODES, **kw)


def test_identity_compression_gives_stock_fedavgs_model():
    stock = _run({"stock": _fedavg()}, client_app())["stock"]
    wrapped = _run({"wrapped": Compressed(_fedavg())}, client_app(compress_mod()))["wrapped"]
    assert np.allclose(_flat(wrapped.arrays), _flat(stock.arrays), rtol=0, atol=1e-6)
    assert final_accuracy(wrapped) == pytest.approx(final_accuracy(stock), abs=1e-9)


class Recorder:
    """A mod inside compress_mod: the dense update each client's train function produced, per round."""

    def __init__(self) -> None:
        self.updates: dict[tuple[int, int], np.ndarray] = {}

    def __call__(self, msg: Message, context: Context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == "train":
            before = _flat(msg.content["arrays"])
            after = _flat(reply.content["arrays"])
            key = (int(msg.content["config"]["server-round"]), int(context.node_config["partition-id"]))
            self.updates[key] = after - before
        return reply


def test_ef21_through_mod_and_wrapper_follows_its_definition():
    """Round by round: g_i <- g_i + C(v_i - g_i) (first message exact), g = mean_i g_i, x <- x + g."""
    recorder = Recorder()
    strategy = Compressed(_fedavg(), uplink="topk(0.1)", feedback="ef21")
    rounds = 3
    result = _run({"ef21": strategy}, client_app(compress_mod(uplink="topk(0.1)", feedback="ef21"), recorder),
                  rounds)["ef21"]  # fmt: skip
    layout = Layout.of({k: a.numpy() for k, a in initial_arrays().items()})
    mech = fb.build("ef21", uplink_plan(strategy.settings, layout), dim=sum(int(np.prod(s)) for s in layout.shapes))
    states: dict[int, dict] = {i: {} for i in range(NODES)}
    x = torch.from_numpy(_flat(initial_arrays()).astype(np.float32))
    for r in range(1, rounds + 1):
        g = torch.zeros_like(x)
        for i in range(NODES):
            mech.client_step(torch.from_numpy(recorder.updates[(r, i)]), states[i])
            g += states[i]["feedback.g"] / NODES
        x = x + g
    assert np.allclose(_flat(result.arrays), x.numpy(), rtol=0, atol=2e-6)
    assert all(row["clients_ok"] == NODES and row["clients_dropped"] == 0 for row in strategy.rounds.values())
    # the first message is exact (init=full), the later ones top-10 %
    assert strategy.rounds[2]["uplink_bytes"] < 0.25 * strategy.rounds[2]["dense_uplink_bytes"]


def test_compressed_broadcast_clients_start_from_the_decoded_model():
    recorder = Recorder()
    strategy = Compressed(_fedavg(), downlink="fp16")
    stock = _run({"s": _fedavg()}, client_app(), rounds=3)["s"]
    result = _run({"fp16": strategy}, client_app(compress_mod(downlink="fp16"), recorder), rounds=3)["fp16"]
    dense = 4 * NODES * len(_flat(initial_arrays()))
    assert all(0.45 * dense < row["downlink_bytes"] < 0.55 * dense for row in strategy.rounds.values())
    assert final_accuracy(result) == pytest.approx(final_accuracy(stock), abs=0.02)


def test_flower_client_side_dp_clipping_goes_inside_the_mod_and_wrapper():
    clip = 0.05
    recorder = Recorder()
    strategy = Compressed(DifferentialPrivacyClientSideFixedClipping(_fedavg(), 0.0, clip, NODES))
    _run({"dp": strategy}, client_app(compress_mod(), fixedclipping_mod, recorder))
    norms = [float(np.linalg.norm(v)) for v in recorder.updates.values()]
    assert max(norms) > clip  # the train function's own updates are longer than the bound ...
    assert all(row["clients_ok"] == NODES for row in strategy.rounds.values())
    # ... and the one applied: with noise 0 the model moved by the mean of clipped updates
    result = _run({"dp": Compressed(DifferentialPrivacyClientSideFixedClipping(_fedavg(), 0.0, clip, NODES))},
                  client_app(compress_mod(), fixedclipping_mod), rounds=1)["dp"]  # fmt: skip
    moved = np.linalg.norm(_flat(result.arrays) - _flat(initial_arrays()))
    assert moved <= clip * (1 + 1e-5)


def test_mismatched_specs_are_a_clear_error_reply():
    strategy = Compressed(_fedavg(), uplink="topk(0.2)")
    _run({"bad": strategy}, client_app(compress_mod(uplink="topk(0.1)")), rounds=1)
    assert strategy.rounds[1]["clients_ok"] == 0
    errors = []

    def collect(msg, context, call_next):
        reply = call_next(msg, context)
        if reply.has_error():
            errors.append(reply.error.reason)
        return reply

    _run({"bad": Compressed(_fedavg(), uplink="topk(0.2)")}, client_app(collect, compress_mod(uplink="topk(0.1)")),
         rounds=1)  # fmt: skip
    assert errors and all("disagree" in e and "'topk(0.1)' here" in e and "'topk(0.2)' in the message" in e
                          for e in errors)  # fmt: skip


def test_replies_of_a_client_without_the_mod_are_dropped_and_counted():
    strategy = Compressed(_fedavg(), uplink="topk(0.1)")
    _run({"plain": strategy}, client_app(), rounds=1)
    assert strategy.rounds[1]["clients_ok"] == 0 and strategy.rounds[1]["clients_dropped"] == NODES


@pytest.mark.parametrize("inner", [FedMedian(), Krum(), DifferentialPrivacyClientSideFixedClipping(Krum(), 1, 1, 2)])
def test_a_robust_inner_strategy_with_memory_increments_is_refused(inner):
    with pytest.raises(ConfigError, match="needs each client's own update"):
        Compressed(inner, uplink="topk(0.1)", feedback="ef21")
    Compressed(inner, uplink="topk(0.1)", feedback="ef")  # EF's messages are compressed updates


def test_bad_settings_fail_when_the_apps_are_built():
    with pytest.raises(ConfigError, match="compressor"):
        compress_mod(uplink="topk(2)")
    with pytest.raises(ConfigError, match="feedback"):
        Compressed(FedAvg(), feedback="ef22")
    with pytest.raises(ValueError, match="already Compressed"):
        Compressed(Compressed(FedAvg()))
