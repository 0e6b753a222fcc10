"""The round engine's hooks: sampling with declared inclusion probabilities, per-client config, one
aggregation path with the algorithm's weights (feedback on or off), per-client state at scale, and
client state on disk in simulation."""

from __future__ import annotations

import math

import pytest
import torch

from fedsqueeze.algorithms import LocalConfig, register
from fedsqueeze.algorithms._local import cid_of
from fedsqueeze.algorithms.base import Cohort
from fedsqueeze.algorithms.fedavg import FedAvg
from fedsqueeze.client.app import STATE_KEY, load_state
from fedsqueeze.config import resolve
from fedsqueeze.deploy.state import StateIdentity, StateStore, config_digest
from fedsqueeze.engine import Exchange, LocalTransport, Server, run_round
from fedsqueeze.simulation.grid import run_inprocess
from fedsqueeze.simulation.runner import simulate

SMALL = ["task=digits-logreg", "partition=iid", "local-steps=2", "batch-size=16", "target-accuracy=0"]


@register("test-alternate")
class Alternate(FedAvg):
    """A test algorithm with its own sampling and per-client config, in one small class:
    odd clients in odd rounds, even clients in even rounds (p_i = 1/2), each told its own tag."""

    def select(self, server_round, population, size, gen):
        ids = tuple(i for i in population if i % 2 == server_round % 2)
        return Cohort(ids, {i: 0.5 for i in population})

    def configure(self, server_round, client, seed):
        return {"tag": 1000 * server_round + client}

    def client_step(self, x, model, data, loss_fn, cfg: LocalConfig, state):
        out = super().client_step(x, model, data, loss_fn, cfg, state)
        out.metrics["tag"] = float(cfg.extra["tag"])
        return out


@register("test-count")
class CountCalls(FedAvg):
    """FedAvg whose clients count their calls in their own state and check it is theirs."""

    def client_step(self, x, model, data, loss_fn, cfg: LocalConfig, state):
        pid = torch.tensor(cid_of(data))
        if "count.pid" in state and not torch.equal(state["count.pid"], pid):
            raise RuntimeError(f"client {int(pid)} was given the state of client {int(state['count.pid'])}")
        state["count.pid"] = pid
        state["count.calls"] = state.get("count.calls", torch.tensor(0)) + 1
        return super().client_step(x, model, data, loss_fn, cfg, state)


class Recording(LocalTransport):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.outboxes = {}
        self.arrivals = {}

    def exchange(self, server_round, outbox, partition_ids):
        self.outboxes[server_round] = outbox
        out = super().exchange(server_round, outbox, partition_ids)
        self.arrivals[server_round] = list(out.arrivals)
        return Exchange(self.arrivals[server_round], out.downlink_bytes)


def _cfg(tmp_path, *extra):
    return resolve(overrides=[*SMALL, f"out-dir={tmp_path}", *extra])


def test_uniform_sampling_matches_its_declared_inclusion_probabilities(tmp_path):
    cfg = _cfg(tmp_path, "num-clients=10", "cohort-size=3")
    server = Server(cfg)
    draws = 3000
    counts = torch.zeros(10)
    for r in range(1, draws + 1):
        cohort = server.select(r)
        assert len(cohort.ids) == 3 and list(cohort.ids) == sorted(set(cohort.ids))
        counts[list(cohort.ids)] += 1
    p = torch.tensor([cohort.probabilities[i] for i in range(10)])
    assert torch.allclose(p, torch.full((10,), 0.3))
    sigma = torch.sqrt(p * (1 - p) / draws)
    assert float(((counts / draws - p).abs() / sigma).max()) < 4.5  # binomial spread, 10 clients


def test_an_algorithm_brings_its_own_sampling_and_per_client_config(tmp_path):
    cfg = _cfg(tmp_path, "num-clients=6", "algorithm=test-alternate", "rounds=4")
    server, transport = Server(cfg), Recording(cfg)
    for r in range(1, 5):
        run_round(server, transport, r)
        expected = [i for i in range(6) if i % 2 == r % 2]
        assert [pid for rnd, pid in transport.calls if rnd == r] == expected
        assert {pid: c["tag"] for pid, c in transport.outboxes[r].config.items()} == {i: 1000 * r + i for i in expected}
        assert [a.metrics["tag"] for a in transport.arrivals[r]] == [1000 * r + i for i in expected]
    # the same module runs through the Flower apps by its registered name
    rows = simulate(cfg.replace(name="flower")).rows
    assert [r["clients_sampled"] for r in rows] == [3, 3, 3, 3]
    assert all(r["clients_failed"] == 0 for r in rows)


@pytest.mark.parametrize("algorithm", ["scaffnew(p=0.5)", "flix(alpha=0.5)", "fedavg"])
@pytest.mark.parametrize("mechanism", ["none", "ef21"])
def test_aggregation_weights_are_the_algorithms_with_or_without_feedback(tmp_path, algorithm, mechanism):
    """Scaffnew and FLIX weigh clients uniformly, FedAvg by examples, whatever the feedback mechanism:
    with an exact compressor one round moves x by exactly that weighted mean of the decoded deltas."""
    cfg = _cfg(tmp_path, "num-clients=4", "partition=dirichlet(0.5)", f"algorithm={algorithm}",
               f"feedback={mechanism}")  # fmt: skip
    server, transport = Server(cfg), Recording(cfg)
    sizes = [len(c.train.y) for c in server.task.clients]
    assert len(set(sizes)) > 1  # unequal clients, so the two weightings differ
    x0 = server.x.clone()
    run_round(server, transport, 1)
    deltas = [server.decode(a.payloads).to(torch.float64) for a in transport.arrivals[1]]
    weights = [1.0] * 4 if not algorithm.startswith("fedavg") else [float(n) for n in sizes]
    expected = sum(w * d for w, d in zip(weights, deltas, strict=True)) / sum(weights)
    torch.testing.assert_close((server.x - x0).to(torch.float64), expected, rtol=1e-5, atol=1e-7)
    other = [float(n) for n in sizes] if not algorithm.startswith("fedavg") else [1.0] * 4
    wrong = sum(w * d for w, d in zip(other, deltas, strict=True)) / sum(other)
    assert float((wrong - expected).norm()) > 1e-3 * float(expected.norm())


def test_three_hundred_clients_each_get_their_own_state(tmp_path):
    cfg = _cfg(tmp_path, "num-clients=300", "cohort-size=40", "rounds=8", "algorithm=test-count",
               "feedback=ef21", "compressor=topk(0.1)")  # fmt: skip
    grid, _ = run_inprocess("fedsqueeze.server.app:app", "fedsqueeze.client.app:app", 300, cfg.to_run_config(),
                            seed=cfg.seed)  # fmt: skip
    server = Server(cfg)
    sampled = [0] * 300
    for r in range(1, 9):
        for pid in server.select(r).ids:
            sampled[pid] += 1
    assert max(sampled) >= 2  # some clients come back with their state
    for pid in range(300):
        state = load_state(grid.context(grid.node_for_partition(pid)))
        calls = int(state["count.calls"]) if "count.calls" in state else 0
        assert calls == sampled[pid], pid
        assert ("feedback.g" in state) == (sampled[pid] > 1)  # committed once acknowledged


def test_client_state_on_disk_in_simulation_gives_the_same_run(tmp_path):
    common = ["num-clients=8", "cohort-size=3", "rounds=5", "feedback=ef21", "compressor=topk(0.1)"]
    in_memory = simulate(_cfg(tmp_path, "name=memory", "checkpoint=false", *common))
    state_dir = tmp_path / "states"
    cfg = _cfg(tmp_path, "name=disk", f"state-dir={state_dir}", *common)
    # state-dir in the node configs, as devices have it
    grid, _ = run_inprocess("fedsqueeze.server.app:app", "fedsqueeze.client.app:app", 8, cfg.to_run_config(),
                            seed=cfg.seed, node_configs=[{"partition-id": i, "num-partitions": 8,
                                                          "state-dir": str(state_dir)} for i in range(8)])  # fmt: skip
    on_disk = simulate(cfg.replace(name="disk2"))  # through the runner: state-dir in the run config
    # by default (checkpoint on, no state-dir) the run directory holds the state until the run completes
    default = simulate(_cfg(tmp_path, "name=default", *common))
    assert not (default.run_dir / "clients").exists()

    def strip(rows):
        return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]

    assert strip(on_disk.rows) == strip(in_memory.rows) == strip(default.rows)
    runs = sorted(state_dir.iterdir())
    assert len(runs) == 2 and all(d.name.startswith("run-") for d in runs)  # a folder per run: its uid
    for pid in range(8):  # memory holds no client state between calls; the files do
        assert STATE_KEY not in grid.context(grid.node_for_partition(pid)).state
    files = sorted(runs[0].glob("partition-*[0-9].fsqstate"))
    assert files
    store = StateStore(str(state_dir), StateIdentity(runs[0].name.removeprefix("run-"),
                                                     int(files[0].stem.split("-")[-1]),
                                                     config_digest(cfg.to_run_config())))  # fmt: skip
    tensors = store.load().tensors
    assert "feedback.g" in tensors or "pending.round" in tensors
    assert all(math.isfinite(r["test_loss"]) for r in on_disk.rows)


@pytest.mark.parametrize(
    "spec",
    [
        "topk(0.1)",
        "randk(0.2)",
        "bernoulli(0.3)",
        "topk(0.2) | qsgd(levels=4)",
        "qsgd(levels=8)",
        "qsgd(levels=2)",
        "qsgd(levels=16, norm=linf)",
        "identity",
        "topk(k=50)",
    ],
)
def test_compression_error_from_the_payload_equals_the_dense_one(spec):
    """The error of a sparse payload, from its kept coordinates alone, is ||C(v) - v||^2 / ||v||^2."""
    from fedsqueeze.engine.payloads import UpdatePlan
    from fedsqueeze.tracking import relative_error

    plan = UpdatePlan([("a", (30,)), ("b", (4, 5))], lambda name, numel: (spec, "default"))
    v = torch.randn(50, generator=torch.Generator().manual_seed(3))
    payloads = plan.compress(v, torch.Generator().manual_seed(4))
    assert plan.error(v, payloads) == pytest.approx(relative_error(v, plan.decompress(payloads)), rel=1e-5, abs=1e-7)
    assert plan.error(torch.zeros(50), plan.compress(torch.zeros(50), torch.Generator())) == 0.0


@register("test-writes-x")
class WritesX(FedAvg):
    """FedAvg that (wrongly) scales the broadcast model in place."""

    def client_step(self, x, model, data, loss_fn, cfg: LocalConfig, state):
        x.mul_(0.5)
        return super().client_step(x, model, data, loss_fn, cfg, state)


def test_a_rounds_broadcast_is_decoded_once_per_process_and_never_written(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, "num-clients=4", "rounds=2")
    transport = LocalTransport(cfg)
    server = Server(cfg)
    downlink = transport.client.plan.downlink
    decoded = []
    real = downlink.decompress
    monkeypatch.setattr(downlink, "decompress", lambda payloads: decoded.append(1) or real(payloads))
    run_round(server, transport, 1)
    assert len(decoded) == 1  # four clients, one broadcast
    data = server.downlink.encode(server.downlink.compress(server.x))
    x = transport.client.decode_broadcast(downlink, [bytes(data[g.key]) for g in downlink.groups])
    assert len(decoded) == 2 and torch.equal(x, server.x)  # the next round's model: other bytes, decoded again
    x.add_(1.0)  # a changed x is never handed out again
    again = transport.client.decode_broadcast(downlink, [bytes(data[g.key]) for g in downlink.groups])
    assert len(decoded) == 3 and torch.equal(again, server.x)

    # an algorithm that writes x fails loudly instead of handing the next client a changed model
    bad = _cfg(tmp_path, "num-clients=2", "rounds=1", "algorithm=test-writes-x", "name=bad")
    with pytest.raises(RuntimeError, match="changed the broadcast model x in place"):
        LocalTransport(bad).client.train(0, data, server.client_config(1, 0), {})


@pytest.mark.parametrize("scale", [1.0, 1e-40])  # 1e-40: a subnormal step, decoded through float64
def test_a_quantized_payloads_error_needs_only_its_nonzero_levels(scale):
    from fedsqueeze.engine.payloads import UpdatePlan
    from fedsqueeze.tracking import relative_error

    plan = UpdatePlan([("w", (100_000,))], lambda name, numel: ("qsgd(levels=16)", "default"))
    v = torch.randn(100_000, generator=torch.Generator().manual_seed(5)) * scale
    (payload,) = plan.compress(v, torch.Generator().manual_seed(6))
    where = torch.nonzero(payload.magnitudes).reshape(-1)
    assert 0 < where.numel() < 100_000 // 4  # most levels are 0 on a long vector
    assert torch.equal(payload.nonzero_levels(), where)
    dense = payload.to_dense()
    assert torch.equal(payload.values_at(where), dense[where])  # bit for bit what the server decodes
    if scale == 1.0:  # (at 1e-40, ||v||^2 underflows float32 whichever way the error is taken)
        exact = relative_error(v.double(), dense.double())
        assert plan.error(v, [payload]) == pytest.approx(exact, rel=1e-4)
