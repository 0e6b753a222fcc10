"""fedsqueeze's ServerApp and ClientApp end to end through the in-process Grid.

Small models, few clients and rounds: every test here takes a second or two.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.clientapp import ClientApp

from fedsqueeze import wire
from fedsqueeze.client import app as client_app
from fedsqueeze.compressors import build
from fedsqueeze.config import Config, build_task, resolve
from fedsqueeze.simulation.grid import run_inprocess as run_apps
from fedsqueeze.simulation.runner import simulate
from fedsqueeze.tracking import METRIC_KEYS, load_run

SMALL = ["num-clients=4", "rounds=2", "local-steps=3", "batch-size=16", "target-accuracy=0.5"]


def _cfg(tmp_path, *overrides: str) -> Config:
    return resolve(overrides=[*SMALL, f"out-dir={tmp_path}", *overrides])


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def test_run_writes_config_metrics_summary_and_model(tmp_path):
    cfg = _cfg(tmp_path, "name=basic", "compressor=topk(0.1)")
    seen = []
    result = simulate(cfg, observer=lambda event, data: seen.append(event))
    assert seen[0] == "start" and seen.count("round") == 2 and seen[-1] == "finish"
    run = load_run(result.run_dir)
    assert result.run_dir == tmp_path / "basic"
    # config.toml is the resolved config, with the folder the runner gave the clients' state
    assert Config.from_run_config(run.config) == cfg.replace(state_dir=str(result.run_dir / "clients"))
    assert [r["round"] for r in run.rows] == [1, 2]
    for row in run.rows:
        assert set(METRIC_KEYS) - {"subopt", "grad_norm_sq", "dist_sq"} <= set(row)
        assert row["clients_sampled"] == row["clients_ok"] == 4 and row["clients_failed"] == 0
        assert row["uplink_bytes"] > 0 and row["downlink_bytes"] > 0
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert 0.0 < row["compression_error"] < 1.0
    assert run.rows[1]["cum_uplink_bytes"] == run.rows[0]["uplink_bytes"] + run.rows[1]["uplink_bytes"]
    assert run.summary["status"] == "completed"
    assert run.summary["totals"]["uplink_bytes"] == run.rows[-1]["cum_uplink_bytes"]
    state = torch.load(result.run_dir / "model.pt")
    assert set(state) == {name for name, _ in build_task(cfg).new_model().named_parameters()}


def test_bytes_are_payload_lengths(tmp_path):
    """Uplink bytes are the lengths of the payloads the clients sent, which the test rebuilds."""
    cfg = _cfg(tmp_path, "compressor=identity", "rounds=1")
    d = sum(p.numel() for p in build_task(cfg).new_model().parameters())
    one = len(wire.encode(build("identity").compress(torch.zeros(d))))
    rows = simulate(cfg).rows
    assert rows[0]["uplink_bytes"] == 4 * one  # identity payload length does not depend on the values
    assert rows[0]["downlink_bytes"] == 4 * one  # the exact float32 broadcast, to 4 clients
    assert 4 * d * 4 <= rows[0]["uplink_bytes"] < 4 * d * 4 + 4 * 64
    sparse = simulate(cfg.replace(compressor="topk(0.01)", name="sparse")).rows
    assert sparse[0]["uplink_bytes"] < rows[0]["uplink_bytes"] / 10


@pytest.mark.parametrize(
    "overrides",
    [
        ["compressor=identity"],
        ["compressor=qsgd(levels=4)", "partition=iid"],
        ["compressor=topk(0.05) | qsgd(levels=16)", "partition=shards(3)"],
        ["compressor=powersgd(rank=2)", "dense-below=100"],
        ["compressor=sign", "rules=net.1.weight=topk(0.1); *.bias=identity", "downlink=fp16"],
        ["compressor=randk(0.2)", "cohort-size=0.5", "downlink=qsgd(levels=64)"],
        ["task=digits-logreg", "compressor=natural", "batch-size=0"],
        ["task=digits-cnn", "compressor=bf16", "local-epochs=0.2"],
        ["task=synthetic-logreg(alpha=0.5, beta=0.5)", "partition=default", "compressor=topk(0.2)"],
    ],
    ids=lambda o: " ".join(o),
)
def test_compressors_partitions_tasks(tmp_path, overrides):
    cfg = _cfg(tmp_path, *overrides)
    result = simulate(cfg)
    rows = result.rows
    assert len(rows) == 2
    assert all(r["clients_failed"] == 0 and r["clients_ok"] == cfg.cohort_count() for r in rows)
    assert all(math.isfinite(r["test_loss"]) and math.isfinite(r["train_loss"]) for r in rows)
    task = build_task(cfg)
    if task.is_convex:
        assert all(r["subopt"] >= -1e-9 and r["grad_norm_sq"] >= 0 and r["dist_sq"] >= 0 for r in rows)
        assert (result.run_dir / "optimum.json").exists()
    else:
        assert "subopt" not in rows[0]


def test_rules_and_threshold_make_one_payload_per_group(tmp_path):
    cfg = _cfg(tmp_path, "compressor=topk(0.1)", "dense-below=100", "rules=net.3.weight=qsgd(levels=8)")
    from fedsqueeze.engine import plan_for

    client = plan_for(cfg)
    keys = client.uplink.keys()
    assert keys == ["default", "dense", "tensor:net.3.weight"]
    groups = {g.key: [s.name for s in g.slots] for g in client.uplink.groups}
    assert groups["dense"] == ["net.1.bias", "net.3.bias"]  # 64 and 10 elements
    assert groups["default"] == ["net.1.weight"]
    assert groups["tensor:net.3.weight"] == ["net.3.weight"]
    # the dense group is not contiguous in the flat vector: split and join must invert each other
    v = torch.randn(client.uplink.numel)
    assert torch.equal(client.uplink.join(client.uplink.split(v)), v)
    rows = simulate(cfg).rows
    assert rows[-1]["clients_failed"] == 0


def test_rule_matching_no_parameter_is_a_config_error(tmp_path):
    from fedsqueeze.config import ConfigError
    from fedsqueeze.engine import Server

    cfg = _cfg(tmp_path, "rules=fc9.weight=topk(0.1)")
    with pytest.raises(ConfigError, match="matches no parameter") as info:
        Server(cfg)
    assert "net.1.weight" in str(info.value)


def test_same_config_same_metrics(tmp_path):
    cfg = _cfg(tmp_path, "compressor=randk(0.1)", "cohort-size=2", "rounds=3")
    a = simulate(cfg.replace(name="a")).rows
    b = simulate(cfg.replace(name="b")).rows
    assert _strip(a) == _strip(b)
    c = simulate(cfg.replace(name="c", seed=1)).rows
    assert _strip(a) != _strip(c)


def test_cohort_sampling_is_seeded_by_round(tmp_path):
    cfg = _cfg(tmp_path, "num-clients=6", "cohort-size=2", "rounds=4")
    from fedsqueeze.engine import Server

    coord = Server(cfg)
    picks = [list(coord.select(r).ids) for r in range(1, 5)]
    assert all(len(p) == 2 and p == sorted(p) for p in picks)
    assert len({tuple(p) for p in picks}) > 1
    assert picks == [list(Server(cfg).select(r).ids) for r in range(1, 5)]
    rows = simulate(cfg).rows
    assert [r["clients_sampled"] for r in rows] == [2, 2, 2, 2]


def test_run_directory_is_never_overwritten(tmp_path):
    cfg = _cfg(tmp_path, "rounds=1", "name=same")
    first = simulate(cfg).run_dir
    second = simulate(cfg).run_dir
    assert first != second and first.exists() and second.exists()


# ---- faults ----------------------------------------------------------------------------------


def _faulty_client(kind: str, bad_partition: int = 1) -> ClientApp:
    """fedsqueeze's ClientApp with one partition that misbehaves."""

    def fault_mod(msg: Message, context: Context, call_next):
        pid = int(context.node_config["partition-id"])
        if pid != bad_partition or msg.metadata.message_type != "train":
            return call_next(msg, context)
        if kind == "raise":
            raise RuntimeError("this client breaks on purpose")
        if kind == "sleep":
            time.sleep(1.0)
            return call_next(msg, context)
        reply = call_next(msg, context)
        record = reply.content["update"]
        if kind == "corrupt":
            key, array = next(iter(record.items()))
            data = bytearray(array.data)
            data[len(data) // 2 :] = b"\xff" * (len(data) - len(data) // 2)
            record[key] = Array(dtype="uint8", shape=(len(data),), stype=client_app.STYPE, data=bytes(data))
        elif kind == "truncate":
            key, array = next(iter(record.items()))
            record[key] = Array(dtype="uint8", shape=(5,), stype=client_app.STYPE, data=bytes(array.data[:5]))
        elif kind == "wrong-stype":
            key, array = next(iter(record.items()))
            record[key] = Array(dtype="uint8", shape=(len(array.data),), stype="numpy.ndarray", data=array.data)
        elif kind == "missing-group":
            reply.content["update"] = ArrayRecord({})
        elif kind == "bad-examples":
            reply.content["metrics"]["num-examples"] = -3
        return reply

    app = ClientApp(mods=[fault_mod])
    app.query()(client_app.query)
    app.train()(client_app.train)
    return app


def _run_with(client: ClientApp, cfg: Config):
    run_apps("fedsqueeze.server.app:app", client, cfg.num_clients, cfg.to_run_config(), seed=cfg.seed)
    return load_run(cfg.run_dir())


@pytest.mark.parametrize("kind", ["raise", "corrupt", "truncate", "wrong-stype", "missing-group", "bad-examples"])
def test_failed_client_is_counted_and_round_goes_on(tmp_path, kind, caplog):
    cfg = _cfg(tmp_path, f"name={kind}", "compressor=topk(0.2)")
    with caplog.at_level("WARNING", logger="fedsqueeze"):
        run = _run_with(_faulty_client(kind), cfg)
    assert [r["clients_failed"] for r in run.rows] == [1, 1]
    assert [r["clients_ok"] for r in run.rows] == [3, 3]
    assert run.summary["status"] == "completed"
    assert run.rows[-1]["test_accuracy"] > 0
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "partition 1" in messages and "node " in messages  # logged with its node id


def test_slow_client_times_out(tmp_path):
    cfg = _cfg(tmp_path, "name=slow", "rounds=1", "round-timeout=0.5")
    run = _run_with(_faulty_client("sleep", bad_partition=0), cfg)
    assert run.rows[0]["clients_failed"] == 1 and run.rows[0]["clients_ok"] == 3
    time.sleep(0.7)  # let the abandoned call end before the next test


def test_a_node_that_misses_the_partition_query_joins_in_a_later_round(tmp_path, caplog):
    failed_once: set[int] = set()

    def query_fails_once(msg: Message, context: Context, call_next):
        # the partition query (the server asks for the federation's size before it, group "federation")
        discovery = msg.metadata.message_type == "query" and msg.metadata.group_id == "discover"
        if discovery and context.node_id not in failed_once:
            failed_once.add(context.node_id)
            if int(context.node_config["partition-id"]) == 2:
                raise RuntimeError("not ready yet")
        return call_next(msg, context)

    app = ClientApp(mods=[query_fails_once])
    app.query()(client_app.query)
    app.train()(client_app.train)
    cfg = _cfg(tmp_path, "name=late", "rounds=3")
    with caplog.at_level("WARNING", logger="fedsqueeze"):
        run = _run_with(app, cfg)
    assert [r["clients_failed"] for r in run.rows] == [1, 0, 0]
    assert [r["clients_ok"] for r in run.rows] == [3, 4, 4]
    assert any("partition(s) [2]" in r.getMessage() for r in caplog.records)


def test_too_few_replies_skip_the_round(tmp_path, caplog):
    cfg = _cfg(tmp_path, "name=skip", "min-replies=4")
    with caplog.at_level("WARNING", logger="fedsqueeze"):
        run = _run_with(_faulty_client("raise"), cfg)
    assert [r["clients_ok"] for r in run.rows] == [3, 3]
    assert [r["applied"] for r in run.rows] == [False, False]
    # the model never changed: same evaluation in both rounds
    assert run.rows[0]["test_loss"] == run.rows[1]["test_loss"]
    assert any("skipped" in r.getMessage() and "min-replies" in r.getMessage() for r in caplog.records)


def test_interrupted_run_keeps_its_rows(tmp_path):
    cfg = _cfg(tmp_path, "name=stop", "rounds=5")

    def stop_after_two(event, data):
        if event == "round" and data["round"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        simulate(cfg, observer=stop_after_two)
    run = load_run(cfg.run_dir())
    assert [r["round"] for r in run.rows] == [1, 2]
    assert run.summary["status"] == "interrupted"
    summary = json.loads((cfg.run_dir() / "summary.json").read_text())
    assert summary["rounds"] == 2
