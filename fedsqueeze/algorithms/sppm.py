"""SPPM-AS (Cohort-Squeeze): a stochastic proximal point step per cohort, solved in K communication rounds.

Yi, Kharisov, Sokolov, Richtárik, "Cohort Squeeze: Beyond a Single Communication Round per Cohort in
Cross-Device Federated Learning" (arXiv 2406.01115), Algorithm 1 (SPPM with arbitrary sampling):

    x_{t+1} ~ prox_{gamma f_S}(x_t) = argmin_y  phi_t(y) = f_S(y) + ||y - x_t||^2 / (2 gamma),
    S ~ the run's sampling,  f_S = sum_{i in S} w_i f_i,  w_i = 1 / (n p_i)

The cohort S is drawn once per cohort t and kept for `inner` = K rounds that solve phi_t from y = x_t;
then the server keeps the result as x_{t+1} and draws the next cohort. Rounds r = (t - 1) K + k.
Solvers (one round = one exchange with the cohort):
- `gd`: clients send grad f_i(y) (like gradient mode; full batch with batch-size 0); the server forms
  grad f_S(y) and steps y <- y - eta grad phi_t(y), eta = 1 / (L_S + 1/gamma), L_S = sum_S w_i L_i.
- `cg`: the same messages; the server runs nonlinear conjugate gradient (Polak-Ribiere+) on phi_t.
  Each round is one gradient evaluation: the first at x_t, then one at a probe point y + s d along the
  direction d, from which a secant step gives the exact line minimum of a quadratic, and the gradient
  at the new iterate is interpolated between the two evaluations (exact for quadratics, so on a
  quadratic this is linear CG; on logistic losses the probe s is the predicted step, so the
  interpolation error shrinks with the step). The last round needs no gradient at its result, so it
  goes to the secant's line minimum however far it lies (were it capped at the probe, the last round's
  gradient would be wasted: the theory stepsize from L_S underestimates the line minimum on logistic
  losses, and K = 2 would return the gd step of K = 1). K = 1 is one gd step; the rows of the
  intermediate rounds evaluate the probe point.
- `localgd`: each client runs local-steps gradient steps on f_i(y) + ||y - x_t||^2 / (2 gamma W_S)
  (W_S = sum_S w_i, so the w_i-weighted sum of the local problems is phi_t) from the broadcast y and
  sends its delta; the server averages with the weights w_i (FedProx-like; the client keeps x_t in
  its state from the cohort's first round). Local stepsize 1 / (L_i + 1/(gamma W_S)) by default.

The estimate the engine forms is sum w_i v_i / sum w_i over the replies (weights s_i / p_i when the p_i
differ, the plain mean under nice); gd and cg multiply it by W_S over the drawn cohort, which is f_S's
gradient when every client replies and re-weighs the survivors to stand for the cohort when some do
not. Shares are uniform: f = (1/n) sum_i f_i, the objective of the convex tasks and of the theory.
Every inner round is a round of the engine: compressed, acknowledged, counted in bytes, and one row.
Only feedback whose estimate is the round's own messages (none, ef) solves f_S; config refuses others.
`step` may be given (a number) for tasks without an exact objective, which the default needs for L_i.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ._local import Batches, flat_grad, one_gradient, steps_of, train_split
from .base import Algorithm, ClientOutput, Cohort, LocalConfig, LossFn, register

SOLVERS = ("gd", "localgd", "cg")
ANCHOR, ANCHOR_COHORT = "sppm.anchor", "sppm.cohort"


@dataclass
class ConjugateGradient:
    """Server state of the cg solve of one cohort: iterate y, grad phi_t estimate g at y, direction d, and
    the probe step s (the point last sent is y + s d)."""

    y: torch.Tensor
    g: torch.Tensor
    d: torch.Tensor
    s: float


@register("sppm")
class SPPM(Algorithm):
    """SPPM-AS: prox_{gamma f_S}(x_t) solved by the cohort S in `inner` rounds with `solver`."""

    uniform_shares = True
    cohort_objective = True

    def __init__(self, gamma: float = 1.0, inner: int = 1, solver: str = "gd", step: float | str = "theory") -> None:
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not 0 < gamma < math.inf:
            raise ValueError(f"sppm: gamma must be a number > 0, got {gamma!r}")
        if isinstance(inner, bool) or not isinstance(inner, int) or inner < 1:
            raise ValueError(f"sppm: inner (K, rounds per cohort) must be an integer >= 1, got {inner!r}")
        if solver not in SOLVERS:
            raise ValueError(f"sppm: solver must be one of {', '.join(SOLVERS)}, got {solver!r}")
        if step != "theory" and (isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0):
            raise ValueError(f"sppm: step must be a number > 0 or 'theory', got {step!r}")
        self.gamma, self.inner, self.solver, self.step = float(gamma), inner, solver, step
        self.L_i: list[float] | None = None
        self._cohort: Cohort | None = None
        self._cohort_t = 0
        self._w: dict[int, float] = {}
        self._anchor: torch.Tensor | None = None
        self._solve_t = 0
        self._cg: ConjugateGradient | None = None

    def setup(self, task: object) -> None:
        """L_i of a convex task's exact objective (for step = "theory")."""
        objective = getattr(task, "objective", None)
        if objective is not None:
            self.L_i = [float(v) for v in objective.L_i]

    # ---- cohorts ---------------------------------------------------------------------------

    def position(self, server_round: int) -> tuple[int, int]:
        return (server_round - 1) // self.inner + 1, (server_round - 1) % self.inner + 1

    def select(self, server_round: int, population: Sequence[int], size: int, gen: torch.Generator) -> Cohort:
        """A new cohort at each cohort's first round (rounds must come in order), the same one until its last."""
        t, _ = self.position(server_round)
        if self._cohort is None or self._cohort_t != t:
            cohort = super().select(server_round, population, size, gen)
            n = len(population)
            self._cohort, self._cohort_t = cohort, t
            self._w = {i: 1.0 / (n * cohort.probabilities[i]) for i in cohort.ids}
        return self._cohort

    @property
    def cohort_weight(self) -> float:
        """W_S = sum_{i in S} w_i (1 under nice and stratified sampling)."""
        return sum(self._w.values())

    def _smoothness(self) -> float:
        if self.L_i is None:
            raise ValueError("sppm: step = 'theory' needs the task's L_i (a convex task); give step=...")
        return sum(w * self.L_i[i] for i, w in self._w.items())

    def configure(self, server_round: int, client: int, seed: int) -> dict[str, bool | int | float | str]:
        t, k = self.position(server_round)
        out: dict[str, bool | int | float | str] = {"cohort": t, "inner": k}
        if self.solver == "localgd":
            prox = 1.0 / (self.gamma * self.cohort_weight)
            out["prox"] = prox
            if self.step != "theory":
                out["step"] = float(self.step)
            elif self.L_i is not None:
                out["step"] = 1.0 / (self.L_i[client] + prox)
        return out

    def state_dict(self) -> dict[str, object]:
        """The cohort being solved for and the solver's server state (a resumed run goes on inside it)."""
        return {
            "cohort": None if self._cohort is None else {"ids": list(self._cohort.ids),
                                                         "probabilities": dict(self._cohort.probabilities)},
            "cohort_t": self._cohort_t,
            "weights": dict(self._w),
            "anchor": self._anchor,
            "solve_t": self._solve_t,
            "cg": None if self._cg is None else asdict(self._cg),
        }  # fmt: skip

    def load_state_dict(self, state: Mapping[str, object]) -> None:
        cohort = state["cohort"]
        self._cohort = None if cohort is None else Cohort(tuple(cohort["ids"]), dict(cohort["probabilities"]))
        self._cohort_t = int(state["cohort_t"])
        self._w = dict(state["weights"])
        self._anchor = state["anchor"]
        self._solve_t = int(state["solve_t"])
        self._cg = None if state["cg"] is None else ConjugateGradient(**state["cg"])

    # ---- client half -----------------------------------------------------------------------

    def client_step(
        self,
        x: torch.Tensor,
        model: nn.Module,
        data: object,
        loss_fn: LossFn,
        cfg: LocalConfig,
        state: dict[str, torch.Tensor],
    ) -> ClientOutput:
        if self.solver != "localgd":  # gd, cg: grad f_i at the broadcast point
            return one_gradient(x, model, data, loss_fn, cfg)
        inputs, labels = train_split(data)
        batches = Batches(inputs, labels, cfg.batch_size, cfg.seed)
        cohort, inner = int(cfg.extra["cohort"]), int(cfg.extra["inner"])
        if inner == 1:
            state[ANCHOR], state[ANCHOR_COHORT] = x.detach().clone(), torch.tensor(cohort)
        elif ANCHOR not in state or int(state[ANCHOR_COHORT]) != cohort:
            raise ValueError(f"sppm: no anchor x_t of cohort {cohort} in this client's state (it missed round 1)")
        anchor = state[ANCHOR].to(x.dtype)
        prox = float(cfg.extra["prox"])
        step = float(cfg.extra.get("step", cfg.lr))
        y = x.detach().clone()
        steps, total = steps_of(cfg, len(labels)), 0.0
        for _ in range(steps):
            loss, g = flat_grad(model, y, loss_fn, *batches.next())
            y = y - step * (g + prox * (y - anchor))
            total += loss
        return ClientOutput(update=y - x, num_examples=len(labels), train_loss=total / steps if steps else math.nan)

    # ---- server half -----------------------------------------------------------------------

    def server_step(self, x: torch.Tensor, estimate: torch.Tensor, server_round: int) -> torch.Tensor:
        t, k = self.position(server_round)
        if self._solve_t != t:  # the cohort's first step: x is x_t
            self._solve_t, self._anchor, self._cg = t, x.detach().to(torch.float64).clone(), None
        est = estimate.to(torch.float64)
        if self.solver == "localgd":
            return (x.to(torch.float64) + est).to(x.dtype)
        y = x.to(torch.float64)
        grad = self.cohort_weight * est + (y - self._anchor) / self.gamma  # grad phi_t at the broadcast point
        eta = float(self.step) if self.step != "theory" else 1.0 / (self._smoothness() + 1.0 / self.gamma)
        if self.solver == "gd":
            return (y - eta * grad).to(x.dtype)
        return self._cg_step(y, grad, eta, last=k == self.inner).to(x.dtype)

    def _cg_step(self, z: torch.Tensor, g_z: torch.Tensor, eta: float, *, last: bool) -> torch.Tensor:
        """One gradient evaluation of the cg solve (at x_t first, then at the probe z); the next point to send."""
        cg = self._cg
        if cg is None:  # gradient at x_t: the first direction is steepest descent, probed with the gd step
            self._cg = ConjugateGradient(y=z, g=g_z, d=-g_z, s=eta)
            return z - eta * g_z
        dd = float(cg.d @ cg.d)
        slope = float(cg.g @ cg.d)
        if dd == 0.0:
            return cg.y
        c = float((g_z - cg.g) @ cg.d) / (cg.s * dd)
        if not (math.isfinite(c) and c > 0):  # phi is (1/gamma)-strongly convex; noise may say otherwise
            c = 1.0 / eta
        alpha = -slope / (c * dd)
        if last:  # no gradient is needed at the result, so nothing bounds the step: the secant's line minimum
            return cg.y + alpha * cg.d
        if alpha <= 2 * cg.s:  # the line minimum, its gradient interpolated (error factor |1 - alpha/s| <= 1)
            y = cg.y + alpha * cg.d
            g = cg.g + (alpha / cg.s) * (g_z - cg.g)
        else:  # the probe fell far short: it is the new iterate, with its exact gradient
            y, g = z, g_z
        beta = max(0.0, float(g @ (g - cg.g)) / max(float(cg.g @ cg.g), 1e-300))
        d = -g + beta * cg.d
        if float(g @ d) >= 0:  # not a descent direction: restart
            d = -g
        # probe at twice the predicted step: the line minimum then lies about halfway, so the interpolated
        # gradient's error shrinks instead of being extrapolated
        s = -2 * float(g @ d) / (c * float(d @ d)) if float(d @ d) > 0 else eta
        self._cg = ConjugateGradient(y=y, g=g, d=d, s=s)
        return y + s * d
