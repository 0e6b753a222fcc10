"""Classic error feedback (Seide et al. 2014; Stich, Cordonnier, Jaggi 2018; Karimireddy et al. 2019).

Client i keeps the residual e_i (zero at the start) and, each round it is sampled,

    p_i = e_i + v_i;   send v_hat_i = C(p_i);   e_i <- p_i - v_hat_i.

The residual is the client's own compression error p_i - C(p_i), computed before any averaging
(applying feedback to the error of the *average*, as some PowerSGD set-ups do, is a known mistake).
algorithms.md section 2 writes p_i = e_i + gamma grad f_i(x); here v_i is whatever the algorithm
sends (a gradient in gradient mode, a model delta with local training), so the residual lives in the
units of v_i. With a constant stepsize the two are the same algorithm (e scaled by 1/gamma).

Server: g = sum_{i in S} p_i v_hat_i / P_S (the cohort mean, as for `none`); x <- x - gamma g.
A client that is not sampled keeps e_i untouched and adds it to its next message.

Memory: one vector of d values per client (e_i, the dtype of v_i); none on the server.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import STATE_PREFIX, Mechanism, Outgoing, ServerHalf, check_vector, state_vector
from .none import CohortMean
from .registry import register

RESIDUAL = STATE_PREFIX + "e"


@register("ef")
class ErrorFeedback(Mechanism):
    cohort_mean = True
    client_keys = (RESIDUAL,)

    def prepare(self, v, state, generator, *, eager=True):
        v = check_vector(v)
        e = state_vector(state, RESIDUAL, v)
        p = v if e is None else e + v
        payload, sent = self._compress(p, generator)
        return Outgoing(payload, sent, {RESIDUAL: p - sent}, source=p)

    def server(self, num_clients: int, weights: Sequence[float] | None = None) -> ServerHalf:
        return CohortMean(num_clients, weights)
