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

DIANA is EF-BV with lam = a and nu = 1, so both halves are EF-BV's, with DIANA's parameters and
defaults.

Memory: one vector of d values per client (h_i); one on the server (h), plus one bit per client
with init=full.
"""

from __future__ import annotations

from .base import INIT_PARAM_HELP, FeedbackError, Mechanism, Param, choice, unit_interval
from .efbv import EFBV
from .registry import register
from .theory import codec_constants, diana_a


@register("diana")
class DIANA(EFBV):
    params = (
        Param("a", unit_interval, None, "shift step a (default 1 / (omega + 1) from the compressor)"),
        Param("init", choice("zero", "full"), "zero", INIT_PARAM_HELP),
    )

    def __init__(self, codec, dense=None, *, a: float, init: str = "zero") -> None:
        Mechanism.__init__(self, codec, dense)
        self.a = self.lam = unit_interval("diana: a", a)
        self.nu = 1.0
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
