"""Monte Carlo checks of every operator against its declared C(eta, omega) constants.

Statistics are computed in float64 on C(x)/||x||, so huge and tiny vectors are compared on the
same footing. Tolerances come from the estimators' own spread: a mean of N samples is off by
about sqrt(V/N); an average of squared norms by about std/sqrt(N). Z = 5 standard errors with
fixed seeds: a correct operator passes deterministically, a wrong scale or a bias fails by far.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsqueeze.compressors import build
from fedsqueeze.compressors.quantizers import SKIP_SAMPLING_BELOW

Z = 5.0


def family(name: str, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "gaussian":
        return torch.randn(d, generator=g)
    if name == "heavy":  # Student-t with 1.5 degrees of freedom: a few coordinates dominate
        return torch.from_numpy(np.random.default_rng(seed).standard_t(1.5, d).astype(np.float32))
    if name == "sparse":
        x = torch.randn(d, generator=g)
        x[torch.rand(d, generator=g) < 0.9] = 0.0
        if not x.any():
            x[0] = 1.0
        return x
    if name == "constant":
        return torch.full((d,), -0.75)
    if name == "huge":
        return torch.randn(d, generator=g) * 1e30
    if name == "tiny":
        return torch.randn(d, generator=g) * 1e-30
    raise ValueError(name)


FAMILIES = ["gaussian", "heavy", "sparse", "constant", "huge", "tiny"]


def samples(spec: str, x: torch.Tensor, n: int, seed: int = 1) -> torch.Tensor:
    """n draws of C(x)/||x||, float64, one per row."""
    c = build(spec)
    g = torch.Generator().manual_seed(seed)
    norm = torch.linalg.vector_norm(x.double())
    return torch.stack([c(x, g).double() / norm for _ in range(n)])


def moments(draws: torch.Tensor, unit: torch.Tensor) -> dict[str, float]:
    """Bias, variance and contraction estimates with their standard errors (unit = x/||x||)."""
    n = draws.shape[0]
    mean = draws.mean(0)
    err_sq = ((draws - unit) ** 2).sum(1)
    if n == 1:  # a deterministic operator: the one draw is exact
        return {"bias": float(torch.linalg.vector_norm(mean - unit)), "bias_se": 0.0, "variance": 0.0,
                "variance_se": 0.0, "error": float(err_sq[0]), "error_se": 0.0}  # fmt: skip
    dev_sq = ((draws - mean) ** 2).sum(1) * n / (n - 1)
    variance = float(dev_sq.mean())
    return {
        "bias": float(torch.linalg.vector_norm(mean - unit)),
        "bias_se": math.sqrt(variance / n),
        "variance": variance,
        "variance_se": float(dev_sq.std()) / math.sqrt(n),
        "error": float(err_sq.mean()),
        "error_se": float(err_sq.std()) / math.sqrt(n),
    }


UNBIASED = [
    # spec, exact: E||C(x) - x||^2 = omega ||x||^2 holds with equality for every x
    ("randk(0.1)", True),
    ("randk(k=3)", True),
    ("bernoulli(0.3)", True),
    ("qsgd(levels=4)", False),
    ("qsgd(levels=16, norm=linf)", False),
    ("qsgd(levels=1)", False),
    ("natural", False),
    ("randk(0.5) | qsgd(levels=8)", False),
    ("bernoulli(0.5) | natural", False),
]


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("spec,exact", UNBIASED)
def test_unbiased_operators_meet_declared_omega(spec: str, exact: bool, fam: str):
    d = 40
    x = family(fam, d)
    unit = x.double() / torch.linalg.vector_norm(x.double())
    c = build(spec)
    assert c.unbiased and c.eta(d) == 0.0
    m = moments(samples(spec, x, 2000), unit)
    assert m["bias"] <= Z * m["bias_se"] + 1e-12, m
    omega = c.omega(d)
    assert m["variance"] <= omega + Z * m["variance_se"] + 1e-9, (omega, m)
    if exact:
        assert abs(m["variance"] - omega) <= Z * m["variance_se"] + 1e-9, (omega, m)


BIASED = [
    "topk(0.1)",
    "topk(k=1)",
    "randk(0.25, scaled=false)",
    "scaled_sign",
    "topk(0.5) | randk(0.2)",  # comp-(k, k')
    "topk(0.5) | qsgd(levels=4)",
    "fp16",
    "bf16",
]


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("spec", BIASED)
def test_biased_operators_meet_declared_eta_omega_and_contract(spec: str, fam: str):
    d = 40
    x = family(fam, d)
    unit = x.double() / torch.linalg.vector_norm(x.double())
    c = build(spec)
    eta, omega = c.eta(d), c.omega(d)
    m = moments(samples(spec, x, 1 if c.deterministic else 2000), unit)
    assert m["bias"] <= eta + Z * m["bias_se"] + 1e-6, (eta, m)
    assert m["variance"] <= omega + Z * m["variance_se"] + 1e-9, (omega, m)
    alpha = c.alpha(d)
    if alpha is not None:  # contraction: E||C(x) - x||^2 <= (1 - alpha)||x||^2
        assert m["error"] <= 1 - alpha + Z * m["error_se"] + 1e-6, (alpha, m)


@pytest.mark.parametrize("fam", FAMILIES)
def test_topk_keeps_the_largest_absolute_values(fam: str):
    for d in (1, 7, 1000, 200_000):  # 200_000 takes the sampled-threshold scan
        x = family(fam, d, seed=d)
        for k in {1, max(1, d // 100), d}:
            y = build(f"topk(k={k})")(x)
            kept = y != 0
            assert int(kept.sum()) <= k
            expected = torch.topk(x.abs(), k).values
            got = torch.sort(y.abs(), descending=True).values[:k]
            assert torch.equal(got, expected), (d, k)
            assert torch.equal(y[kept], x[kept])


def test_topk_uses_absolute_value_not_signed_value():
    x = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3])
    assert torch.equal(build("topk(k=2)")(x), torch.tensor([0.0, -5.0, 0.0, 3.0, 0.0]))


def test_topk_scan_on_adversarial_layouts_is_exact():
    # periodic spikes aligned with the sampling stride, and many ties at the threshold
    d = 1 << 18
    x = torch.zeros(d)
    x[:: (d // (1 << 17))] = 1.0
    x[1::977] = 2.0
    for k in (10, 2000, 30000):
        y = build(f"topk(k={k})")(x)
        assert int((y != 0).sum()) == k
        assert torch.equal(torch.sort(y.abs(), descending=True).values[:k], torch.topk(x.abs(), k).values)


LARGE = ["topk(0.01)", "randk(0.01)", "randk(0.01, scaled=false)", "bernoulli(0.01)", "qsgd(levels=16)", "natural",
         "scaled_sign", "fp16", "bf16", "topk(0.01) | qsgd(levels=16)", "topk(0.02) | randk(0.5)"]  # fmt: skip


@pytest.mark.parametrize("fam", ["gaussian", "heavy"])
@pytest.mark.parametrize("spec", LARGE)
def test_large_dimension(spec: str, fam: str):
    if fam == "heavy" and spec == "randk(0.01, scaled=false)":
        pytest.skip("heavy tails: the energy an unscaled 1 % sample keeps is too skewed for 8 draws to estimate")
    d = 1_000_000
    x = family(fam, d)
    c = build(spec)
    unit = x.double() / torch.linalg.vector_norm(x.double())
    m = moments(samples(spec, x, 1 if c.deterministic else 8), unit)
    omega = c.omega(d)
    assert m["variance"] <= omega + Z * m["variance_se"] + 1e-9, (omega, m)
    assert m["bias"] <= c.eta(d) + Z * m["bias_se"] + 1e-6, (c.eta(d), m)
    if c.unbiased:  # 8 draws: the mean is within a few sqrt(omega / 8)
        assert m["bias"] <= Z * math.sqrt(max(omega, 1e-12) / 8)
    alpha = c.alpha(d)
    if alpha is not None:
        assert m["error"] <= 1 - alpha + Z * m["error_se"] + 1e-6, (alpha, m)


EDGES = [
    # (d, spec): a single coordinate, and k = d (every coordinate kept)
    (1, "bernoulli(0.3)"),
    (1, "natural"),
    (1, "randk(1.0)"),
    (1, "bernoulli(0.5) | natural"),
    (1, "randk(1.0) | qsgd(levels=3)"),
    (1, "topk(1.0) | qsgd(levels=2)"),
    (7, "randk(k=7)"),
    (7, "topk(k=7)"),
    (7, "randk(1.0, scaled=false)"),
    (7, "bernoulli(1.0)"),
    (7, "topk(k=7) | randk(k=7)"),
    (7, "randk(k=7) | qsgd(levels=2)"),
]


@pytest.mark.parametrize("fam", ["gaussian", "heavy", "constant", "tiny"])
@pytest.mark.parametrize("d,spec", EDGES)
def test_declared_constants_hold_for_one_coordinate_and_for_k_equal_d(d: int, spec: str, fam: str):
    x = family(fam, d)
    unit = x.double() / torch.linalg.vector_norm(x.double())
    c = build(spec)
    eta, omega = c.eta(d), c.omega(d)
    m = moments(samples(spec, x, 1 if c.deterministic else 2000), unit)
    assert m["bias"] <= eta + Z * m["bias_se"] + 1e-6, (eta, m)
    assert m["variance"] <= omega + Z * m["variance_se"] + 1e-9, (omega, m)
    alpha = c.alpha(d)
    if alpha is not None:
        assert m["error"] <= 1 - alpha + Z * m["error_se"] + 1e-6, (alpha, m)


def test_single_coordinate():
    x = torch.tensor([-2.5])
    for spec in ["identity", "topk(1.0)", "randk(k=1)", "scaled_sign", "fp16", "bf16"]:
        assert torch.equal(build(spec)(x), x), spec
    assert build("sign")(x).item() == -1.0
    draws = samples("qsgd(levels=3)", x, 50)
    assert torch.allclose(draws, torch.full_like(draws, -1.0))  # |x| = ||x||: no rounding


@pytest.mark.parametrize(
    "spec", ["identity", "fp16", "bf16", "topk(0.1)", "randk(0.1)", "bernoulli(0.5)", "qsgd(levels=8)",
             "qsgd(levels=8, norm=linf)", "natural", "sign", "scaled_sign", "topk(0.5) | qsgd(levels=2)"]
)  # fmt: skip
def test_zero_vector_compresses_to_zero(spec: str):
    x = torch.zeros(50)
    y = build(spec)(x, torch.Generator().manual_seed(0))
    if spec == "sign":
        assert torch.equal(y, torch.ones(50))  # sign(0) counts as +1
    else:
        assert torch.equal(y, x)


def test_composition_constants_match_comp_k_kprime():
    # comp-(k, k') = topk(k') | randk(k, scaled=true) is in C(sqrt((d - k')/d), (k' - k)/k)
    for d, kp, k in [(112, 56, 1), (1000, 100, 10), (50, 50, 5)]:
        c = build(f"topk(k={kp}) | randk(k={k})")
        assert c.eta(d) == pytest.approx(math.sqrt((d - kp) / d))
        assert c.omega(d) == pytest.approx((kp - k) / k)


def test_composition_with_unbiased_inner_keeps_the_outer_bias():
    # E[topk(k') | qsgd] = topk(k')(x): check the Monte Carlo mean against that exactly
    x = family("gaussian", 30)
    unit = x.double() / torch.linalg.vector_norm(x.double())
    target = build("topk(k=10)")(x).double() / torch.linalg.vector_norm(x.double())
    draws = samples("topk(k=10) | qsgd(levels=2)", x, 4000)
    m = moments(draws, unit)
    assert float(torch.linalg.vector_norm(draws.mean(0) - target)) <= Z * m["bias_se"]


def test_unscaled_randk_and_scaled_sign_declare_their_alpha():
    d = 100
    assert build("randk(0.2, scaled=false)").alpha(d) == pytest.approx(0.2)
    assert build("scaled_sign").alpha(d) == pytest.approx(1 / d)
    assert build("topk(0.05)").alpha(d) == pytest.approx(0.05)
    assert build("qsgd(levels=4)").alpha(d) is None  # unbiased with omega > 0: not contractive


def test_powersgd_is_exact_on_low_rank_matrices_and_contracts():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(30, 2, generator=g), torch.randn(2, 20, generator=g)
    bias = torch.randn(30, generator=g)
    x = torch.cat([(a @ b).reshape(-1), bias])
    c = build("powersgd(rank=2)", layout=[(30, 20), (30,)])
    y = c(x, g)
    assert torch.allclose(y, x, atol=1e-4)
    # a full-rank matrix: rank 2 still contracts, and a warm start improves the fit
    x = torch.randn(600 + 30, generator=g)
    first = c.compress(x, g)
    second = c.compress(x, g, warm_start=first)
    e1 = float((c.decompress(first) - x).norm())
    e2 = float((c.decompress(second) - x).norm())
    assert e2 <= e1 + 1e-6 and e1 < float(x.norm())


@pytest.mark.parametrize("fam", ["gaussian", "constant", "support"])
def test_qsgd_skip_sampling_rounds_each_coordinate_independently(fam: str):
    """Long l2 vectors, where every rounding probability y_j = s|x_j|/||x|| is small, take the
    skip-sampling path: each magnitude must be 1 with probability y_j, independently of the others."""
    d, n = 5000, 4000
    if fam == "support":  # zeros, and uniform magnitudes on a random 30 % of the coordinates
        g = torch.Generator().manual_seed(2)
        x = (torch.rand(d, generator=g) + 0.5) * torch.randn(d, generator=g).sign() * (torch.rand(d, generator=g) < 0.3)
    else:
        x = family(fam, d)
    c = build("qsgd(levels=1)")
    y = (x.double().abs() / torch.linalg.vector_norm(x.double())).numpy()
    assert y.max() < SKIP_SAMPLING_BELOW  # the path under test
    g = torch.Generator().manual_seed(3)
    kept = torch.stack([c.compress(x, g).magnitudes.double() for _ in range(n)]).numpy()
    unit = torch.from_numpy(y * torch.sign(x.double()).numpy())
    m = moments(torch.from_numpy(kept) * torch.sign(x.double()), unit)
    assert m["bias"] <= Z * m["bias_se"] and m["variance"] <= c.omega(d) + Z * m["variance_se"], m
    live = y > 0
    freq, p = kept.mean(0)[live], y[live]
    z = (freq - p) / np.sqrt(p * (1 - p) / n)
    assert np.abs(z).max() < 6.0  # 5000 coordinates: |z| > 6 has probability ~1e-5 overall
    assert (kept[:, ~live] == 0).all()
    # the count kept per draw has mean sum_j y_j: a bias of a few percent in every y_j fails here
    assert abs(kept.sum() - n * y.sum()) <= Z * math.sqrt(n * (y * (1 - y)).sum())
    both = (kept[:, :-1] * kept[:, 1:]).sum()  # neighbours kept together: sum_j y_j y_j+1 per draw
    q = y[:-1] * y[1:]
    assert abs(both - n * q.sum()) <= Z * math.sqrt(n * (q * (1 - q)).sum()) + 1
