"""The exact federated objective of L2-regularised logistic regression, in float64.

    f(x) = (1/n) sum_i f_i(x),   f_i(x) = (1/m_i) sum_{s in client i} loss(x; a_s, y_s) + (reg/2) ||x||^2

with loss the logistic loss (binary) or softmax cross-entropy (multinomial), m_i the client's number
of training examples, and x the model's flat parameter vector [weight row-major, bias] (see
`models.LogisticRegression`). The regulariser covers the bias too, so f is mu-strongly convex with
mu = reg exactly. Note f weighs clients equally, as the convex papers do, so it differs from the
pooled mean loss when clients hold different numbers of examples.

Smoothness constants (largest Hessian eigenvalue bounds):
- binary: H_i = (1/m_i) A_i^T D A_i + reg I with D = diag(sigma(1 - sigma)) <= 1/4, so
  L_i = lambda_max(A_i^T A_i) / (4 m_i) + reg, exact in the sense used by the papers;
- multinomial: the per-example Hessian (diag(p) - p p^T) kron a a^T has
  lambda_max(diag(p) - p p^T) <= 1/2, so L_i = lambda_max(A_i^T A_i) / (2 m_i) + reg is an upper bound
  (not attained in general).
A_i includes the column of ones when the model has a bias. L is computed from the global matrix
(1/n) sum_i A_i^T A_i / m_i, so L <= mean_i L_i.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import TaskError

#: beyond this many parameters the optimum is found by Newton-CG (Hessian-vector products)
DENSE_HESSIAN_MAX_DIM = 2500
#: beyond this size eigenvalues come from Lanczos (scipy eigsh) instead of a dense eigensolver
DENSE_EIG_MAX = 4000

ArrayLike = torch.Tensor | np.ndarray | Sequence[float]


@dataclass(frozen=True)
class Optimum:
    """x* (float64, flat layout) and f* = f(x*), with the gradient norm reached."""

    x: torch.Tensor
    f: float
    grad_norm: float
    iterations: int

    def to_dict(self) -> dict[str, Any]:
        return {"f": self.f, "grad_norm": self.grad_norm, "iterations": self.iterations, "x": self.x.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Optimum:
        x = torch.tensor(d["x"], dtype=torch.float64)
        return cls(x, float(d["f"]), float(d["grad_norm"]), int(d["iterations"]))


class LogisticObjective:
    """f, grad f, per-client f_i and grad f_i, Hessians, smoothness constants and the optimum."""

    def __init__(
        self,
        features: Sequence[np.ndarray | torch.Tensor],
        labels: Sequence[np.ndarray | torch.Tensor],
        num_classes: int,
        reg: float,
        *,
        bias: bool = True,
    ) -> None:
        if len(features) != len(labels) or not features:
            raise TaskError("LogisticObjective needs one (features, labels) pair per client, at least one client")
        if not reg > 0:
            raise TaskError(f"the L2 regularisation reg must be > 0 for a strongly convex objective, got {reg}")
        if num_classes < 2:
            raise TaskError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.binary = num_classes == 2
        self.reg = float(reg)
        self.bias = bias
        mats, ys, sizes = [], [], []
        for a, y in zip(features, labels, strict=True):
            a64 = torch.as_tensor(np.asarray(a), dtype=torch.float64).reshape(len(a), -1)
            if len(a64) == 0:
                raise TaskError("every client needs at least one training example")
            if bias:
                a64 = torch.cat([a64, torch.ones(len(a64), 1, dtype=torch.float64)], dim=1)
            mats.append(a64)
            ys.append(torch.as_tensor(np.asarray(y), dtype=torch.int64))
            sizes.append(len(a64))
        self.num_clients = len(mats)
        self.num_features = mats[0].shape[1] - (1 if bias else 0)
        self._p = mats[0].shape[1]  # columns of A (features + bias column)
        self._k = 1 if self.binary else num_classes  # rows of Theta
        self.dim = self._k * self._p
        self._a = torch.cat(mats)
        self._y = torch.cat(ys)
        if self._y.min() < 0 or self._y.max() >= num_classes:
            raise TaskError(f"labels must lie in [0, {num_classes})")
        self._sizes = sizes
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        # f = sum_s w_s loss_s + reg/2 ||x||^2 with w_s = 1 / (n m_i)
        self._w = torch.cat([torch.full((m,), 1.0 / (self.num_clients * m), dtype=torch.float64) for m in sizes])
        self._y1h = None if self.binary else torch.nn.functional.one_hot(self._y, num_classes).to(torch.float64)
        self._perm = self._flat_to_theta_index()
        self._inv_perm = torch.argsort(self._perm)
        self._optimum: Optimum | None = None
        self._L: float | None = None
        self._L_i: list[float] | None = None

    # ------------------------------------------------------------------ layout

    def _flat_to_theta_index(self) -> torch.Tensor:
        """perm[j] = position in Theta.flatten() of flat parameter j ([W row-major, b] -> Theta (k, p))."""
        k, p, d = self._k, self._p, self.num_features
        idx = [r * p + c for r in range(k) for c in range(d)]
        if self.bias:
            idx += [r * p + d for r in range(k)]
        return torch.tensor(idx, dtype=torch.int64)

    def _theta(self, x: ArrayLike) -> torch.Tensor:
        v = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).detach()
        v = v.to(dtype=torch.float64).reshape(-1)
        if v.numel() != self.dim:
            raise TaskError(f"parameter vector has {v.numel()} entries, the objective expects {self.dim}")
        theta = torch.empty(self.dim, dtype=torch.float64)
        theta[self._perm] = v
        return theta.reshape(self._k, self._p)

    def _flat(self, theta: torch.Tensor) -> torch.Tensor:
        return theta.reshape(-1)[self._perm]

    def _rows(self, client: int | None) -> slice:
        if client is None:
            return slice(0, len(self._y))
        if not 0 <= client < self.num_clients:
            raise TaskError(f"client index {client} out of range [0, {self.num_clients})")
        return slice(self._offsets[client], self._offsets[client + 1])

    def _weights(self, client: int | None, rows: slice) -> torch.Tensor:
        if client is None:
            return self._w[rows]
        return torch.full((rows.stop - rows.start,), 1.0 / self._sizes[client], dtype=torch.float64)

    # ------------------------------------------------------------------ values

    def _value_grad(self, x: ArrayLike, client: int | None, want_grad: bool) -> tuple[float, torch.Tensor | None]:
        theta = self._theta(x)
        rows = self._rows(client)
        a, y, w = self._a[rows], self._y[rows], self._weights(client, rows)
        reg_val = 0.5 * self.reg * float(theta.pow(2).sum())
        if self.binary:
            z = a @ theta[0]
            yf = y.to(torch.float64)
            loss = float((w * (torch.nn.functional.softplus(z) - yf * z)).sum())
            if not want_grad:
                return loss + reg_val, None
            g_theta = ((w * (torch.sigmoid(z) - yf)) @ a).unsqueeze(0)
        else:
            z = a @ theta.T
            lse = torch.logsumexp(z, dim=1)
            loss = float((w * (lse - z.gather(1, y[:, None]).squeeze(1))).sum())
            if not want_grad:
                return loss + reg_val, None
            assert self._y1h is not None
            prob = torch.softmax(z, dim=1)
            g_theta = ((prob - self._y1h[rows]) * w[:, None]).T @ a
        return loss + reg_val, self._flat(g_theta + self.reg * theta)

    def f(self, x: ArrayLike) -> float:
        """The global objective f(x) = (1/n) sum_i f_i(x)."""
        return self._value_grad(x, None, False)[0]

    def grad(self, x: ArrayLike) -> torch.Tensor:
        """grad f(x), float64, flat layout."""
        g = self._value_grad(x, None, True)[1]
        assert g is not None
        return g

    def f_i(self, client: int, x: ArrayLike) -> float:
        """Client `client`'s f_i(x): its mean loss plus (reg/2)||x||^2."""
        return self._value_grad(x, client, False)[0]

    def grad_i(self, client: int, x: ArrayLike) -> torch.Tensor:
        g = self._value_grad(x, client, True)[1]
        assert g is not None
        return g

    def value_and_grad(self, x: ArrayLike, client: int | None = None) -> tuple[float, torch.Tensor]:
        value, g = self._value_grad(x, client, True)
        assert g is not None
        return value, g

    def hessian(self, x: ArrayLike, client: int | None = None) -> torch.Tensor:
        """The exact Hessian of f (or of f_client) at x, (dim, dim) float64, flat layout."""
        theta = self._theta(x)
        rows = self._rows(client)
        a, w = self._a[rows], self._weights(client, rows)
        if self.binary:
            s = torch.sigmoid(a @ theta[0])
            h = _gram(a, w * s * (1 - s))
        else:
            # sum_s w_s (diag(p_s) - p_s p_s^T) kron a_s a_s^T: block diagonal minus a low-rank Gram
            prob = torch.softmax(a @ theta.T, dim=1)
            k, p = self._k, self._p
            b = (w.sqrt()[:, None, None] * prob[:, :, None] * a[:, None, :]).reshape(len(a), k * p)
            h = -_gram(b)
            for c in range(k):
                h[c * p : (c + 1) * p, c * p : (c + 1) * p] += _gram(a, w * prob[:, c])
            h = h[self._perm][:, self._perm]
        h.diagonal().add_(self.reg)
        return h

    def hvp(self, x: ArrayLike, v: ArrayLike, client: int | None = None) -> torch.Tensor:
        """Hessian-vector product at x (flat layout), without forming the Hessian."""
        theta = self._theta(x)
        vt = self._theta(v)
        rows = self._rows(client)
        a, w = self._a[rows], self._weights(client, rows)
        if self.binary:
            s = torch.sigmoid(a @ theta[0])
            out = ((w * s * (1 - s) * (a @ vt[0])) @ a).unsqueeze(0)
        else:
            prob = torch.softmax(a @ theta.T, dim=1)
            u = a @ vt.T
            r = prob * (u - (prob * u).sum(dim=1, keepdim=True))
            out = (r * w[:, None]).T @ a
        return self._flat(out + self.reg * vt)

    # ------------------------------------------------------------------ constants

    @property
    def mu(self) -> float:
        """Strong convexity constant of f and of every f_i (the L2 term)."""
        return self.reg

    @property
    def curvature(self) -> float:
        """Bound on the loss's second derivative in the logit: 1/4 (binary) or 1/2 (multinomial)."""
        return 0.25 if self.binary else 0.5

    @property
    def L(self) -> float:
        """Smoothness constant of f: curvature * lambda_max((1/n) sum_i A_i^T A_i / m_i) + reg."""
        if self._L is None:
            self._L = self.curvature * _lambda_max(self._a, self._w) + self.reg
        return self._L

    @property
    def L_i(self) -> list[float]:
        """Smoothness constant of each f_i: curvature * lambda_max(A_i^T A_i) / m_i + reg."""
        if self._L_i is None:
            out = []
            for i in range(self.num_clients):
                rows = self._rows(i)
                out.append(self.curvature * _lambda_max(self._a[rows], self._weights(i, rows)) + self.reg)
            self._L_i = out
        return list(self._L_i)

    @property
    def L_max(self) -> float:
        return max(self.L_i)

    @property
    def L_tilde(self) -> float:
        """sqrt((1/n) sum_i L_i^2), the constant in EF21/EF-BV stepsizes."""
        return math.sqrt(sum(v * v for v in self.L_i) / self.num_clients)

    @property
    def kappa(self) -> float:
        return self.L / self.mu

    # ------------------------------------------------------------------ optimum

    def optimum(self, *, tol: float = 1e-12, max_iter: int = 200) -> Optimum:
        """x* and f*, by Newton's method with backtracking from x = 0, to ||grad f|| < tol (cached).

        If rounding stops progress above tol, the most precise point reached is returned (its
        `grad_norm` tells how far it got; with float64 that is ~1e-15 times the data scale).
        """
        if self._optimum is None:
            self._optimum = self._newton(tol, max_iter)
        return self._optimum

    def set_optimum(self, optimum: Optimum) -> None:
        """Reuse an optimum computed before (for example one stored with a run)."""
        if optimum.x.numel() != self.dim:
            raise TaskError(f"stored optimum has {optimum.x.numel()} entries, the objective expects {self.dim}")
        self._optimum = optimum

    def _newton(self, tol: float, max_iter: int) -> Optimum:
        x = torch.zeros(self.dim, dtype=torch.float64)
        fx, g = self.value_and_grad(x)
        best = (float(g.norm()), x, fx)
        stalled = steps = 0
        while steps < max_iter:
            gnorm = float(g.norm())
            if gnorm < tol:
                break
            steps += 1
            if self.dim <= DENSE_HESSIAN_MAX_DIM:
                step = _newton_direction(self.hessian(x), g, self.reg)
            else:
                step = _conjugate_gradient(lambda v, x=x: self.hvp(x, v), g, rtol=min(0.5, math.sqrt(gnorm)) * 1e-3)
            decrement = float(g @ step)
            t = 1.0
            if decrement > 1e-10:
                # Armijo backtracking while f differences are meaningful; near x* full steps converge quadratically.
                while t > 1e-10 and self.f(x - t * step) > fx - 1e-4 * t * decrement:
                    t *= 0.5
            x = x - t * step
            fx, g = self.value_and_grad(x)
            gn = float(g.norm())
            if gn < best[0]:
                best = (gn, x, fx)
                stalled = 0
            else:
                stalled += 1
                if stalled >= 3:
                    break
        gn, x, fx = best
        return Optimum(x.clone(), fx, gn, steps)

    def metrics(self, x: ArrayLike) -> dict[str, float]:
        """subopt = f(x) - f*, grad_norm_sq = ||grad f(x)||^2, dist_sq = ||x - x*||^2."""
        opt = self.optimum()
        fx, g = self.value_and_grad(x)
        v = self._flat(self._theta(x))
        return {
            "subopt": fx - opt.f,
            "grad_norm_sq": float(g @ g),
            "dist_sq": float((v - opt.x).pow(2).sum()),
        }


def _newton_direction(h: torch.Tensor, g: torch.Tensor, reg: float) -> torch.Tensor:
    """H^-1 g by Cholesky; where rounding has made the computed H indefinite (badly scaled features: the
    exact H is >= reg I), by its eigendecomposition with every eigenvalue raised to at least reg."""
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        return torch.cholesky_solve(g[:, None], chol)[:, 0]
    evals, evecs = torch.linalg.eigh(h)
    return evecs @ ((evecs.T @ g) / evals.clamp(min=reg))


def _gram(a: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
    """A^T diag(w) A (A^T A without w); the explicit contiguous transpose is several times faster on CPU."""
    at = (a if w is None else a * w[:, None]).T.contiguous()
    return at @ a


def _lambda_max(a: torch.Tensor, w: torch.Tensor) -> float:
    """Largest eigenvalue of A^T diag(w) A (w >= 0), through the smaller of the two Gram matrices."""
    b = a * w.sqrt()[:, None]
    m, p = b.shape
    gram = _gram(b.T) if m < p else _gram(b)
    if len(gram) <= DENSE_EIG_MAX:
        return float(torch.linalg.eigvalsh(gram)[-1])
    from scipy.sparse.linalg import eigsh

    top = eigsh(gram.numpy(), k=1, which="LA", tol=1e-12, return_eigenvectors=False)[0]
    return float(top) * (1 + 1e-9)  # Lanczos converges from below; leave a hair of slack


def _conjugate_gradient(matvec, b: torch.Tensor, rtol: float, max_iter: int | None = None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = float(r @ r)
    stop = (rtol * float(b.norm())) ** 2
    for _ in range(max_iter or 2 * len(b) + 20):
        if rs <= stop:
            break
        ap = matvec(p)
        curvature = float(p @ ap)
        if not curvature > 0:  # rounding only (the exact Hessian is >= reg I): keep what was reached
            break
        alpha = rs / curvature
        x += alpha * p
        r -= alpha * ap
        rs_new = float(r @ r)
        p = r + (rs_new / rs) * p
        rs = rs_new
    return x
