"""Error feedback and variance reduction (fedsqueeze.feedback), gradient mode on an exact convex objective.

The objective: L2-regularised binary logistic regression (reg 0.1) on scikit-learn digits, label < 5,
d = 65 (64 pixels + bias), 20 clients holding two digit classes each (a heterogeneous split), with
its exact optimum from fedsqueeze.tasks.LogisticObjective. L = 2.96, L~ = 3.19, mu = 0.1.
Bits are the real payload sizes through fedsqueeze.wire.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from reference.gradient_mode import run_gradient_mode

from fedsqueeze.compressors import build as build_compressor
from fedsqueeze.feedback import (
    Broadcast,
    FeedbackError,
    available,
    build,
    build_downlink,
    parse_spec,
    theory,
)
from fedsqueeze.tasks import LogisticObjective, load_digits, parse_partition, partition_indices

N_CLIENTS = 20


@pytest.fixture(scope="module")
def objective() -> LogisticObjective:
    data = load_digits()
    x = data.x.reshape(len(data.x), -1)
    y = (data.y < 5).astype(np.int64)
    parts = partition_indices(data.y, N_CLIENTS, parse_partition("shards(2)"), 0, num_classes=10)
    obj = LogisticObjective([x[p] for p in parts], [y[p] for p in parts], 2, 0.1)
    obj.optimum()
    return obj


def window(history, column: str, start: int, stop: int | None = None) -> list[float]:
    return history.column(column)[start:stop]


# --------------------------------------------------------------------------- specs


def test_available_names():
    assert available() == ["diana", "ef", "ef21", "efbv", "none"]


@pytest.mark.parametrize(
    "spec, name, args",
    [
        ("none", "none", {}),
        ("ef", "ef", {}),
        ("ef21", "ef21", {}),
        ("ef21(init=zero)", "ef21", {"init": "zero"}),
        ("efbv(lam=0.1, nu=1)", "efbv", {"lam": 0.1, "nu": 1.0}),
        ("efbv(0.1, 0.5)", "efbv", {"lam": 0.1, "nu": 0.5}),
        (" diana(a=0.25) ", "diana", {"a": 0.25}),
    ],
)
def test_parse_spec(spec, name, args):
    assert parse_spec(spec) == (name, args)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("efb", "valid names: diana, ef, ef21, efbv, none"),
        ("efbv(lamb=0.1)", "valid arguments: lam, nu, init"),
        ("ef(0.5)", "valid arguments: none"),
        ("efbv(lam=0)", "lam must be a number in (0, 1]"),
        ("efbv(lam=1.5)", "lam must be a number in (0, 1]"),
        ("ef21(init=ones)", "init must be one of full, zero"),
        ("efbv(0.1, nu=0.2, lam=0.3)", "given twice"),
        ("ef21 | ef", "no '|'"),
        ("efbv(lam=", "cannot parse"),
        ("", "valid names"),
    ],
)
def test_bad_specs_name_the_valid_choices(spec, message):
    with pytest.raises(FeedbackError, match=message.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        parse_spec(spec)


def test_theory_defaults_are_resolved_from_the_compressor():
    comp = build_compressor("topk(k=56) | randk(k=1)")
    m = build("efbv", comp, dim=112, num_clients=1000)
    assert m.lam == pytest.approx(0.0053, abs=5e-5) and m.nu == 1.0
    assert build("efbv(nu=0.5)", comp, dim=112, num_clients=1000).nu == 0.5
    shared = build("efbv", comp, dim=112, num_clients=1000, shared_randomness=True)
    assert shared.nu == pytest.approx(theory.efbv_nu(math.sqrt(0.5), 55.0))
    assert build("diana", build_compressor("randk(k=8)"), dim=64).a == pytest.approx(1 / 8)
    with pytest.raises(FeedbackError, match="need dim and num_clients"):
        build("efbv", comp)
    with pytest.raises(FeedbackError, match="no closed-form"):
        build("efbv", _NoConstants(), dim=10, num_clients=2)


class _NoConstants:
    spec = "mystery"

    def eta(self, d):
        return None

    def omega(self, d):
        return 0.0


# --------------------------------------------------------------------------- theory (algorithms.md section 2)


@pytest.mark.parametrize(
    "spec, lam, nu, gamma_l",
    [
        ("topk(k=1)", 1.0, 1.0, 2.2e-3),
        ("randk(k=1)", 0.0089, 0.90, 7.0e-3),
        ("topk(k=56) | randk(k=1)", 0.0053, 1.0, 5.2e-4),
    ],
)
def test_efbv_worked_values(spec, lam, nu, gamma_l):
    """d = 112, n = 1000, L = L~ = 1, independent randomness: the worked values of algorithms.md."""
    c = build_compressor(spec)
    p = theory.efbv_parameters(c.eta(112), c.omega(112), 1000, L=1.0, L_tilde=1.0)
    assert p.lam == pytest.approx(lam, rel=0.01)
    assert p.nu == pytest.approx(nu, rel=0.01)
    # the document gives two significant digits
    assert p.gamma == pytest.approx(gamma_l, rel=0.025)


def test_efbv_formulas_in_closed_form():
    # rand-1 scaled: eta = 0, omega = 111, omega_av = 0.111
    p = theory.efbv_parameters(0.0, 111.0, 1000, L=1.0, L_tilde=1.0)
    assert p.lam == pytest.approx(1 / 112)
    assert p.nu == pytest.approx(1 / 1.111)
    assert p.r == pytest.approx(111 / 112)  # (1 - lam)^2 + lam^2 omega
    assert p.r_av == pytest.approx(0.111 / 1.111)
    s = math.sqrt((1 + p.r) / (2 * p.r)) - 1
    assert p.s == pytest.approx(s)
    assert p.gamma == pytest.approx(1 / (1 + math.sqrt(p.r_av / p.r) / s))
    # top-1: r = r_av = eta^2, so gamma = 1 / (L + L~ / s*)
    q = theory.efbv_parameters(math.sqrt(1 - 1 / 112), 0.0, 1000, L=1.0, L_tilde=1.0)
    assert q.gamma == pytest.approx(1 / (1 + 1 / q.s))
    # an exact compressor: lam = nu = 1, r = 0, gamma = 1 / L
    e = theory.efbv_parameters(0.0, 0.0, 10, L=2.0, L_tilde=3.0)
    assert (e.lam, e.nu, e.r, e.gamma) == (1.0, 1.0, 0.0, 0.5)


def test_ef21_and_diana_stepsizes():
    alpha = 1 / 112
    theta = 1 - math.sqrt(1 - alpha)
    beta = (1 - alpha) / theta
    assert theory.ef21_stepsize(alpha, 1.0, 1.0) == pytest.approx(1 / (1 + math.sqrt(beta / theta)))
    assert theory.ef21_stepsize(alpha, 1.0, 1.0) == pytest.approx(4.47e-3, rel=1e-3)
    assert theory.ef21_stepsize(alpha, 1.0, 1.0, mu=1.0) == pytest.approx(theta / 2)
    assert theory.ef21_stepsize(1.0, 2.0, 5.0) == 0.5
    assert theory.diana_a(111.0) == pytest.approx(1 / 112)
    assert theory.diana_stepsize(111.0, 1000, 2.0) == pytest.approx(1 / ((1 + 6 * 0.111) * 2.0))
    assert theory.diana_stepsize(111.0, 1000, 2.0, shared_randomness=True) == pytest.approx(1 / ((1 + 666) * 2.0))
    with pytest.raises(FeedbackError, match="contractive"):
        theory.ef21_stepsize(0.0, 1.0, 1.0)


def test_theory_stepsize_of_a_built_mechanism():
    comp = build_compressor("topk(k=1)")
    for spec in ("ef21", "efbv", "diana(a=0.5)"):
        m = build(spec, comp, dim=112, num_clients=1000)
        out = theory.theory_stepsize(m, comp, dim=112, num_clients=1000, L=1.0, L_tilde=1.0)
        assert out["gamma"] > 0 and out["mechanism"] == m.spec
    with pytest.raises(FeedbackError, match="give lr"):
        theory.theory_stepsize(build("ef", comp), comp, dim=112, num_clients=10, L=1.0, L_tilde=1.0)


# --------------------------------------------------------------------------- mechanics


def test_ef_residual_is_the_local_compression_error():
    comp = build_compressor("topk(k=2)")
    m = build("ef", comp)
    state: dict[str, torch.Tensor] = {}
    v1 = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    m.client_step(v1, state)
    assert torch.equal(state["feedback.e"], torch.tensor([0.0, -1.0, 0.5, 0.0], dtype=torch.float64))
    v2 = torch.tensor([0.0, -1.5, 0.0, 0.1], dtype=torch.float64)
    payload = m.client_step(v2, state)
    p = torch.tensor([0.0, -2.5, 0.5, 0.1], dtype=torch.float64)
    assert torch.equal(comp.decompress(payload), torch.tensor([0.0, -2.5, 0.5, 0.0], dtype=torch.float64))
    assert torch.equal(state["feedback.e"], p - comp.decompress(payload))


def test_prepare_does_not_touch_the_state_and_commit_applies_it():
    m = build("ef21", build_compressor("topk(k=1)"))
    state = {"feedback.g": torch.zeros(3, dtype=torch.float64), "other": torch.ones(1)}
    out = m.prepare(torch.tensor([1.0, -4.0, 2.0], dtype=torch.float64), state, None)
    assert torch.equal(state["feedback.g"], torch.zeros(3, dtype=torch.float64))
    m.commit(state, out)
    assert torch.equal(state["feedback.g"], torch.tensor([0.0, -4.0, 0.0], dtype=torch.float64))
    assert torch.equal(state["other"], torch.ones(1))


def test_first_message_is_dense_with_full_init():
    m = build("ef21", build_compressor("topk(k=1)"))
    state: dict[str, torch.Tensor] = {}
    v = torch.tensor([1.0, -4.0, 2.0], dtype=torch.float64)
    out = m.prepare(v, state, None)
    assert out.initial and torch.equal(out.sent, v)
    zero = build("ef21(init=zero)", build_compressor("topk(k=1)")).prepare(v, state, None)
    assert not zero.initial and torch.count_nonzero(zero.sent) == 1


def test_server_rejects_bad_messages():
    server = build("ef21", build_compressor("topk(k=1)")).server(3)
    v = torch.zeros(4)
    with pytest.raises(FeedbackError, match="no client messages"):
        server.aggregate({})
    with pytest.raises(FeedbackError, match="outside 0..2"):
        server.aggregate({3: v})
    with pytest.raises(FeedbackError, match="replied twice"):
        server.aggregate([(1, v), (1, v)])
    with pytest.raises(FeedbackError, match="length 5"):
        server.aggregate({0: v, 1: torch.zeros(5)})
    with pytest.raises(FeedbackError, match="weights"):
        build("none", build_compressor("topk(k=1)")).server(2, weights=[1.0, -1.0])


@pytest.mark.parametrize("spec", ["ef", "ef21", "efbv(lam=0.3, nu=0.6)", "diana(a=0.2, init=full)"])
def test_state_persists_across_rounds_in_which_a_client_is_not_sampled(spec):
    """A client's memory changes only in the rounds it sends, and the server's running mean covers every client."""
    gen = torch.Generator().manual_seed(0)
    n, d = 6, 10
    comp = build_compressor("randk(k=3)" if spec.startswith("diana") else "topk(k=3)")
    m = build(spec, comp)
    weights = [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
    server = m.server(n, weights)
    states: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    cohorts = [[0, 1, 2], [3, 4], [0, 5], [1, 2, 3, 4, 5], [5], [0, 2, 4]]
    for t, cohort in enumerate(cohorts):
        before = [{k: v.clone() for k, v in s.items()} for s in states]
        replies = {}
        for i in cohort:
            v = torch.randn(d, dtype=torch.float64, generator=gen)
            replies[i] = comp.decompress(m.client_step(v, states[i], torch.Generator().manual_seed(100 * t + i)))
        server.aggregate(replies)
        for i in range(n):
            if i in cohort:
                assert set(states[i]) == set(m.client_keys)
                assert any(not torch.equal(states[i][k], before[i].get(k, torch.zeros(d))) for k in m.client_keys)
            else:
                assert states[i].keys() == before[i].keys()
                assert all(torch.equal(states[i][k], before[i][k]) for k in states[i])
    p = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    for key in ("g", "h"):
        if key in server.state:
            memory = [s.get(f"feedback.{key}", torch.zeros(d, dtype=torch.float64)) for s in states]
            expected = sum(p[i] * memory[i] for i in range(n))
            torch.testing.assert_close(server.state[key], expected, rtol=1e-12, atol=1e-14)


def test_efbv_generalises_ef21_and_diana(objective):
    """EF-BV with lam = nu = 1 is EF21, with nu = 1 and lam = a is DIANA (same randomness, same iterates)."""
    run = dict(rounds=25, gamma=1 / objective.L, seed=3, wire=False)
    ef21 = run_gradient_mode(objective, "ef21", "topk(k=3)", **run)
    efbv = run_gradient_mode(objective, "efbv(lam=1, nu=1)", "topk(k=3)", **run)
    torch.testing.assert_close(efbv.x, ef21.x, rtol=1e-12, atol=1e-14)
    diana = run_gradient_mode(objective, "diana(a=0.125)", "randk(k=8)", **run)
    efbv = run_gradient_mode(objective, "efbv(lam=0.125, nu=1, init=zero)", "randk(k=8)", **run)
    torch.testing.assert_close(efbv.x, diana.x, rtol=1e-12, atol=1e-14)


def test_downlink_client_detects_a_missed_broadcast():
    down = build_downlink("ef21p", "topk(k=2)")
    x0 = torch.zeros(5, dtype=torch.float64)
    server = down.server(x0)
    state: dict[str, torch.Tensor] = {}
    first = server.broadcast(torch.arange(5.0, dtype=torch.float64))
    w = down.receive(first, state, x0)
    torch.testing.assert_close(w, server.w)
    server.broadcast(torch.ones(5, dtype=torch.float64))
    third = server.broadcast(torch.ones(5, dtype=torch.float64))
    with pytest.raises(FeedbackError, match="missed 1"):
        down.receive(Broadcast(third.payload, third.step), state, x0)
    with pytest.raises(FeedbackError, match="valid names: ef21p, plain"):
        build_downlink("ef22p", "topk(k=2)")


# --------------------------------------------------------------------------- convergence (gradient mode)


def test_ef21_topk_converges_linearly_while_plain_topk_stalls(objective):
    """top-2 of 65 coordinates (3 %): EF21 reaches ||grad f||^2 < 1e-10; without feedback it stalls near 2e-2."""
    gamma = 1 / objective.L  # 69 times the theory stepsize 1/(L + L~ sqrt(beta/theta)); EF21 is stable far above it
    ef21 = run_gradient_mode(objective, "ef21", "topk(k=2)", 210, gamma, seed=0)
    assert ef21.bits_counted and ef21.final.bits_up_total > 0
    g = ef21.column("grad_norm_sq")
    assert g[-1] < 1e-10
    assert ef21.final.dist_sq < 1e-8 and ef21.final.subopt < 1e-9
    # linear: every 50 rounds at least 20 times lower
    for a in range(100, 211, 50):
        assert max(g[a - 5 : a + 1]) < max(g[a - 55 : a - 49]) / 20
    plain = run_gradient_mode(objective, "none", "topk(k=2)", 60, gamma, seed=0, wire=False)
    assert min(window(plain, "grad_norm_sq", 30)) > 1e-3


def test_diana_randk_reaches_the_optimum_while_plain_randk_has_a_noise_floor(objective):
    """Scaled rand-8 (omega = 7.1): DIANA's shifts learn the clients' gradients at x*, rand-k alone cannot."""
    gamma = 1 / objective.L  # about 3 times DIANA's theory stepsize 1/((1 + 6 omega/n) L)
    diana = run_gradient_mode(objective, "diana", "randk(k=8)", 250, gamma, seed=0)
    assert diana.final.grad_norm_sq < 1e-10
    assert diana.final.dist_sq < 1e-8
    plain = run_gradient_mode(objective, "none", "randk(k=8)", 60, gamma, seed=0, wire=False)
    floor = window(plain, "grad_norm_sq", 30)
    assert min(floor) > 1e-4
    assert plain.final.dist_sq > 1e-3


def test_classic_ef_topk_converges(objective):
    """Classic EF with top-16 goes from 3e-2 to below 2e-4, far under the no-feedback stall (about 1e-2).

    With a constant stepsize and heterogeneous clients classic EF converges to a neighbourhood of x*
    that shrinks with the stepsize (like gamma^2); EF21 and EF-BV remove it. Measured over 1000 rounds,
    the largest ||grad f||^2 per 50 rounds settles near 3e-3 at gamma = 1/L and 2e-5 to 1e-4 at 1/(4L).
    """
    small = run_gradient_mode(objective, "ef", "topk(k=16)", 300, 1 / (4 * objective.L), seed=0, wire=False)
    late = window(small, "grad_norm_sq", 250)
    assert max(late) < 2e-4
    plain = run_gradient_mode(objective, "none", "topk(k=16)", 60, 1 / objective.L, seed=0, wire=False)
    assert min(window(plain, "grad_norm_sq", 30)) > 50 * max(late)


def test_efbv_beats_ef21_at_equal_bytes_with_comp_k_k(objective):
    """comp-(2, 32) = top-32 then rand-2 scaled by 16: C(0.71, 15), not contractive.

    EF21 needs a contractive compressor, so (as in the EF-BV paper) EF21 runs on lambda* C, which is
    EF-BV with nu = lambda*; EF-BV takes nu* = 0.35 instead of lambda* = 0.019 (omega_av = omega/20 with
    independent randomness). Both send the same payloads, so equal bytes is equal rounds.
    """
    comp = "topk(k=32) | randk(k=2)"
    efbv = build("efbv", build_compressor(comp), dim=objective.dim, num_clients=N_CLIENTS)
    assert efbv.nu > 10 * efbv.lam
    gamma = 1 / objective.L
    a = run_gradient_mode(objective, efbv, comp, 150, gamma, seed=0)
    b = run_gradient_mode(objective, f"efbv(lam={efbv.lam!r}, nu={efbv.lam!r})", comp, 150, gamma, seed=0)
    budget = min(a.final.bits_up_total, b.final.bits_up_total)
    assert abs(a.final.bits_up_total - b.final.bits_up_total) < 0.01 * budget
    assert a.best_within(budget) < b.best_within(budget) / 5
    # EF21 on the unscaled (non-contractive) compressor diverges
    raw = run_gradient_mode(objective, "ef21", comp, 25, gamma, seed=0, wire=False)
    assert raw.diverged or raw.final.grad_norm_sq > 1e3


def test_partial_participation_keeps_state_and_converges(objective):
    """5 of 20 clients per round: EF21 still converges; the server's g stays the mean of all clients' g_i."""
    states: list[dict[str, torch.Tensor]] = [{} for _ in range(N_CLIENTS)]
    h = run_gradient_mode(
        objective, "ef21", "topk(k=2)", 600, 1 / objective.L, seed=0, participation=0.25, states=states
    )
    assert set(h.column("clients")[1:]) == {5}
    assert all(s for s in states)  # every client has been sampled and kept its memory
    assert h.final.grad_norm_sq < 1e-8
    expected = sum(s["feedback.g"] for s in states) / N_CLIENTS
    torch.testing.assert_close(h.server_state["g"], expected, rtol=1e-10, atol=1e-14)


def test_compressed_downlink_with_feedback_converges_to_the_same_optimum(objective):
    """EF21 top-2 up, EF21-P top-8 down: the clients compute at w, w -> x -> x*; plain top-8 down does not."""
    gamma = 1 / objective.L
    both = run_gradient_mode(objective, "ef21", "topk(k=2)", 250, gamma, seed=0, downlink="topk(k=8)")
    assert both.final.grad_norm_sq < 1e-10
    assert both.final.dist_sq < 1e-9
    assert both.final.bits_down_total > 0
    plain = run_gradient_mode(
        objective, "ef21", "topk(k=2)", 60, gamma, seed=0, downlink="topk(k=8)", downlink_feedback="plain", wire=False
    )
    assert plain.final.grad_norm_sq > 1e-3
