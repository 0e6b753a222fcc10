"""Shared randomness: the server's per-round seed gives the whole cohort one rand-k support and one set of
Bernoulli coins (different every round), the theory defaults use omega_av = omega, and the run records it."""

from __future__ import annotations

import pytest
import torch

from fedsqueeze import wire
from fedsqueeze.config import ConfigError, parse_overrides, read_toml, resolve
from fedsqueeze.engine import Server, client_half, protocol
from fedsqueeze.engine.plan import plan_for
from fedsqueeze.simulation.runner import simulate

SMALL = ["task=digits-logreg", "partition=iid", "local-steps=2", "batch-size=16", "target-accuracy=0",
         "num-clients=4"]  # fmt: skip


def _supports(cfg, server_round: int) -> dict[int, torch.Tensor]:
    """Each client's kept indices in one round, from the bytes it sends."""
    server = Server(cfg)
    outbox = server.broadcast(server_round, range(cfg.num_clients))
    client = client_half(cfg)
    out = {}
    for pid in range(cfg.num_clients):
        result = client.train(pid, outbox.payloads[pid], outbox.config[pid], {})
        (group,) = client.plan.uplink.groups
        out[pid] = wire.decode(result.payloads[group.key], group.numel).indices
    return out


@pytest.mark.parametrize("compressor", ["randk(0.1)", "bernoulli(0.1)", "randk(0.2) | qsgd(levels=4)"])
def test_shared_randomness_gives_the_cohort_one_support_per_round(compressor):
    shared = resolve(overrides=parse_overrides(SMALL) | {"compressor": compressor,
                                                                        "randomness": "shared"})  # fmt: skip
    independent = shared.replace(randomness="independent")
    for server_round in (1, 2):
        same = _supports(shared, server_round)
        assert all(torch.equal(same[0], same[pid]) for pid in same), "shared randomness: one support per round"
        apart = _supports(independent, server_round)
        assert not all(torch.equal(apart[0], apart[pid]) for pid in apart)
    # a new support every round (10 % of 650 coordinates twice the same: probability ~ 0)
    assert not torch.equal(_supports(shared, 1)[0], _supports(shared, 2)[0])


def test_the_round_seed_is_sent_only_with_shared_randomness_and_a_client_needs_it():
    cfg = resolve(overrides=parse_overrides(SMALL) | {"compressor": "randk(0.1)"})
    assert protocol.ROUND_SEED not in Server(cfg).client_config(1, 0)
    shared = cfg.replace(randomness="shared")
    server = Server(shared)
    seeds = {server.client_config(r, pid)[protocol.ROUND_SEED] for r in (1,) for pid in range(4)}
    assert len(seeds) == 1 and seeds != {server.client_config(2, 0)[protocol.ROUND_SEED]}
    outbox = server.broadcast(1, [0])
    config = {k: v for k, v in outbox.config[0].items() if k != protocol.ROUND_SEED}
    with pytest.raises(ValueError, match="round-seed"):
        client_half(shared).train(0, outbox.payloads[0], config, {})


def test_unknown_randomness_is_a_config_error():
    with pytest.raises(ConfigError, match="randomness"):
        resolve(overrides={"randomness": "common"})


def test_theory_defaults_use_omega_av_equal_to_omega_for_shared_randomness():
    base = parse_overrides(SMALL) | {"mode": "gradient", "lr": "theory", "compressor": "randk(0.25)"}
    independent = plan_for(resolve(overrides=base))
    shared = plan_for(resolve(overrides=base | {"randomness": "shared"}))
    omega = independent.resolved["omega"]
    assert independent.resolved["omega_av"] == pytest.approx(omega / 4)
    assert shared.resolved["omega_av"] == pytest.approx(omega)
    assert shared.resolved["randomness"] == "shared" and independent.resolved["randomness"] == "independent"
    assert shared.lr == pytest.approx(1 / ((1 + omega) * shared.resolved["L"]))
    # EF-BV's nu* follows omega_av too: min(1, 1 / (1 + omega)) against min(1, 1 / (1 + omega / 4))
    efbv = plan_for(resolve(overrides=base | {"feedback": "efbv", "randomness": "shared"}))
    assert efbv.mechanism.nu == pytest.approx(min(1.0, 1.0 / (1.0 + omega)))


def test_a_shared_randomness_run_records_it(tmp_path):
    cfg = resolve(overrides=parse_overrides(SMALL) | {
        "compressor": "randk(0.2)", "randomness": "shared", "rounds": 3, "out-dir": str(tmp_path)})  # fmt: skip
    result = simulate(cfg)
    written = read_toml(result.run_dir / "config.toml")
    assert written["randomness"] == "shared"
    assert result.summary["resolved"]["randomness"] == "shared"
    assert [r["clients_ok"] for r in result.rows] == [4, 4, 4]
