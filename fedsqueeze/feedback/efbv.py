"""EF-BV (Condat, Yi, Richtarik, "EF-BV: A Unified Theory of Error Feedback and Variance Reduction
Mechanisms for Biased and Unbiased Compression in Distributed Optimization", NeurIPS 2022, Algorithm 1).

Client i keeps h_i; each round it is sampled, with v_i = grad f_i(x^{t+1}) or its model delta,

    d_i = C_i(v_i - h_i);   send d_i;   h_i <- h_i + lam d_i.

Server: keeps h = sum_i p_i h_i over all clients and forms the estimate from the replies,

    d = sum_{i in S} p_i d_i / P_S;   g = h + nu d;   h <- h + lam sum_{i in S} p_i d_i

(x <- x - gamma g). With full participation P_S = 1 and this is the paper's g^{t+1} = h^t + nu d^{t+1},
h^{t+1} = h^t + lam d^{t+1}. With partial participation h keeps being exactly the weighted mean of
every client's h_i (the increment is not rescaled), while the fresh part d is the cohort's mean, so
that for an unbiased C the estimate stays unbiased over the choice of cohort (as in DIANA with
partial participation). EF21 is lam = nu = 1 with a contractive C, DIANA is nu = 1 with an unbiased
C, under full participation; under partial participation `ef21` follows EF21-PP instead (no
rescaling of d), so the two differ there.

Defaults: lam and nu left out of the spec are the theory values lambda*, nu* of
`fedsqueeze.feedback.theory` from the compressor's (eta, omega), with omega_av = omega / n for
independent randomness and omega for shared randomness.

Initialisation (`init`): `full` (default) makes a client's first message its vector uncompressed
(h_i <- v_i); the server recognises first messages with a bit per client and adds them with weight 1
in place of lam and nu. `zero`: h_i starts at 0.

Memory: one vector of d values per client (h_i); on the server one vector (h) and one bit per
client (which clients have sent their first message).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import (
    INIT_PARAM_HELP,
    STATE_PREFIX,
    FeedbackError,
    Mechanism,
    Message,
    Outgoing,
    Param,
    ServerHalf,
    Sum,
    check_vector,
    choice,
    state_vector,
    unit_interval,
)
from .registry import register
from .theory import codec_constants, efbv_lambda, efbv_nu, omega_average

SHIFT = STATE_PREFIX + "h"


@register("efbv")
class EFBV(Mechanism):
    params = (
        Param("lam", unit_interval, None, "client step lambda (default lambda* from the compressor)"),
        Param("nu", unit_interval, None, "server step nu (default nu* from the compressor)"),
        Param("init", choice("full", "zero"), "full", INIT_PARAM_HELP),
    )
    client_keys = (SHIFT,)

    def __init__(self, codec, dense=None, *, lam: float, nu: float, init: str = "full") -> None:
        super().__init__(codec, dense)
        self.lam = unit_interval("efbv: lam", lam)
        self.nu = unit_interval("efbv: nu", nu)
        self.init = choice("full", "zero")("efbv: init", init)

    @classmethod
    def resolve(cls, codec, kwargs, ctx):
        if kwargs["lam"] is None or kwargs["nu"] is None:
            if ctx.dim is None or ctx.num_clients is None:
                raise FeedbackError("efbv: the theory defaults of lam and nu need dim and num_clients; or give both")
            eta, omega = codec_constants(codec, ctx.dim)
            if kwargs["lam"] is None:
                kwargs["lam"] = efbv_lambda(eta, omega)
            if kwargs["nu"] is None:
                kwargs["nu"] = efbv_nu(eta, omega_average(omega, ctx.num_clients, ctx.shared_randomness))
        return kwargs

    def arguments(self):
        return {"lam": self.lam, "nu": self.nu, "init": self.init}

    def prepare(self, v, state, generator, *, eager=True):
        v = check_vector(v)
        h_i = state_vector(state, SHIFT, v)
        if h_i is None and self.init == "full":
            payload, sent = self._compress_dense(v)
            return Outgoing(payload, sent, {SHIFT: sent}, initial=True, source=v)
        diff = v if h_i is None else v - h_i
        if not eager:
            return Outgoing(self.codec.compress(diff, generator), None, source=diff)
        if h_i is None:
            h_i = torch.zeros_like(v)
        payload, sent = self._compress(diff, generator)
        return Outgoing(payload, sent, {SHIFT: h_i + self.lam * sent}, source=diff)

    replayable = True

    def replay(self, state, payload, initial):
        h_i = state.get(SHIFT)
        sent = self._sent(payload, h_i, initial)
        if initial:
            return {SHIFT: sent}
        return {SHIFT: (torch.zeros_like(sent) if h_i is None else h_i) + self.lam * sent}

    def server(self, num_clients: int, weights: Sequence[float] | None = None) -> ServerHalf:
        return ShiftedServer(num_clients, weights, lam=self.lam, nu=self.nu, full_init=self.init == "full")


class ShiftedServer(ServerHalf):
    """g = h + nu sum_S p_i d_i / P_S; h <- h + lam sum_S p_i d_i (first messages: weight 1 for both)."""

    def __init__(
        self, num_clients: int, weights: Sequence[float] | None, *, lam: float, nu: float, full_init: bool
    ) -> None:
        super().__init__(num_clients, weights)
        self.lam = lam
        self.nu = nu
        self.full_init = full_init

    def _start(self) -> None:
        self._fresh = Sum()  # nu-weighted part of g (times P_S)
        self._shift = Sum()  # increment of h

    def _add(self, cid: int, p: float, vec: Message) -> None:
        first = False
        if self.full_init:
            seen = self._seen()
            first = not bool(seen[cid])
            seen[cid] = True
        self._fresh.add(vec, p * (1.0 if first else self.nu))
        self._shift.add(vec, p * (1.0 if first else self.lam))

    def _finish(self, share: float) -> torch.Tensor:
        fresh, shift = self._fresh.total, self._shift.total
        assert fresh is not None and shift is not None
        h = self._running("h", torch.empty(fresh.numel(), dtype=self._fresh.dtype))
        g = h + fresh / share
        h.add_(shift.to(h.dtype))
        return g.to(self._fresh.dtype)
