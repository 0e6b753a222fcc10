"""Local training and personalisation on strongly convex logistic regression with exact optima.

Driven by the float64 reference `reference.algorithms.run` (tests/reference): the same client and
server halves the Flower apps call, in float64, full participation, no compression. The last test
checks the round engine against it.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference.algorithms import FlixObjective, local_optima, run, with_dtype

from fedsqueeze.algorithms import AGGREGATION_WEIGHT, LocalConfig, build
from fedsqueeze.algorithms._local import geometric, smoothness_estimate
from fedsqueeze.algorithms.personal import summarize
from fedsqueeze.tasks import build_task

TARGET = 1e-8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny tensors: intra-op threads only add contention on a shared machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task():
    # 8 equal-sized clients (so example weights are uniform and FedAvg's fixed point question is only drift)
    return build_task(
        "synthetic-logreg", num_clients=8, partition="natural", seed=0, num_features=20, num_classes=2,
        reg=0.1, min_samples=80, max_samples=80,
    )  # fmt: skip


def rounds_to(trace, key: str, target: float) -> int | None:
    for row in trace.rows:
        if row[key] < target:
            return int(row["round"])
    return None


def subopt(obj):
    f_star = obj.optimum().f
    return lambda x, outs: {"subopt": obj.f(x) - f_star}


def test_build_parses_arguments_and_rejects_bad_ones():
    assert build("fedprox(mu=0.1)").mu == 0.1
    assert build("flix(alpha=[0.1, 0.5])").alpha == [0.1, 0.5]
    assert build("scaffnew(p=0.2)").p == 0.2
    with pytest.raises(ValueError, match="valid arguments"):
        build("scaffnew(q=1)")
    with pytest.raises(ValueError, match="unknown algorithm"):
        build("nosuch(1)")
    with pytest.raises(ValueError, match="p must be"):
        build("scafflix(p=1.5)")


def test_geometric_local_steps_have_mean_one_over_p():
    p, n = 0.1, 4000
    draws = [geometric(p, seed) for seed in range(n)]
    assert min(draws) >= 1
    sd = math.sqrt(1 - p) / p / math.sqrt(n)  # standard error of the mean
    assert abs(sum(draws) / n - 1 / p) < 4 * sd


def test_fedprox_mu_zero_is_fedavg_and_mu_pulls_towards_the_broadcast(task):
    client = with_dtype(task, torch.float64)[0]
    model = task.new_model(0).double()
    x = torch.full((21,), 0.3, dtype=torch.float64)
    cfg = LocalConfig(server_round=1, lr=0.1, local_steps=20, local_epochs=0, batch_size=16, seed=3)
    base = build("fedavg").client_step(x, model, client, task.loss_fn, cfg, {}).update
    same = build("fedprox(mu=0)").client_step(x, model, client, task.loss_fn, cfg, {}).update
    prox = build("fedprox(mu=5)").client_step(x, model, client, task.loss_fn, cfg, {}).update
    assert torch.equal(base, same)
    assert 0 < float(prox.norm()) < float(base.norm())


def test_scaffnew_converges_linearly_and_beats_gd_and_fedavg_in_rounds(task):
    obj = task.objective
    l_max = max(obj.L_i)
    measure = subopt(obj)
    scaff = run(build("scaffnew"), task, rounds=200, lr=1 / l_max, measure=measure, stop=lambda r: r["subopt"] < 1e-11)
    gd = run(build("fedavg"), task, rounds=400, lr=1 / obj.L, measure=measure, stop=lambda r: r["subopt"] < TARGET)
    k = round(math.sqrt(l_max / obj.mu))  # FedAvg gets Scaffnew's expected local steps per round
    n_scaff = rounds_to(scaff, "subopt", TARGET)
    fedavg = run(build("fedavg"), task, rounds=2 * n_scaff, lr=1 / l_max, local_steps=k, measure=measure)
    n_gd = rounds_to(gd, "subopt", TARGET)
    print(f"rounds to f - f* < {TARGET:g}: scaffnew {n_scaff}, gd {n_gd}, fedavg(K={k}) none in {2 * n_scaff} "
          f"(stalls at {fedavg.rows[-1]['subopt']:.2e})")  # fmt: skip
    assert n_scaff is not None and n_gd is not None
    assert n_scaff < n_gd
    assert rounds_to(fedavg, "subopt", TARGET) is None  # client drift: FedAvg's fixed point is not x*
    # linear: the error keeps shrinking geometrically down to 1e-11 (every 20 rounds by a factor >= 10)
    s = scaff.column("subopt")
    assert s[-1] < 1e-11
    for a in range(0, len(s) - 20, 20):
        assert s[a + 20] < 0.1 * s[a]
    dist_sq = float((scaff.x - obj.optimum().x).pow(2).sum())
    assert dist_sq <= 2 * s[-1] / obj.mu  # strong convexity: x is within sqrt(2 (f - f*) / mu) of x*
    h_sum = sum(st["scaffnew.h"] for st in scaff.states)
    assert float(h_sum.norm()) < 1e-10  # sum_i h_i = 0


def test_flix_alpha_one_is_federated_training_and_alpha_zero_gives_local_models(task):
    obj = task.objective
    fedavg = run(build("fedavg"), task, rounds=5, lr=0.1, local_steps=3)
    flix1 = run(build("flix(alpha=1)"), task, rounds=5, lr=0.1, local_steps=3)
    assert torch.allclose(flix1.x, fedavg.x, rtol=0, atol=1e-14)
    assert all("flix.xstar" not in st for st in flix1.states)  # no local solve needed at alpha = 1

    alg = build("flix(alpha=0)")
    flix0 = run(alg, task, rounds=2, lr=0.1, local_steps=3)
    assert torch.equal(flix0.x, torch.zeros(obj.dim, dtype=torch.float64))  # the global model does not move
    model = task.new_model(0).double()
    clients = with_dtype(task, torch.float64)
    for i, x_i in enumerate(local_optima(obj)):
        mine = alg.personal_params(flix0.x, model, clients[i], flix0.states[i])
        assert float((mine - x_i).norm()) < 1e-7
        assert float(obj.grad_i(i, mine).norm()) < 1e-8


@pytest.mark.parametrize("alpha", [0.1, [0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 1.0]])
def test_scafflix_converges_to_the_flix_optimum_faster_than_flix_gd(task, alpha):
    obj = task.objective
    alphas = [alpha] * 8 if isinstance(alpha, float) else alpha
    flix = FlixObjective(obj, alphas)
    x_opt, f_opt = flix.optimum()
    assert float(flix.grad(x_opt).norm()) < 1e-12

    def measure(x, outs):
        return {"subopt": flix.f(x) - f_opt}

    scafflix = run(build(f"scafflix(alpha={alpha})"), task, rounds=300, lr=0.0, measure=measure,
                   stop=lambda r: r["subopt"] < 1e-12)  # fmt: skip
    gd = run(build(f"flix(alpha={alpha})"), task, rounds=3000, lr=1 / flix.L, measure=measure,
             stop=lambda r: r["subopt"] < TARGET)  # fmt: skip
    n_s, n_g = rounds_to(scafflix, "subopt", TARGET), rounds_to(gd, "subopt", TARGET)
    print(f"alpha={alpha}: rounds to FLIX f~ - f~* < {TARGET:g}: scafflix {n_s}, FLIX-GD {n_g}")
    assert n_s is not None and n_g is not None and n_s < n_g
    last = scafflix.rows[-1]["subopt"]
    assert last < 1e-12
    mu_flix = obj.mu * sum(a * a for a in alphas) / len(alphas)  # f~ is (mean alpha_i^2) mu-strongly convex
    assert float((scafflix.x - x_opt).pow(2).sum()) <= 2 * last / mu_flix
    # sum_i alpha_i h_i = 0 (weighted control variates cancel)
    total = sum(a * st["scafflix.h"] for a, st in zip(alphas, scafflix.states, strict=True) if "scafflix.h" in st)
    assert float(total.norm()) < 1e-9


def test_scafflix_estimates_each_clients_smoothness_locally(task):
    """At x = 0 binary logistic regression attains its curvature bound, so the local estimate is L_i."""
    obj = task.objective
    model = task.new_model(0).double()
    for i, c in enumerate(with_dtype(task, torch.float64)[:3]):
        est = smoothness_estimate(model, [torch.zeros(obj.dim, dtype=torch.float64)], task.loss_fn, c, iters=200)
        assert est == pytest.approx(obj.L_i[i], rel=1e-6)
    alg = build("scafflix(alpha=0.5, p=0.2)")
    c = with_dtype(task, torch.float64)[2]
    cfg = LocalConfig(server_round=1, lr=0.0, local_steps=0, local_epochs=0, batch_size=0, seed=0, extra={"K": 2})
    state: dict = {}
    out = alg.client_step(torch.zeros(obj.dim, dtype=torch.float64), model, c, task.loss_fn, cfg, state)
    assert 1 / float(state["scafflix.gamma"]) == pytest.approx(obj.L_i[2], rel=1e-4)
    assert out.metrics[AGGREGATION_WEIGHT] == pytest.approx(0.25 / float(state["scafflix.gamma"]))
    assert {"global_accuracy", "personal_accuracy"} <= set(out.metrics)


def test_summarize_reports_mean_and_spread():
    s = summarize([{"personal_accuracy": 0.5}, {"personal_accuracy": 1.0}, {"personal_accuracy": math.nan}])
    assert s["personal_accuracy_mean"] == 0.75 and s["personal_accuracy_std"] == 0.25
    assert s["personal_accuracy_min"] == 0.5 and s["personal_accuracy_max"] == 1.0


@pytest.mark.parametrize("algorithm", ["scaffnew(p=0.3)", "scafflix(alpha=0.5, p=0.3)"])
def test_engine_matches_the_float64_reference(tmp_path, algorithm):
    """Full participation, exact uplink, full-batch steps: the engine (through the Flower apps, float32)
    follows the float64 reference loop's suboptimality round by round."""
    from fedsqueeze.config import resolve
    from fedsqueeze.simulation.runner import simulate

    overrides = ["task=synthetic-logreg(num_features=20, num_classes=2, reg=0.1)", "partition=natural",
                 "num-clients=6", "rounds=12", "local-steps=5", "batch-size=0", "lr=0.5", f"algorithm={algorithm}",
                 "target-accuracy=0", f"out-dir={tmp_path}"]  # fmt: skip
    cfg = resolve(overrides=overrides)
    rows = simulate(cfg).rows
    task = build_task("synthetic-logreg", num_clients=6, partition="natural", seed=0, num_features=20,
                      num_classes=2, reg=0.1)  # fmt: skip
    trace = run(build(algorithm), task, rounds=12, lr=0.5, local_steps=5, batch_size=0, seed=0,
                measure=lambda x, outs: {"subopt": task.objective.metrics(x)["subopt"]})  # fmt: skip
    reference = trace.column("subopt")
    assert reference[-1] < 0.5 * reference[0]
    assert [r["subopt"] for r in rows] == pytest.approx(reference, rel=2e-3, abs=1e-6)
