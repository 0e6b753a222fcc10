"""EF21 (Richtarik, Sokolov, Fatkhullin, "EF21: A New, Simpler, Theoretically Better, and Practically
Faster Error Feedback", NeurIPS 2021, Algorithm 1), with partial participation as EF21-PP
(Fatkhullin, Sokolov, Gorbunov, Li, Richtarik, "EF21 with Bells & Whistles", 2021).

Client i keeps g_i, its estimate of its own vector; each round it is sampled, with v_i = grad f_i(x)
(gradient mode) or its model delta,

    c_i = C(v_i - g_i);   send c_i;   g_i <- g_i + c_i.

Initialisation (`init`): `full` (default) makes a client's first message its vector uncompressed,
c_i = v_i (float32 values on the wire), so g_i^0 = grad f_i(x^0) as the paper assumes; `zero`
starts from g_i = 0 and compresses from the first round.

Server: keeps g = sum_i p_i g_i over *all* clients and updates it with the replies,
g <- g + sum_{i in S} p_i c_i; the estimate is g itself (x <- x - gamma g). With partial
participation the clients that did not reply keep their g_i and so still count in g with their last
value (EF21-PP); no rescaling by the cohort's share P_S. A client's first message needs no special
treatment on the server: its g_i was 0, so its increment is its whole g_i either way.

C should be contractive (top-k, unscaled rand-k, scaled unbiased compressors C/(1+omega));
the theory stepsize is `fedsqueeze.feedback.theory.ef21_stepsize`.

Memory: one vector of d values per client (g_i); one on the server (g).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import (
    INIT_PARAM_HELP,
    STATE_PREFIX,
    Mechanism,
    Message,
    Outgoing,
    Param,
    ServerHalf,
    Sum,
    check_vector,
    choice,
    state_vector,
)
from .registry import register

ESTIMATE = STATE_PREFIX + "g"


@register("ef21")
class EF21(Mechanism):
    params = (Param("init", choice("full", "zero"), "full", INIT_PARAM_HELP),)
    client_keys = (ESTIMATE,)

    def __init__(self, codec, dense=None, *, init: str = "full") -> None:
        super().__init__(codec, dense)
        self.init = init

    def arguments(self):
        return {"init": self.init}

    def prepare(self, v, state, generator, *, eager=True):
        v = check_vector(v)
        g_i = state_vector(state, ESTIMATE, v)
        if g_i is None and self.init == "full":
            payload, sent = self._compress_dense(v)
            return Outgoing(payload, sent, {ESTIMATE: sent}, initial=True, source=v)
        diff = v if g_i is None else v - g_i
        if not eager:
            return Outgoing(self.codec.compress(diff, generator), None, source=diff)
        if g_i is None:
            g_i = torch.zeros_like(v)
        payload, sent = self._compress(diff, generator)
        return Outgoing(payload, sent, {ESTIMATE: g_i + sent}, source=diff)

    replayable = True

    def replay(self, state, payload, initial):
        g_i = state.get(ESTIMATE)
        if not initial and g_i is not None:
            sparse = getattr(self.codec, "decompress_sparse", None)
            kept = None if sparse is None else sparse(payload)
            if kept is not None:  # a sparse message: g_i + C(.) at its support only, in g_i's own memory
                indices, values = kept
                return {ESTIMATE: g_i.index_add_(0, indices, values.to(g_i.dtype))}
        sent = self._sent(payload, g_i, initial)
        return {ESTIMATE: sent if initial or g_i is None else g_i + sent}

    def server(self, num_clients: int, weights: Sequence[float] | None = None) -> ServerHalf:
        return EF21Server(num_clients, weights)


class EF21Server(ServerHalf):
    """g <- g + sum_{i in S} p_i c_i; returns g."""

    def _start(self) -> None:
        self._sum = Sum()

    def _add(self, cid: int, p: float, vec: Message) -> None:
        self._sum.add(vec, p)

    def _finish(self, share: float) -> torch.Tensor:
        total = self._sum.total
        assert total is not None
        g = self._running("g", torch.empty(total.numel(), dtype=self._sum.dtype))
        g.add_(total.to(g.dtype))
        return g.clone()
