"""The in-process Grid on a tiny ServerApp/ClientApp pair, before any fedsqueeze logic."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from fedsqueeze.simulation.grid import InProcessGrid, run_inprocess

client = ClientApp()


@client.train()
def train(msg: Message, context: Context) -> Message:
    """Adds its partition id to the array; counts its calls in the node state."""
    pid = int(context.node_config["partition-id"])
    behaviour = str(msg.content["config"]["behaviour"])
    if behaviour == "raise" and pid == 1:
        raise RuntimeError("boom on purpose")
    if behaviour == "sleep" and pid == 0:
        time.sleep(0.5)
    calls = int(context.state["count"]["calls"]) + 1 if "count" in context.state else 1
    context.state["count"] = MetricRecord({"calls": calls})
    x = msg.content["arrays"]["x"].numpy() + pid
    content = RecordDict(
        {"arrays": ArrayRecord({"x": Array(x)}), "metrics": MetricRecord({"pid": pid, "calls": calls, "n": 1})}
    )
    return Message(content, reply_to=msg)


server = ServerApp()
RESULTS: dict[str, object] = {}


@server.main()
def main(grid: Grid, context: Context) -> None:
    nodes = list(grid.get_node_ids())
    rounds = int(context.run_config["rounds"])
    behaviour = str(context.run_config["behaviour"])
    history = []
    for rnd in range(1, rounds + 1):
        msgs = [
            Message(
                RecordDict(
                    {
                        "arrays": ArrayRecord({"x": Array(np.zeros(3, dtype=np.float32))}),
                        "config": ConfigRecord({"behaviour": behaviour}),
                    }
                ),
                dst_node_id=n,
                message_type="train",
                group_id=str(rnd),
            )
            for n in nodes
        ]
        replies = list(grid.send_and_receive(msgs, timeout=float(context.run_config["timeout"])))
        history.append(replies)
        # the message objects now carry their ids
        assert all(m.metadata.message_id for m in msgs)
        assert {r.metadata.reply_to_message_id for r in replies} <= {m.metadata.message_id for m in msgs}
    RESULTS["history"] = history
    RESULTS["nodes"] = nodes


def _run(behaviour: str = "ok", rounds: int = 2, timeout: float = 30.0, n: int = 3) -> InProcessGrid:
    RESULTS.clear()
    grid, _ = run_inprocess(server, client, n, {"rounds": rounds, "behaviour": behaviour, "timeout": timeout})
    return grid


def test_calls_client_app_per_node_and_keeps_state():
    grid = _run(rounds=3)
    history = RESULTS["history"]
    assert len(history) == 3
    for rnd, replies in enumerate(history, start=1):
        assert len(replies) == 3
        pids = sorted(int(r.content["metrics"]["pid"]) for r in replies)
        assert pids == [0, 1, 2]
        for r in replies:
            pid = int(r.content["metrics"]["pid"])
            assert r.content["metrics"]["calls"] == rnd  # state survives across rounds
            np.testing.assert_array_equal(r.content["arrays"]["x"].numpy(), np.full(3, pid, np.float32))
            assert r.metadata.src_node_id == grid.node_for_partition(pid)
    for nid in grid.get_node_ids():
        assert grid.context(nid).state["count"]["calls"] == 3
        assert grid.context(nid).node_config["num-partitions"] == 3


def test_node_ids_are_deterministic_and_not_partition_ids():
    _run(rounds=1)
    first = RESULTS["nodes"]
    _run(rounds=1)
    assert RESULTS["nodes"] == first
    assert set(first).isdisjoint({0, 1, 2})


def test_exception_becomes_error_reply_and_state_is_untouched():
    grid = _run(behaviour="raise", rounds=2)
    for replies in RESULTS["history"]:
        assert len(replies) == 3
        errors = [r for r in replies if r.has_error()]
        assert len(errors) == 1
        assert errors[0].error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
        assert "boom on purpose" in errors[0].error.reason
        assert errors[0].metadata.src_node_id == grid.node_for_partition(1)
    assert "count" not in grid.context(grid.node_for_partition(1)).state
    assert grid.context(grid.node_for_partition(0)).state["count"]["calls"] == 2


def test_timeout_drops_the_slow_reply():
    grid = _run(behaviour="sleep", rounds=1, timeout=0.2)
    replies = RESULTS["history"][0]
    assert sorted(int(r.content["metrics"]["pid"]) for r in replies) == [1, 2]
    time.sleep(0.5)  # let the abandoned call end
    assert "count" not in grid.context(grid.node_for_partition(0)).state


def test_push_and_pull():
    grid = InProcessGrid(client, 2, {})
    from fedsqueeze.simulation.grid import task_identity

    with task_identity(7):
        msgs = [
            Message(
                RecordDict(
                    {
                        "arrays": ArrayRecord({"x": Array(np.zeros(3, np.float32))}),
                        "config": ConfigRecord({"behaviour": "ok"}),
                    }
                ),
                dst_node_id=n,
                message_type="train",
            )
            for n in grid.get_node_ids()
        ]
        ids = list(grid.push_messages(msgs))
        assert len(ids) == 2
        replies = list(grid.pull_messages(ids))
        assert len(replies) == 2
        assert list(grid.pull_messages(ids)) == []


def test_bad_client_app_reference():
    with pytest.raises(TypeError):
        InProcessGrid("fedsqueeze.simulation.grid:log", 1)
