"""Samplings: empirical inclusion frequencies against the declared p_i, unbiasedness of the cohort objective
f_S = sum_{i in S} f_i / (n p_i), stratification against nice, random cohort sizes in the engine, and the
s_i / p_i weights of the cohort mean."""

from __future__ import annotations

import math

import pytest
import torch

from fedsqueeze.algorithms.sampling import Block, Importance, Nice, capped_proportional
from fedsqueeze.config import ConfigError, resolve
from fedsqueeze.engine import Exchange, LocalTransport, Server, run_round

LOGREG = "synthetic-logreg(num_features=6, num_classes=2, reg=0.1, min_samples=10, max_samples=40)"
BASE = ["partition=natural", "local-steps=2", "batch-size=0", "target-accuracy=0", "lr=0.1"]


class Recording(LocalTransport):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.arrivals = {}

    def exchange(self, server_round, outbox, partition_ids):
        out = super().exchange(server_round, outbox, partition_ids)
        self.arrivals[server_round] = list(out.arrivals)
        return Exchange(self.arrivals[server_round], out.downlink_bytes)


def _cfg(tmp_path, *extra, task=LOGREG):
    return resolve(overrides=[f"task={task}", *BASE, f"out-dir={tmp_path}", *extra])


SPECS = ["nice", "block(blocks=3, q=[0.5, 0.3, 0.2])", "stratified(clusters=3, by=features)", "importance(by=examples)"]


@pytest.mark.parametrize("spec", SPECS)
def test_inclusion_frequencies_match_the_declared_probabilities(tmp_path, spec):
    n, draws = 10, 2000
    server = Server(_cfg(tmp_path, f"num-clients={n}", "cohort-size=3", f"sampling={spec}"))
    counts = torch.zeros(n, dtype=torch.float64)
    for r in range(1, draws + 1):
        cohort = server.select(r)
        counts[list(cohort.ids)] += 1
    p = torch.tensor([cohort.probabilities[i] for i in range(n)], dtype=torch.float64)
    assert len(set(p.tolist())) > 1 or spec == "nice"  # the non-uniform samplings are non-uniform here
    sigma = torch.sqrt(p * (1 - p) / draws).clamp_min(1e-12)
    z = (counts / draws - p).abs() / sigma
    assert float(z.max()) < 4.5, (spec, p.tolist(), (counts / draws).tolist())  # binomial spread, 10 clients
    if spec.startswith("importance"):  # expected size = cohort-size; p_i proportional to n_i below the cap
        assert math.isclose(float(p.sum()), 3.0, rel_tol=1e-9)
        sizes = torch.tensor([len(c.train.y) for c in server.task.clients], dtype=torch.float64)
        free = p < 1
        ratio = p[free] / sizes[free]
        assert torch.allclose(ratio, ratio[0].expand_as(ratio))


@pytest.mark.parametrize("spec", SPECS)
def test_the_cohort_objective_is_unbiased(tmp_path, spec):
    """The mean of f_S over many cohorts is f, within 4.5 standard errors of the draws' own spread."""
    n, draws = 10, 3000
    server = Server(_cfg(tmp_path, f"num-clients={n}", "cohort-size=3", f"sampling={spec}"))
    obj = server.task.objective
    x = torch.randn(obj.dim, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    f_i = torch.tensor([obj.f_i(i, x) for i in range(n)], dtype=torch.float64)
    values = []
    for r in range(1, draws + 1):
        cohort = server.select(r)
        values.append(sum(float(f_i[i]) / (n * cohort.probabilities[i]) for i in cohort.ids))
    v = torch.tensor(values, dtype=torch.float64)
    stderr = float(v.std()) / math.sqrt(draws)
    assert abs(float(v.mean()) - obj.f(x)) < 4.5 * stderr + 1e-12, (float(v.mean()), obj.f(x), stderr)


def test_stratified_by_gradients_has_a_smaller_variance_than_nice_on_clustered_clients(tmp_path):
    """Every client holds one digit (shards(1)): gradients cluster by digit, so one client per cluster
    estimates grad f(x*) far better than a uniform cohort of the same size."""
    n, b, draws = 20, 10, 1500
    common = ["task=digits-logreg", "partition=shards(1)", f"num-clients={n}", f"cohort-size={b}", "local-steps=1",
              "target-accuracy=0", f"out-dir={tmp_path}"]  # fmt: skip
    obj = None
    variances = {}
    for spec in ("nice", f"stratified(clusters={b}, by=gradients)"):
        server = Server(resolve(overrides=[*common, f"sampling={spec}"]))
        obj = server.task.objective
        x_star = server.task.optimum.x
        grads = torch.stack([obj.grad_i(i, x_star) for i in range(n)])
        full = grads.mean(dim=0)
        errs = []
        for r in range(1, draws + 1):
            c = server.select(r)
            g_s = sum(grads[i] / (n * c.probabilities[i]) for i in c.ids)
            errs.append(float((g_s - full).pow(2).sum()))
        variances[spec.split("(")[0]] = sum(errs) / draws
    assert variances["stratified"] < 0.2 * variances["nice"], variances


def test_block_and_importance_declarations():
    blocks = Block.contiguous(7, 3)
    assert blocks.assignment == [0, 0, 0, 1, 1, 2, 2]
    assert blocks.probabilities(7, 3) == pytest.approx([1 / 3] * 7)
    p = capped_proportional([1.0, 1.0, 1.0, 100.0], 2.0)
    assert p == pytest.approx([1 / 3, 1 / 3, 1 / 3, 1.0])  # the heavy client is capped, the rest share 1
    assert Importance([1, 2, 3]).probabilities(3, 3) == pytest.approx([1.0, 1.0, 1.0])
    assert Nice(2).probabilities(4, 3) == [0.5] * 4  # tau overrides the cohort size


def test_random_cohort_sizes_run_through_the_engine_and_replies_carry_s_over_p_weights(tmp_path):
    """importance: cohorts of random size (some empty: those rounds leave the model alone); a round's
    step is the Horvitz-Thompson-weighted mean sum (s_i / p_i) v_i / sum (s_i / p_i) of the deltas."""
    cfg = _cfg(tmp_path, "num-clients=8", "cohort-size=1", "sampling=importance(by=examples)", "rounds=12")
    server, transport = Server(cfg), Recording(cfg)
    shares = torch.tensor([float(len(c.train.y)) for c in server.task.clients], dtype=torch.float64)
    shares /= shares.sum()
    sizes = []
    for r in range(1, 13):
        x0 = server.x.clone()
        cohort = server.select(r)
        row = run_round(server, transport, r)
        arrivals = {a.partition_id: a for a in transport.arrivals[r]}
        sizes.append(row["clients_sampled"])
        assert row["clients_sampled"] == len(cohort.ids)
        if not cohort.ids:
            assert not row["applied"] and torch.equal(server.x, x0)
            continue
        w = {i: float(shares[i]) / cohort.probabilities[i] for i in cohort.ids}
        deltas = {i: server.decode(arrivals[i].payloads).to(torch.float64) for i in cohort.ids}
        expected = sum(w[i] * deltas[i] for i in cohort.ids) / sum(w.values())
        torch.testing.assert_close((server.x - x0).to(torch.float64), expected, rtol=1e-5, atol=1e-7)
    assert 0 in sizes and max(sizes) >= 2  # the size is random


@pytest.mark.parametrize(
    "extra, key",
    [
        (["sampling=uniform"], "sampling"),
        (["sampling=stratified(clusters=99)"], "sampling"),
        (["sampling=stratified(clusters=2, by=colour)"], "sampling"),
        (["sampling=block(blocks=2, q=[0.9, 0.9])"], "sampling"),
        (["sampling=stratified(clusters=2)", "feedback=ef21", "compressor=topk(0.5)"], "feedback"),
        (["sampling=block(blocks=2)", "aggregation=median"], "aggregation"),
        (["sampling=block(blocks=2)", "algorithm=scafflix"], "sampling"),
        (["local-round-cost=-1"], "local-round-cost"),
        (["global-round-cost=nan"], "global-round-cost"),
    ],
)
def test_sampling_and_cost_keys_refuse_what_cannot_work(tmp_path, extra, key):
    with pytest.raises(ConfigError) as info:
        _cfg(tmp_path, "num-clients=8", *extra)
    assert info.value.key == key
