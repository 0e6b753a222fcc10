"""Secure rounds through the engine (LocalTransport) and through Flower's in-process backend: the
compatibility rules, the pipeline's unbiasedness, dropouts at every stage, refusals, convergence."""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest
import torch
from flwr.clientapp import ClientApp

from fedsqueeze.config import ConfigError, resolve
from fedsqueeze.engine import LocalTransport, Server, run_round, secure
from fedsqueeze.engine.payloads import UpdatePlan
from fedsqueeze.engine.shared import SharedSeed
from fedsqueeze.secagg import quantize

BASE = ["num-clients=5", "cohort-size=5", "local-steps=2", "checkpoint=false", "target-accuracy=0", "seed=3"]
SECURE = "secagg=masked(threshold=3, bits=16, clip=0.5)"


def cfg_of(*extra: str, out: str = ""):
    return resolve(overrides=[*BASE, f"out-dir={out or tempfile.mkdtemp()}", *extra])


@pytest.mark.parametrize(
    ("extra", "key", "says"),
    [
        (["compressor=topk(0.1)", "randomness=shared"], "compressor", "randk"),
        (["compressor=qsgd(levels=4)"], "compressor", "own support, norm or scale"),
        (["compressor=randk(ratio=0.1)"], "compressor", 'randomness = "shared"'),
        (["rules=*.bias=sign"], "rules", "identity"),
        (["feedback=ef21"], "feedback", "memory"),
        (["aggregation=median"], "aggregation", "each client's vector"),
        (["max-update-norm=1.0"], "max-update-norm", "norm"),
        (["algorithm=scafflix"], "algorithm", "report"),
    ],
)
def test_what_cannot_be_aggregated_securely_is_refused_before_the_run(extra, key, says):
    with pytest.raises(ConfigError, match=says) as info:
        cfg_of(SECURE, *extra)
    assert info.value.key == key


def test_the_threshold_and_the_spec_are_checked():
    with pytest.raises(ConfigError, match="above half the cohort") as info:
        cfg_of("secagg=masked(threshold=2)")
    assert info.value.key == "secagg" and "3..5" in str(info.value)
    with pytest.raises(ConfigError, match="bits must be"):
        cfg_of("secagg=masked(threshold=3, bits=17)")
    with pytest.raises(ConfigError, match="unknown secure aggregation"):
        cfg_of("secagg=secagg_plus(3)")
    assert cfg_of(SECURE, "compressor=bernoulli(0.2) | randk(ratio=0.5)", "randomness=shared").secagg


def test_compression_and_quantisation_are_unbiased_over_rounds():
    """The whole client-to-server pipeline (shared rand-k, weights, 4-bit rounding on the common scale,
    the server's decoding): over R = 2000 round seeds the mean estimate of mean_i v_i is within 4.5
    standard errors (estimated from the draws) at every one of d = 200 coordinates (n = 5, k = 20)."""
    d, n, reps, clip, bits = 200, 5, 2000, 1.0, 4
    plan = UpdatePlan([("w", (d,))], lambda name, numel: ("randk(k=20)", "default"))
    rng = np.random.default_rng(0)
    v = torch.from_numpy(rng.uniform(-0.9, 0.9, (n, d))).to(torch.float32)
    weights = np.array([1.0, 0.5, 0.25, 1.0, 0.75])
    target = (weights[:, None] * v.double().numpy()).sum(0) / weights.sum()
    draws = np.empty((reps, d))
    for r in range(reps):
        seed = SharedSeed(1000 + r)
        layout = secure.supports(plan, seed)
        total = 0
        for i in range(n):
            payloads = plan.encode(plan.compress(v[i], seed.uplink(plan.keys())))
            values = secure.support_values(plan, payloads, layout)
            q, clipped = quantize.encode(values * weights[i], clip, bits, 16, rng)
            assert clipped == 0
            total = total + q.astype(np.int64)
        sums = quantize.decode_sum(np.asarray(total), n, clip, bits)
        decoded = secure.decode_sum(plan, layout, sums)
        dense = decoded.to_dense() if hasattr(decoded, "to_dense") else decoded
        draws[r] = dense.double().numpy() / weights.sum()
    z = (draws.mean(0) - target) / (draws.std(0, ddof=1) / math.sqrt(reps))
    assert np.max(np.abs(z)) < 4.5, np.max(np.abs(z))


def rounding_bound(server, survivors) -> float:
    """Each survivor's a_i v_i (a_i = w_i / max w) is rounded by less than D = 2c / (2^16 - 1); the mean
    sum_i w_i v_i / sum_i w_i is then off by less than |U2| D / sum_{U2} a_i."""
    weights = {pid: server.secure_weight(pid) for pid in range(5)}
    top = max(weights.values())
    return len(survivors) * (2 * 0.5 / (2**16 - 1)) / sum(weights[p] / top for p in survivors)


def _one_round(cfg, transport=None):
    server = Server(cfg)
    x0 = server.x.clone()
    row = run_round(server, transport or LocalTransport(cfg), 1)
    return server, x0, row


def test_a_secure_round_gives_the_plain_rounds_model_up_to_the_rounding():
    """16-bit rounding on [-c, c]: the weighted mean (and the model, with fedavg's server step x + mean)
    is within the rounding's bound of the plain round's."""
    plain, x0, _ = _one_round(cfg_of())
    sec, x0s, row = _one_round(cfg_of(SECURE))
    assert torch.equal(x0, x0s) and row["applied"] and row["clients_ok"] == 5
    bound = rounding_bound(sec, range(5))
    gap = float((sec.x - plain.x).abs().max())
    assert gap < bound and float((plain.x - x0).abs().max()) > 100 * bound


@pytest.mark.parametrize("stage", secure.STAGES)
def test_dropouts_at_every_stage_give_the_survivors_mean(stage):
    dropped = {1, 3}

    def gone(r, action, pid):
        return action == stage and pid in dropped

    lost = dropped if stage != secure.UNMASK else set()  # after masking, the dropped clients' y still counts
    sec, _, row = _one_round(cfg_of(SECURE), LocalTransport(cfg_of(SECURE), dropped=gone))
    plain, _, _ = _one_round(cfg_of(), LocalTransport(cfg_of(), lost=lambda r, pid: pid in lost))
    assert row["applied"] and row["clients_ok"] == 5 - len(lost)
    assert float((sec.x - plain.x).abs().max()) < rounding_bound(sec, [p for p in range(5) if p not in lost])


@pytest.mark.parametrize("stage", secure.STAGES)
def test_below_the_threshold_the_round_is_skipped_and_recorded(stage):
    def gone(r, action, pid):
        return action == stage and pid in (0, 2, 4)

    cfg = cfg_of(SECURE)
    server, x0, row = _one_round(cfg, LocalTransport(cfg, dropped=gone))
    assert not row["applied"] and row["clients_ok"] == 0 and "fewer than the threshold" in row["secagg_aborted"]
    assert torch.equal(server.x, x0)


class Hostile(LocalTransport):
    """A server that, in the unmask stage, asks client 0 for the seed and the key of client 2, and then
    replays the stage to every client."""

    refusals: list[str] = []

    def stage(self, server_round, action, messages):
        if action == secure.UNMASK:
            forged = secure.StageMessage({**messages[0].record, "dropped": "2"})
            self.refusals += [r.failure for r in super().stage(server_round, action, {0: forged})]
            replies = super().stage(server_round, action, messages)
            self.refusals += [r.failure for r in super().stage(server_round, action, messages)]
            return replies
        return super().stage(server_round, action, messages)


def test_the_client_refuses_a_request_that_would_unmask_it_and_a_replayed_stage():
    cfg = cfg_of(SECURE)
    transport = Hostile(cfg)
    _, _, row = _one_round(cfg, transport)
    assert "both the self-mask seed and the mask key of [2]" in transport.refusals[0]
    assert all("matches no session" in r for r in transport.refusals[1:]) and len(transport.refusals) == 6
    assert row["applied"] and row["clients_ok"] == 5  # the honest request still went through


def test_a_digits_run_with_secagg_is_within_one_accuracy_point_of_the_same_run_without():
    from fedsqueeze.engine import run

    common = ["num-clients=6", "cohort-size=6", "rounds=6", "local-steps=10", "randomness=shared",
              "compressor=randk(ratio=0.25)", "partition=iid"]  # fmt: skip
    plain = run(cfg_of(*common, "name=plain"), LocalTransport(cfg_of(*common)))
    cfg = cfg_of(*common, "name=secure", "secagg=masked(threshold=4, bits=8, clip=0.1)")
    sec = run(cfg, LocalTransport(cfg))
    assert plain["final"]["test_accuracy"] > 0.5 and sec["final"]["train_loss"] is None  # no per-client loss
    assert abs(sec["final"]["test_accuracy"] - plain["final"]["test_accuracy"]) <= 0.01


# ---- Flower's in-process backend --------------------------------------------------------------------


def _dropping_app(stage: str, partitions: set[int]) -> ClientApp:
    from fedsqueeze.client.app import app as real

    class Dropping(ClientApp):
        def __call__(self, message, context):
            pid = int(context.node_config["partition-id"])
            if message.metadata.message_type.endswith(stage) and pid in partitions:
                raise RuntimeError(f"partition {pid} drops out in {stage}")
            return real(message, context)

    return Dropping()


@pytest.mark.parametrize("stage", [secure.SHARE, secure.MASKED])
def test_in_process_flower_with_a_dropout(stage, tmp_path, monkeypatch):
    from fedsqueeze.simulation.grid import run_inprocess
    from fedsqueeze.tracking import read_metrics

    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    cfg = cfg_of(SECURE, "rounds=2", "compressor=randk(ratio=0.2)", "randomness=shared", out=str(tmp_path))
    seen = {}
    run_inprocess("fedsqueeze.server.app:app", _dropping_app(stage, {4}), 5, cfg.to_run_config(),
                  observer=lambda event, data: seen.update({event: data}))  # fmt: skip
    rows = read_metrics(os.path.join(seen["finish"]["run_dir"], "metrics.jsonl"))
    lost = 1  # partition 4, in either stage
    assert [r["clients_ok"] for r in rows] == [5 - lost] * 2 and all(r["applied"] for r in rows)
    # bytes as the same round without Flower counts them (what crossed: keys, shares, y), and y is 2 B per
    # kept coordinate (k = 0.2 d, 16-bit words) for each of the clients that sent one
    local = cfg_of(SECURE, "compressor=randk(ratio=0.2)", "randomness=shared")

    def gone(r, action, pid):
        return action == stage and pid == 4

    server, _, row = _one_round(local, LocalTransport(local, dropped=gone))
    k = sum(g.compressor.count(g.numel) for g in server.uplink.groups)
    assert rows[0]["uplink_bytes"] >= (5 - lost) * 2 * k
    if stage == secure.SHARE:  # a dropout in share replies nothing; one in masked sent its keys and shares
        assert rows[0]["uplink_bytes"] == row["uplink_bytes"]
