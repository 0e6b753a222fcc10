"""Theory-derived parameters and stepsizes for EF21, DIANA and EF-BV (algorithms.md section 2).

Notation: C in C(eta, omega) (algorithms.md section 1), n clients, L the smoothness constant of f,
L_tilde = sqrt((1/n) sum_i L_i^2), mu the strong convexity (or PL) constant.
omega_av is the variance of the average of the n clients' compressed vectors relative to omega:
omega / n when the clients draw their randomness independently, omega when they share it.

EF-BV (Condat, Yi, Richtarik, "EF-BV: A Unified Theory of Error Feedback and Variance Reduction
Mechanisms for Biased and Unbiased Compression in Distributed Optimization", NeurIPS 2022):
    lambda* = min(1, (1 - eta) / ((1 - eta)^2 + omega))
    nu*     = min(1, (1 - eta) / ((1 - eta)^2 + omega_av))
    r    = (1 - lambda + lambda eta)^2 + lambda^2 omega      (contraction of lambda C)
    r_av = (1 - nu + nu eta)^2 + nu^2 omega_av
    s*   = sqrt((1 + r) / (2 r)) - 1
    gamma = 1 / (L + L_tilde sqrt(r_av / r) / s*)
EF21 (Richtarik, Sokolov, Fatkhullin, NeurIPS 2021, Theorem 1; with mu, Theorem 2 under PL):
    theta = 1 - sqrt(1 - alpha), beta = (1 - alpha) / (1 - sqrt(1 - alpha)),
    gamma = 1 / (L + L_tilde sqrt(beta / theta)), and gamma <= theta / (2 mu) under PL.
DIANA (Mishchenko et al. 2019; Horvath et al. 2019): a = 1 / (omega + 1),
    gamma = 1 / ((1 + 6 omega_av) L), which is algorithms.md's 1 / ((1 + 6 omega / n) L) for
    independent randomness (for shared randomness omega_av = omega, a conservative extension).

Worked values (algorithms.md, d = 112, n = 1000, L = L_tilde = 1), reproduced by
tests/test_feedback.py: top-1 gives lambda = nu = 1, gamma L = 2.245e-3; scaled rand-1 with
independent randomness lambda = 1/112 = 0.00893, nu = 0.9001, gamma L = 7.04e-3; comp-(1, 56)
lambda = 0.00532, nu = 1, gamma L = 5.22e-4. Note that EF-BV's stepsize for top-1 is half of
EF21's own (4.47e-3): the EF-BV analysis pays a factor of about 2 in s* for its generality.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from .base import Codec, FeedbackError


def omega_average(omega: float, num_clients: int, shared_randomness: bool = False) -> float:
    """omega_av: omega / n for independent randomness, omega for shared randomness."""
    if num_clients < 1:
        raise FeedbackError(f"num_clients must be >= 1, got {num_clients}")
    return omega if shared_randomness else omega / num_clients


def _check_constants(eta: float, omega: float) -> None:
    if not (math.isfinite(eta) and math.isfinite(omega)) or eta < 0 or omega < 0:
        raise FeedbackError(f"compressor constants must be finite and >= 0, got eta={eta}, omega={omega}")
    if eta >= 1:
        raise FeedbackError(f"EF-BV needs eta < 1 (a compressor that keeps some of x), got eta={eta}")


def efbv_lambda(eta: float, omega: float) -> float:
    """lambda* = min(1, (1 - eta) / ((1 - eta)^2 + omega))."""
    _check_constants(eta, omega)
    return min(1.0, (1.0 - eta) / ((1.0 - eta) ** 2 + omega))


def efbv_nu(eta: float, omega_av: float) -> float:
    """nu* = min(1, (1 - eta) / ((1 - eta)^2 + omega_av))."""
    _check_constants(eta, omega_av)
    return min(1.0, (1.0 - eta) / ((1.0 - eta) ** 2 + omega_av))


def contraction(scale: float, eta: float, omega: float) -> float:
    """r(scale) = (1 - scale + scale eta)^2 + scale^2 omega: how much scale * C contracts."""
    return (1.0 - scale + scale * eta) ** 2 + scale * scale * omega


def efbv_stepsize(r: float, r_av: float, L: float, L_tilde: float) -> float:
    """gamma = 1 / (L + L_tilde sqrt(r_av / r) / s*), s* = sqrt((1 + r) / (2 r)) - 1.

    Computed as sqrt(r_av) / (sqrt((1 + r) / 2) - sqrt(r)), which equals sqrt(r_av / r) / s* and
    stays finite at r = 0 (an exact compressor: gamma = 1 / (L + L_tilde sqrt(2 r_av))).
    """
    if not 0.0 <= r < 1.0:
        raise FeedbackError(f"EF-BV needs r = r(lambda) in [0, 1) (lambda C contractive), got r={r}")
    if r_av < 0 or L <= 0 or L_tilde < 0:
        raise FeedbackError(f"bad constants r_av={r_av}, L={L}, L_tilde={L_tilde}")
    return 1.0 / (L + L_tilde * math.sqrt(r_av) / (math.sqrt((1.0 + r) / 2.0) - math.sqrt(r)))


@dataclass(frozen=True)
class EFBVParameters:
    eta: float
    omega: float
    omega_av: float
    lam: float
    nu: float
    r: float
    r_av: float
    s: float
    #: None when L was not given
    gamma: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def efbv_parameters(
    eta: float,
    omega: float,
    num_clients: int,
    *,
    shared_randomness: bool = False,
    L: float | None = None,
    L_tilde: float | None = None,
    lam: float | None = None,
    nu: float | None = None,
) -> EFBVParameters:
    """EF-BV's lambda, nu (theory values unless given), r, r_av, s* and, with L, the stepsize."""
    omega_av = omega_average(omega, num_clients, shared_randomness)
    lam = efbv_lambda(eta, omega) if lam is None else lam
    nu = efbv_nu(eta, omega_av) if nu is None else nu
    r = contraction(lam, eta, omega)
    r_av = contraction(nu, eta, omega_av)
    s = math.sqrt((1.0 + r) / (2.0 * r)) - 1.0 if r > 0 else math.inf
    gamma = None
    if L is not None:
        gamma = efbv_stepsize(r, r_av, L, L if L_tilde is None else L_tilde)
    return EFBVParameters(eta, omega, omega_av, lam, nu, r, r_av, s, gamma)


def ef21_stepsize(alpha: float, L: float, L_tilde: float, mu: float | None = None) -> float:
    """1 / (L + L_tilde sqrt(beta / theta)); with mu (PL case) also at most theta / (2 mu)."""
    if not 0.0 < alpha <= 1.0:
        raise FeedbackError(f"EF21 needs a contractive compressor, alpha in (0, 1], got {alpha}")
    root = math.sqrt(1.0 - alpha)
    theta = 1.0 - root
    beta = (1.0 - alpha) / theta
    gamma = 1.0 / (L + L_tilde * math.sqrt(beta / theta))
    if mu is not None:
        gamma = min(gamma, theta / (2.0 * mu))
    return gamma


def diana_a(omega: float) -> float:
    """a = 1 / (omega + 1)."""
    if not math.isfinite(omega) or omega < 0:
        raise FeedbackError(f"DIANA needs a finite omega >= 0, got {omega}")
    return 1.0 / (omega + 1.0)


def diana_stepsize(omega: float, num_clients: int, L: float, *, shared_randomness: bool = False) -> float:
    """gamma = 1 / ((1 + 6 omega_av) L)."""
    return 1.0 / ((1.0 + 6.0 * omega_average(omega, num_clients, shared_randomness)) * L)


# --------------------------------------------------------------------------- codec constants


def codec_constants(codec: Codec, dim: int) -> tuple[float, float]:
    """(eta, omega) of a Compressor at dimension dim, or the worst over the groups of a per-tensor plan.

    A plan's groups act on disjoint coordinates, so the bias and variance bounds of the whole vector
    are the largest of the groups' bounds. FeedbackError if a constant has no closed form.
    """
    groups = getattr(codec, "groups", None)
    if groups is not None:
        pairs = [_constants(g.compressor, g.numel, f"group {g.key!r}") for g in groups]
        return max(p[0] for p in pairs), max(p[1] for p in pairs)
    if dim is None:
        raise FeedbackError("the vector length dim is needed to read the compressor's constants")
    return _constants(codec, dim, "compressor")


def _constants(compressor: Any, d: int, what: str) -> tuple[float, float]:
    eta = compressor.eta(d) if hasattr(compressor, "eta") else None
    omega = compressor.omega(d) if hasattr(compressor, "omega") else None
    if eta is None or omega is None:
        spec = getattr(compressor, "spec", compressor)
        raise FeedbackError(
            f"{what} {spec} declares no closed-form (eta, omega) for d={d}; give the parameters explicitly"
        )
    return float(eta), float(omega)


def codec_alpha(codec: Codec, dim: int) -> float:
    """The contraction parameter alpha = 1 - (eta^2 + omega) (worst group of a plan)."""
    eta, omega = codec_constants(codec, dim)
    alpha = 1.0 - (eta * eta + omega)
    if alpha <= 0:
        raise FeedbackError(f"the compressor is not contractive (eta^2 + omega = {eta * eta + omega:.4g} >= 1)")
    return alpha


# --------------------------------------------------------------------------- stepsize for a run


def theory_stepsize(
    mechanism: Any,
    codec: Codec,
    *,
    dim: int,
    num_clients: int,
    L: float,
    L_tilde: float,
    mu: float | None = None,
    shared_randomness: bool = False,
) -> dict[str, Any]:
    """The theory stepsize of a built mechanism and every value used, for the run's config.

    Returns {"gamma": ..., "rule": ..., plus the constants}. FeedbackError for mechanisms without a
    stepsize rule in algorithms.md (none, ef): give lr explicitly for those.
    """
    name = mechanism.name
    eta, omega = codec_constants(codec, dim)
    base = {"mechanism": mechanism.spec, "eta": eta, "omega": omega, "L": L, "L_tilde": L_tilde}
    if name == "ef21":
        alpha = 1.0 - (eta * eta + omega)
        gamma = ef21_stepsize(alpha, L, L_tilde, mu)
        return {**base, "rule": "ef21", "alpha": alpha, "mu": mu, "gamma": gamma}
    if name == "diana":
        omega_av = omega_average(omega, num_clients, shared_randomness)
        return {**base, "rule": "diana", "a": mechanism.a, "omega_av": omega_av,
                "gamma": diana_stepsize(omega, num_clients, L, shared_randomness=shared_randomness)}  # fmt: skip
    if name == "efbv":
        p = efbv_parameters(
            eta, omega, num_clients, shared_randomness=shared_randomness, L=L, L_tilde=L_tilde,
            lam=mechanism.lam, nu=mechanism.nu,
        )  # fmt: skip
        return {**base, "rule": "efbv", **p.to_dict()}
    raise FeedbackError(f"no theory stepsize for feedback {name!r} (rules exist for ef21, diana, efbv); give lr")
