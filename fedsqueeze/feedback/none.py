"""No feedback: plain compression, v_hat_i = C(v_i), g = the cohort's weighted mean of the v_hat_i.

Memory: none on the client, none on the server.

Partial participation: g = sum_{i in S} p_i C(v_i) / P_S, the mean over the clients that replied
(renormalised by their share P_S, as FedAvg does).

Biased compressors (top-k) make this stall away from the optimum, and unbiased ones (rand-k) leave
a noise floor proportional to the variance of C at the optimum, sum_i p_i^2 omega ||grad f_i(x*)||^2:
the motivation for the other mechanisms of this package.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Mechanism, Message, Outgoing, ServerHalf, Sum, check_vector
from .registry import register


@register("none")
class NoFeedback(Mechanism):
    cohort_mean = True
    def prepare(self, v, state, generator, *, eager=True):
        v = check_vector(v)
        return Outgoing(self.codec.compress(v, generator), None, source=v)

    def server(self, num_clients: int, weights: Sequence[float] | None = None) -> ServerHalf:
        return CohortMean(num_clients, weights)


class CohortMean(ServerHalf):
    """g = sum_{i in S} p_i v_i / P_S; keeps nothing between rounds."""

    reweighable = True
    sum_only = True

    def _start(self) -> None:
        self._sum = Sum()

    def _add(self, cid: int, p: float, vec: Message) -> None:
        self._sum.add(vec, p)

    def _finish(self, share: float) -> torch.Tensor:
        assert self._sum.total is not None
        return self._sum.total.div_(share)
