"""Error feedback and variance reduction through the Flower apps (in-process Grid).

Gradient mode on binary L2 logistic regression, Synthetic(1, 1) with 60 features (d = 61), 20 clients
with their natural (heterogeneous) data, reg = 1: the setting of the theory, with the exact optimum.
The pure-layer tests (test_feedback.py) prove the mechanisms; these prove that the apps run them:
payloads through the wire, client memory in context state, the server half across rounds.
"""

from __future__ import annotations

import math

import pytest
import tomllib
import torch
from reference.gradient_mode import run_gradient_mode

from fedsqueeze import feedback
from fedsqueeze.compressors import build as build_compressor
from fedsqueeze.config import ConfigError, build_task, resolve
from fedsqueeze.engine import LocalTransport, Server, plan_for, run_round
from fedsqueeze.feedback.theory import theory_stepsize
from fedsqueeze.simulation.runner import simulate

N = 20
TASK = [
    "task=synthetic-logreg(num_features=60, num_classes=2, reg=1.0)",
    "partition=natural",
    f"num-clients={N}",
    "mode=gradient",
    "batch-size=0",
]


@pytest.fixture(scope="module")
def L() -> float:  # noqa: N802 (the smoothness constant's usual name)
    return build_task(resolve(overrides=TASK)).objective.L


def run(tmp_path, name: str, rounds: int, lr: float | str, *extra: str):
    cfg = resolve(overrides=[*TASK, f"name={name}", f"rounds={rounds}", f"lr={lr!r}", f"out-dir={tmp_path}", *extra])
    return simulate(cfg)


def grad_sq(result) -> list[float]:
    return [row["grad_norm_sq"] for row in result.rows]


def test_app_matches_the_pure_gradient_mode_driver(tmp_path, L):
    """EF21 top-2 up, EF21-P top-8 down (both deterministic): the app's iterates are the driver's."""
    cfg_extra = ["feedback=ef21", "compressor=topk(k=2)", "downlink=topk(k=8)", "downlink-feedback=ef21p"]
    result = run(tmp_path, "app", 30, 1 / L, *cfg_extra)
    cfg = resolve(overrides=[*TASK, "rounds=30", f"lr={1 / L!r}", *cfg_extra])
    objective = plan_for(cfg).task.objective
    x0 = plan_for(cfg).x0.to(torch.float64)
    pure = run_gradient_mode(objective, "ef21", "topk(k=2)", 30, 1 / L, downlink="topk(k=8)", x0=x0)
    # float32 on the wire and in the model against float64 in the driver
    assert grad_sq(result) == pytest.approx(pure.column("grad_norm_sq")[1:], rel=1e-3)
    assert result.rows[0]["downlink_bytes"] < result.rows[0]["dense_uplink_bytes"]  # C(x - w), not x


def test_ef21_topk_converges_through_the_app_while_plain_topk_stalls(tmp_path, L):
    """top-2 of 61 coordinates: EF21 reaches ||grad f||^2 < 1e-10 (linearly); without feedback it stalls."""
    ef21 = grad_sq(run(tmp_path, "ef21", 230, 1 / L, "feedback=ef21", "compressor=topk(k=2)"))
    assert ef21[-1] < 1e-10
    for a in (100, 150, 200):  # linear: every 50 rounds at least 10 times lower
        assert max(ef21[a - 5 : a]) < min(ef21[a - 55 : a - 50]) / 10
    plain = grad_sq(run(tmp_path, "plain", 40, 1 / L, "compressor=topk(k=2)"))
    assert min(plain[20:]) > 0.1


def test_diana_randk_reaches_the_optimum_while_plain_randk_has_a_noise_floor(tmp_path, L):
    diana = run(tmp_path, "diana", 230, 1 / L, "feedback=diana", "compressor=randk(k=8)")
    assert grad_sq(diana)[-1] < 1e-10 and diana.rows[-1]["dist_sq"] < 1e-9
    plain = grad_sq(run(tmp_path, "plain", 40, 1 / L, "compressor=randk(k=8)"))
    assert min(plain[20:]) > 1e-2


def test_classic_ef_topk_converges_below_the_stall_of_plain_topk(tmp_path, L):
    """Classic EF reaches a neighbourhood of x* that shrinks with the stepsize; plain top-16 stalls near 0.25."""
    ef = grad_sq(run(tmp_path, "ef", 150, 1 / (4 * L), "feedback=ef", "compressor=topk(k=16)"))
    plain = grad_sq(run(tmp_path, "plain", 40, 1 / L, "compressor=topk(k=16)"))
    assert ef[-1] < 5e-3 < 0.1 < min(plain[20:])
    assert ef[-1] < ef[50] / 10


def test_efbv_beats_ef21_on_lambda_c_at_equal_bytes(tmp_path, L):
    """comp-(2, 32) (not contractive): EF21 runs on lambda* C (EF-BV with nu = lambda*); EF-BV takes nu*."""
    comp = "topk(k=32) | randk(k=2)"
    mech = feedback.build("efbv", build_compressor(comp), dim=61, num_clients=N)
    assert mech.nu > 10 * mech.lam
    a = run(tmp_path, "efbv", 120, 1 / L, "feedback=efbv", f"compressor={comp}")
    b = run(tmp_path, "ef21-lc", 120, 1 / L, f"feedback=efbv(lam={mech.lam!r}, nu={mech.lam!r})", f"compressor={comp}")
    bytes_a, bytes_b = a.rows[-1]["cum_uplink_bytes"], b.rows[-1]["cum_uplink_bytes"]
    assert abs(bytes_a - bytes_b) < 0.01 * bytes_a  # the same payloads, so the same bytes per round
    assert min(grad_sq(a)[-20:]) < min(grad_sq(b)[-20:]) / 10
    assert min(grad_sq(a)[-20:]) < 2e-2


class Recording(LocalTransport):
    """The engine's local transport, keeping each round's cohort, outbox and every client's state before it."""

    def __init__(self, cfg, lost=None) -> None:
        super().__init__(cfg, lost)
        self.num_clients = cfg.num_clients
        self.history: list = []

    def exchange(self, server_round, outbox, partition_ids):
        states = [self.states.setdefault(pid, {}) for pid in range(self.num_clients)]
        self.history.append((list(partition_ids), outbox, [{k: v.clone() for k, v in st.items()} for st in states]))
        return super().exchange(server_round, outbox, partition_ids)


def drive(cfg, rounds: int, lost=None):
    """The engine's round loop without Flower: its server half and the local transport."""
    coord = Server(cfg)
    transport = Recording(cfg, lost)
    for rnd in range(1, rounds + 1):
        run_round(coord, transport, rnd)
    states = [transport.states.setdefault(pid, {}) for pid in range(cfg.num_clients)]
    return coord, transport.client, states, transport.history


def test_state_persists_across_rounds_in_which_a_client_is_not_sampled(L):
    """5 of 20 clients per round: a client's memory changes only when it is sampled, the server's running
    mean stays the share-weighted mean of every client's memory, and a client that missed downlink
    broadcasts is sent w itself and then holds exactly the server's w."""
    cfg = resolve(overrides=[
        *TASK, "cohort-size=5", "feedback=efbv(lam=0.5, nu=1.0)", "compressor=randk(k=8)", f"lr={1 / L!r}",
        "downlink=topk(k=16)", "downlink-feedback=ef21p", "rounds=12",
    ])  # fmt: skip
    coord, clients, states, history = drive(cfg, 12)
    for rnd, ((chosen, outbox, before), after) in enumerate(
        zip(history, [h[2] for h in history[1:]] + [states], strict=True), 1
    ):
        for pid in range(N):
            if pid not in chosen:
                assert before[pid].keys() == after[pid].keys()
                assert all(torch.equal(before[pid][k], after[pid][k]) for k in before[pid]), (rnd, pid)
        resync = [pid for pid in chosen if outbox.config[pid]["downlink-resync"]]
        assert (resync == []) == (rnd == 1)  # in round 1 every copy is w^0; later, sampled clients lagged
    # each client's last memory update waits for the server's acknowledgement (the next round it is sampled)
    for pid in range(N):
        assert ("pending.round" in states[pid]) == (pid in {p for h in history for p in h[0]})
        clients.settle(states[pid], coord.accepted.get(pid))
        assert not any(k.startswith("pending.") for k in states[pid])
    shares = torch.tensor(coord.algorithm.shares(coord.task), dtype=torch.float64)
    shares /= shares.sum()
    seen = [pid for pid in range(N) if "feedback.h" in states[pid]]
    assert len(seen) > 10
    mean_h = sum(shares[pid] * states[pid]["feedback.h"].to(torch.float64) for pid in seen)
    torch.testing.assert_close(coord.aggregator.state["h"].to(torch.float64), mean_h, rtol=1e-5, atol=1e-6)
    last_chosen = history[-1][0]
    for pid in last_chosen:
        assert torch.equal(states[pid]["feedback.w"], coord.downlink_server.w)
        assert int(states[pid]["feedback.w_step"]) == 12


def test_compressed_downlink_with_feedback_converges_to_the_same_optimum(tmp_path, L):
    """EF21 top-2 up and EF21-P top-16 down converge to x*; top-16 down without feedback does not."""
    both = run(tmp_path, "both", 250, 1 / L, "feedback=ef21", "compressor=topk(k=2)", "downlink=topk(k=16)",
               "downlink-feedback=ef21p")  # fmt: skip
    assert grad_sq(both)[-1] < 1e-8 and both.rows[-1]["dist_sq"] < 1e-8
    dense_down = 4 * 61 * N
    assert all(row["downlink_bytes"] < dense_down / 2 for row in both.rows)
    plain = run(tmp_path, "plain-down", 40, 1 / L, "feedback=ef21", "compressor=topk(k=2)", "downlink=topk(k=16)")
    assert min(grad_sq(plain)[20:]) > 0.1


def test_theory_stepsize_is_derived_and_written_to_the_run_config(tmp_path, L):
    result = run(tmp_path, "theory", 2, "theory", "feedback=ef21", "compressor=topk(k=2)")
    with open(result.run_dir / "config.toml", "rb") as fh:
        written = tomllib.load(fh)
    assert written["lr"] == "theory"
    resolved = written["resolved"]
    objective = build_task(resolve(overrides=TASK)).objective
    cfg = resolve(overrides=[*TASK, "feedback=ef21", "compressor=topk(k=2)"])
    plan = plan_for(cfg)
    expected = theory_stepsize(plan.mechanism, plan.uplink, dim=61, num_clients=N, L=objective.L,
                               L_tilde=objective.L_tilde)  # fmt: skip
    assert resolved["lr"] == pytest.approx(expected["gamma"], rel=1e-12)
    assert resolved["L"] == pytest.approx(L) and resolved["smoothness"] == "exact"
    assert resolved["feedback"] == "ef21(init=full)" and resolved["alpha"] == pytest.approx(2 / 61)
    # in model-delta mode "theory" is a stable local step on every f_i
    delta = plan_for(resolve(overrides=[*TASK, "mode=delta", "lr=theory"]))
    assert delta.lr == pytest.approx(1 / objective.L_max)
    # a task without an exact objective: L_i estimated at the initial model
    mlp = plan_for(resolve(overrides=["task=digits-mlp", "num-clients=4", "lr=theory"]))
    assert mlp.resolved["smoothness"].startswith("estimated") and math.isfinite(mlp.lr) and mlp.lr > 0


@pytest.mark.parametrize(
    "overrides, key, message",
    [
        (["feedback=ef22"], "feedback", "unknown feedback 'ef22'"),
        (["feedback=efbv(lam=2)"], "feedback", "lam must be a number in (0, 1]"),
        (["mode=gradients"], "mode", "unknown mode"),
        (["downlink-feedback=ef21"], "downlink-feedback", "unknown downlink feedback"),
        (["mode=gradient", "algorithm=scaffnew"], "mode", "gradient mode sends one local gradient"),
        (["feedback=ef21", "algorithm=scafflix", "task=synthetic-logreg"], "feedback", "fixed client shares"),
        (["lr=fast"], "lr", "expected a number or 'theory'"),
    ],
)
def test_bad_feedback_configs_fail_before_the_run(overrides, key, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        resolve(overrides=overrides)
    assert info.value.key == key


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["feedback=ef", "compressor=topk(k=2)"], "no theory stepsize for feedback 'ef'"),
        (["compressor=topk(k=2)"], "a biased compressor without feedback"),
        (["feedback=efbv", "compressor=powersgd(rank=1)"], "declares no closed-form"),
    ],
)
def test_theory_stepsize_without_a_rule_is_a_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        plan_for(resolve(overrides=[*TASK, "lr=theory", *overrides]))


def test_model_delta_mode_with_error_feedback_recovers_what_top_k_loses(tmp_path):
    """FedAvg on digits with top-1 % deltas: EF21 on the deltas trains far better than top-k alone."""
    common = ["task=digits-mlp", "num-clients=10", "rounds=15", "local-steps=5", "compressor=topk(0.01)",
              f"out-dir={tmp_path}", "target-accuracy=0"]  # fmt: skip
    plain = simulate(resolve(overrides=[*common, "name=plain"]))
    ef21 = simulate(resolve(overrides=[*common, "name=ef21", "feedback=ef21"]))
    assert ef21.rows[-1]["test_accuracy"] > plain.rows[-1]["test_accuracy"] + 0.05
    # the first message of each client is its delta uncompressed (init=full), later ones are top-1 %
    assert ef21.rows[0]["uplink_bytes"] > 20 * ef21.rows[1]["uplink_bytes"]


def test_a_reply_the_server_never_took_in_leaves_client_and_server_memory_in_agreement(L):
    """A client's EF21 memory update is committed only once the server acknowledges the reply."""
    cfg = resolve(overrides=[*TASK, "num-clients=3", "feedback=ef21", "compressor=topk(k=2)", f"lr={1 / L!r}"])
    # client 0's reply in round 2 is lost: the server's g does not include it; in round 3 client 0
    # drops its round-2 update, commits round 1's and sends against that memory
    coord, client, states, _ = drive(cfg, 4, lost=lambda rnd, pid: (rnd, pid) == (2, 0))
    for pid, s in enumerate(states):
        client.settle(s, coord.accepted.get(pid))
    state, *other_states = states
    mean_g = sum(s["feedback.g"].to(torch.float64) for s in (state, *other_states)) / 3
    torch.testing.assert_close(coord.aggregator.state["g"].to(torch.float64), mean_g, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mechanism", ["efbv", "diana(init=full)"])
def test_engine_matches_the_float64_reference_for_efbv_and_diana(tmp_path, L, mechanism):
    """Deterministic top-4: the engine's iterates (through the apps, float32 on the wire) are the
    float64 reference's, with the same theory parameters resolved on both sides."""
    extra = [f"feedback={mechanism}", "compressor=topk(k=4)"]
    result = run(tmp_path, mechanism.split("(")[0], 25, 1 / L, *extra)
    cfg = resolve(overrides=[*TASK, "rounds=25", f"lr={1 / L!r}", *extra])
    plan = plan_for(cfg)
    pure = run_gradient_mode(plan.task.objective, plan.mechanism.spec, "topk(k=4)", 25, 1 / L,
                             x0=plan.x0.to(torch.float64))  # fmt: skip
    assert grad_sq(result) == pytest.approx(pure.column("grad_norm_sq")[1:], rel=1e-3)
