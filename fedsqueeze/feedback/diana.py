"""DIANA (Mishchenko, Gorbunov, Takac, Richtarik, "Distributed Learning with Compressed Gradient
Differences", 2019; Horvath et al., "Stochastic Distributed Learning with Gradient Quantization and
Double-Variance Reduction", 2019).

Client i keeps the shift h_i; each round it is sampled, with v_i = grad f_i(x) or its model delta,

    d_i = C(v_i - h_i);   send d_i;   h_i <- h_i + a d_i.

Server: keeps h = sum_i p_i h_i over all clients;

    g = h + sum_{i in S} p_i d_i / P_S;   h <- h + a sum_{i in S} p_i d_i

(x <- x - gamma g). With full participation P_S = 1: g = h + mean_i d_i, h <- h + a mean_i d_i. With
partial participation h stays the weighted mean of every client's h_i (the increments of the cohort
are added with weight p_i, not rescaled), and the fresh part is the cohort's mean, which keeps g
unbiased over the choice of cohort for an unbiased C.

Defaults: a = 1 / (omega + 1) from the compressor's declared omega (C should be unbiased: U(omega));
the stepsize 1 / ((1 + 6 omega / n) L) is `fedsqueeze.feedback.theory.diana_stepsize`.
Initialisation (`init`): `zero` (default, as in the paper): h_i^0 = 0; `full`: a client's first
message is its vector uncompressed and sets h_i to it (the server tracks first messages with a bit
per client, as EF-BV does).

DIANA is EF-BV with lam = a and nu = 1; tests check the two implementations agree.

Memory: one vector of d values per client (h_i); one on the server (h), plus one bit per client
with init=full.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from .base import (
    INIT_PARAM_HELP,
    STATE_PREFIX,
    FeedbackError,
    Mechanism,
    Outgoing,
    Param,
    ServerHalf,
    check_vector,
    choice,
    state_vector,
    unit_interval,
)
from .registry import register
from .theory import codec_constants, diana_a

SHIFT = STATE_PREFIX + "h"


@register("diana")
class DIANA(Mechanism):
    params = (
        Param("a", unit_interval, None, "shift step a (default 1 / (omega + 1) from the compressor)"),
        Param("init", choice("zero", "full"), "zero", INIT_PARAM_HELP),
    )
    client_keys = (SHIFT,)

    def __init__(self, codec, dense=None, *, a: float, init: str = "zero") -> None:
        super().__init__(codec, dense)
        self.a = unit_interval("diana: a", a)
        self.init = choice("zero", "full")("diana: init", init)

    @classmethod
    def resolve(cls, codec, kwargs, ctx):
        if kwargs["a"] is None:
            if ctx.dim is None and getattr(codec, "groups", None) is None:
                raise FeedbackError("diana: the default a = 1 / (omega + 1) needs dim; or give a")
            kwargs["a"] = diana_a(codec_constants(codec, ctx.dim)[1])
        return kwargs

    def arguments(self):
        return {"a": self.a, "init": self.init}

    def prepare(self, v, state, generator):
        v = check_vector(v)
        h_i = state_vector(state, SHIFT, v)
        if h_i is None and self.init == "full":
            payload, sent = self._compress_dense(v)
            return Outgoing(payload, sent, {SHIFT: sent}, initial=True)
        if h_i is None:
            h_i = torch.zeros_like(v)
        payload, sent = self._compress(v - h_i, generator)
        return Outgoing(payload, sent, {SHIFT: h_i + self.a * sent})

    def server(self, num_clients: int, weights: Sequence[float] | None = None) -> ServerHalf:
        return DIANAServer(num_clients, weights, a=self.a, full_init=self.init == "full")


class DIANAServer(ServerHalf):
    """g = h + sum_S p_i d_i / P_S; h <- h + a sum_S p_i d_i (first messages with init=full: h <- h + p_i d_i)."""

    def __init__(self, num_clients: int, weights: Sequence[float] | None, *, a: float, full_init: bool) -> None:
        super().__init__(num_clients, weights)
        self.a = a
        self.full_init = full_init

    def aggregate(self, messages: Mapping[int, torch.Tensor] | Iterable[tuple[int, torch.Tensor]]) -> torch.Tensor:
        items = self._messages(messages)
        like = items[0][2]
        h = self._running("h", like)
        seen = self._seen() if self.full_init else None
        share = sum(p for _, p, _ in items)
        mean = torch.zeros(like.numel(), dtype=torch.float64)
        shift = torch.zeros(like.numel(), dtype=torch.float64)
        for cid, p, d in items:
            first = seen is not None and not bool(seen[cid])
            d64 = d.to(torch.float64)
            mean.add_(d64, alpha=p)
            shift.add_(d64, alpha=p if first else p * self.a)
            if seen is not None:
                seen[cid] = True
        g = h.to(torch.float64) + mean / share
        h.add_(shift.to(h.dtype))
        return g.to(like.dtype)
