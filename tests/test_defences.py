"""Hostile clients: the norm bound (reject or clip), the example cap, overflow, robust aggregation.

One client of ten (partition 0) tampers with its reply through a client mod, on the digits MLP. The
robust rules are checked against Flower's own definitions on the same inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedsqueeze import wire
from fedsqueeze.client import app as client_app
from fedsqueeze.compressors import Dense
from fedsqueeze.config import ConfigError, resolve
from fedsqueeze.feedback.robust import robust_server
from fedsqueeze.simulation.grid import run_inprocess
from fedsqueeze.tracking.rundir import load_run

# honest updates have norms near 0.3 here (lr 0.2, 5 steps), so a bound of 1 leaves them alone
COMMON = ["task=digits-mlp", "num-clients=10", "partition=iid", "rounds=12", "local-steps=5", "target-accuracy=0"]


def _tampering(kind: str, rounds: set[int] | None = None) -> ClientApp:
    """fedsqueeze's ClientApp, with partition 0 tampering with its reply (in `rounds`, or every round)."""

    def mod(msg: Message, context: Context, call_next):
        reply = call_next(msg, context)
        server_round = int(msg.content["config"]["server-round"]) if msg.metadata.message_type == "train" else 0
        if int(context.node_config["partition-id"]) != 0 or not server_round:
            return reply
        if rounds is not None and server_round not in rounds:
            return reply
        if kind == "examples":
            reply.content["metrics"]["num-examples"] = 10**12
            return reply
        record = reply.content["update"]
        for key, array in list(record.items()):
            c = wire.decode(bytes(array.data), _numel(array))
            values = c.to_dense()
            values = torch.full_like(values, 1e30) if kind == "huge" else values * 1e6
            data = wire.encode(Dense(values.numel(), values.dtype, values))
            record[key] = Array(dtype="uint8", shape=(len(data),), stype=client_app.STYPE, data=data)
        return reply

    app = ClientApp(mods=[mod])
    app.query()(client_app.query)
    app.train()(client_app.train)
    return app


def _numel(array: Array) -> int:
    from fedsqueeze.engine import plan_for

    return plan_for(resolve(overrides=COMMON)).uplink.numel


def _run(tmp_path, name: str, *extra: str, client: ClientApp | str = "fedsqueeze.client.app:app"):
    cfg = resolve(overrides=[*COMMON, f"name={name}", f"out-dir={tmp_path}", *extra])
    run_inprocess("fedsqueeze.server.app:app", client, cfg.num_clients, cfg.to_run_config(), seed=cfg.seed)
    return load_run(cfg.run_dir())


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("clean"), "clean").rows[-1]["test_accuracy"]


def test_a_scaled_update_every_round_is_rejected_by_the_norm_bound(tmp_path, clean):
    run = _run(tmp_path, "reject", "max-update-norm=1", client=_tampering("scale"))
    assert all(r["clients_rejected"] == 1 and r["clients_ok"] == 9 for r in run.rows)
    assert run.rows[-1]["test_accuracy"] > clean - 0.02
    undefended = _run(tmp_path, "open", client=_tampering("scale"))  # documented: the model is destroyed
    assert undefended.rows[-1]["test_accuracy"] < clean - 0.3


def test_clipping_keeps_the_hostile_update_small(tmp_path, clean):
    run = _run(tmp_path, "clip", "max-update-norm=1", "over-norm=clip", client=_tampering("scale"))
    assert all(r["clients_rejected"] == 0 and r["clients_ok"] == 10 for r in run.rows)
    assert run.rows[-1]["test_accuracy"] > clean - 0.02


def test_a_poisoned_round_with_ef21_is_rejected_and_memory_stays_in_agreement(tmp_path):
    clean = _run(tmp_path, "ef21-clean", "feedback=ef21", "compressor=topk(0.1)").rows[-1]["test_accuracy"]
    run = _run(tmp_path, "ef21", "feedback=ef21", "compressor=topk(0.1)", "max-update-norm=1",
               client=_tampering("scale", rounds={2}))  # fmt: skip
    assert [r["clients_rejected"] for r in run.rows][:3] == [0, 1, 0]
    assert run.rows[-1]["test_accuracy"] > clean - 0.02


def test_values_beyond_float32_and_inflated_example_counts_are_rejected_without_configuration(tmp_path, clean):
    for kind in ("huge", "examples"):
        run = _run(tmp_path, kind, client=_tampering(kind))
        assert all(r["clients_rejected"] == 1 for r in run.rows), kind
        assert run.rows[-1]["test_accuracy"] > clean - 0.02, kind


@pytest.mark.parametrize("rule", ["median", "trimmed-mean(beta=0.2)", "krum(f=1, m=3)"])
def test_robust_aggregation_survives_a_scaled_update_without_a_norm_bound(tmp_path, clean, rule):
    run = _run(tmp_path, rule.split("(")[0], f"aggregation={rule}", client=_tampering("scale"))
    assert run.rows[-1]["test_accuracy"] > clean - 0.02


def test_robust_rules_equal_flowers_on_the_same_inputs():
    gen = torch.Generator().manual_seed(0)
    vectors = [torch.randn(40, generator=gen) * (1 + i) for i in range(7)]
    vectors[3] = vectors[3] * 100  # an outlier
    weights = [float(5 + 3 * i) for i in range(7)]
    stacked = np.stack([v.numpy() for v in vectors])

    def ours(spec: str) -> np.ndarray:
        return robust_server(spec, 7, weights).aggregate(dict(enumerate(vectors))).numpy()

    np.testing.assert_allclose(ours("median"), np.median(stacked, axis=0), rtol=1e-6)
    np.testing.assert_allclose(ours("trimmed-mean(beta=0.3)"), trim_mean(stacked, 0.3), rtol=1e-5, atol=1e-6)
    contents = [
        RecordDict({"arrays": ArrayRecord({"w": Array(v.numpy())}), "metrics": _metrics(w)})
        for v, w in zip(vectors, weights, strict=True)
    ]
    for f, m in ((1, 1), (2, 3)):
        selected = select_multikrum(contents, num_malicious_nodes=f, num_nodes_to_select=m)
        theirs = aggregate_arrayrecords(selected, "num-examples")["w"].numpy()
        np.testing.assert_allclose(ours(f"krum(f={f}, m={m})"), theirs, rtol=1e-5, atol=1e-6)


def _metrics(weight: float):
    from flwr.app import MetricRecord

    return MetricRecord({"num-examples": weight})


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["aggregation=median", "feedback=ef21"], "aggregation"),
        (["aggregation=krum(f=-1)"], "aggregation"),
        (["aggregation=trimmed-mean(beta=0.5)"], "aggregation"),
        (["aggregation=average"], "aggregation"),
        (["max-update-norm=1", "over-norm=clip", "feedback=ef21"], "over-norm"),
        (["over-norm=drop"], "over-norm"),
        (["max-update-norm=-1"], "max-update-norm"),
        (["aggregation=median", "algorithm=scafflix"], "aggregation"),
    ],
)
def test_combinations_that_make_no_sense_are_refused(overrides, key):
    with pytest.raises(ConfigError) as info:
        resolve(overrides=overrides)
    assert info.value.key == key
