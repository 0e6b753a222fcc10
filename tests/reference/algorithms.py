"""A small in-process round loop without Flower, calling the same halves the Flower apps call.

    x = model's initial flat parameters
    each round: extra_i = algorithm.configure(round, i, seed)     (server: K ~ Geometric(p), ...)
                out_i = algorithm.client_step(x, model, data_i, loss_fn, LocalConfig(..., extra_i), state_i)
                g = sum_i w_i out_i.update / sum_i w_i           (w_i: algorithm.reply_weight or shares)
                x = algorithm.server_step(x, g, round)

No compression and full participation: it is the reference the tests and the convex reproductions use
(optionally in float64, so that linear convergence can be followed to 1e-12). Also here: exact
references for the convex tasks (each client's local optimum and the FLIX optimum, by Newton's method).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fedsqueeze.algorithms import Algorithm, ClientOutput, LocalConfig, derive_seed


@dataclass
class Trace:
    """Per-round records of a run: what `measure(x, outputs)` returned, and the local steps taken."""

    rows: list[dict[str, float]] = field(default_factory=list)
    x: torch.Tensor | None = None
    states: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def column(self, key: str) -> list[float]:
        return [r[key] for r in self.rows]


def with_dtype(task: object, dtype: torch.dtype) -> list:
    """The task's clients with float inputs in `dtype` (labels unchanged)."""
    from fedsqueeze.tasks import Split

    out = []
    for c in task.clients:  # type: ignore[attr-defined]
        train = Split(c.train.x.to(dtype), c.train.y)
        test = train if c.test_is_train else Split(c.test.x.to(dtype), c.test.y)
        out.append(dataclasses.replace(c, train=train, test=test))
    return out


def run(
    algorithm: Algorithm,
    task: object,
    *,
    rounds: int,
    lr: float,
    local_steps: int = 1,
    batch_size: int = 0,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    measure: Callable[[torch.Tensor, Sequence[ClientOutput]], dict[str, float]] | None = None,
    stop: Callable[[dict[str, float]], bool] | None = None,
) -> Trace:
    """Run `rounds` rounds with every client; `measure` makes each round's row, `stop(row)` ends early."""
    algorithm.setup(task)
    model = task.new_model(seed=derive_seed(seed, "init")).to(dtype)  # type: ignore[attr-defined]
    clients = with_dtype(task, dtype)
    x = algorithm.initial(model)
    states: list[dict[str, torch.Tensor]] = [{} for _ in clients]
    shares = algorithm.shares(task)
    trace = Trace(states=states)
    steps_total = 0
    for r in range(1, rounds + 1):
        round_seed = derive_seed(seed, r, "algorithm")
        outs = []
        for i, data in enumerate(clients):
            extra = algorithm.configure(r, i, round_seed)
            cfg = LocalConfig(
                server_round=r,
                lr=lr,
                local_steps=local_steps,
                local_epochs=0.0,
                batch_size=batch_size,
                seed=derive_seed(seed, r, i, "local"),
                extra=extra,
            )
            outs.append(algorithm.client_step(x, model, data, task.loss_fn, cfg, states[i]))  # type: ignore[attr-defined]
        reported = [algorithm.reply_weight(o.metrics) for o in outs]
        weights = [share if w is None else w for w, share in zip(reported, shares, strict=True)]
        x = algorithm.server_step(x, weighted_mean([o.update for o in outs], weights), r).detach()
        steps_total += int(extra.get("K", local_steps))
        row = {"round": float(r), "local_steps": float(steps_total)}
        if measure is not None:
            row.update(measure(x, outs))
        trace.rows.append(row)
        if stop is not None and stop(row):
            break
    trace.x = x
    return trace


def weighted_mean(updates: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    total = float(sum(weights))
    out = torch.zeros_like(updates[0], dtype=torch.float64)
    for u, w in zip(updates, weights, strict=True):
        out.add_(u.to(torch.float64), alpha=w / total)
    return out.to(updates[0].dtype)


# ------------------------------------------------------------------ exact references (convex tasks)


def newton(
    grad: Callable[[torch.Tensor], torch.Tensor],
    hess: Callable[[torch.Tensor], torch.Tensor],
    x0: torch.Tensor,
    *,
    value: Callable[[torch.Tensor], float] | None = None,
    tol: float = 1e-13,
    max_iter: int = 100,
) -> torch.Tensor:
    """Damped Newton's method (backtracking on `value` when given) to ||grad|| < tol."""
    x = x0.to(torch.float64).clone()
    for _ in range(max_iter):
        g = grad(x)
        if float(g.norm()) < tol:
            break
        step = torch.linalg.solve(hess(x), g)
        t = 1.0
        if value is not None:
            fx, dec = value(x), float(g @ step)
            while t > 1e-8 and value(x - t * step) > fx - 1e-4 * t * dec and dec > 1e-14:
                t *= 0.5
        x = x - t * step
    return x


def local_optima(objective: object) -> list[torch.Tensor]:
    """x_i* = argmin f_i for every client of a LogisticObjective (Newton, float64)."""
    obj = objective
    return [
        newton(
            lambda v, i=i: obj.grad_i(i, v),  # type: ignore[attr-defined]
            lambda v, i=i: obj.hessian(v, i),  # type: ignore[attr-defined]
            torch.zeros(obj.dim, dtype=torch.float64),  # type: ignore[attr-defined]
            value=lambda v, i=i: obj.f_i(i, v),  # type: ignore[attr-defined]
        )
        for i in range(obj.num_clients)  # type: ignore[attr-defined]
    ]


class FlixObjective:
    """f~(x) = (1/n) sum_i f_i(alpha_i x + (1 - alpha_i) x_i*) of a LogisticObjective, its gradient and optimum."""

    def __init__(self, objective: object, alphas: Sequence[float], x_stars: Sequence[torch.Tensor] | None = None):
        self.obj = objective
        self.n = objective.num_clients  # type: ignore[attr-defined]
        self.alphas = [float(a) for a in alphas]
        self.x_stars = list(x_stars) if x_stars is not None else local_optima(objective)

    def _mix(self, i: int, x: torch.Tensor) -> torch.Tensor:
        a = self.alphas[i]
        return a * x.to(torch.float64) + (1 - a) * self.x_stars[i]

    def f(self, x: torch.Tensor) -> float:
        return sum(self.obj.f_i(i, self._mix(i, x)) for i in range(self.n)) / self.n  # type: ignore[attr-defined]

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        return sum(self.alphas[i] * self.obj.grad_i(i, self._mix(i, x)) for i in range(self.n)) / self.n  # type: ignore[attr-defined]

    def hessian(self, x: torch.Tensor) -> torch.Tensor:
        return sum(self.alphas[i] ** 2 * self.obj.hessian(self._mix(i, x), i) for i in range(self.n)) / self.n  # type: ignore[attr-defined]

    def optimum(self) -> tuple[torch.Tensor, float]:
        x = newton(self.grad, self.hessian, torch.zeros(self.obj.dim, dtype=torch.float64), value=self.f)  # type: ignore[attr-defined]
        return x, self.f(x)

    @property
    def L(self) -> float:  # noqa: N802
        """Smoothness of f~: (1/n) sum alpha_i^2 L_i bounds it (each f~_i is alpha_i^2 L_i-smooth)."""
        return sum(a * a * li for a, li in zip(self.alphas, self.obj.L_i, strict=True)) / self.n  # type: ignore[attr-defined]
