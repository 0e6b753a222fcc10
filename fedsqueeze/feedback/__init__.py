"""Error feedback and variance reduction for compressed communication (no Flower imports).

    mechanism = feedback.build("efbv", compressor, dim=d, num_clients=n)   # or "none", "ef", "ef21", "diana"
    # client i, each round it is sampled (state: the node's persistent dict of tensors)
    payload = mechanism.client_step(v_i, state, generator)
    # server, one half per run
    server = mechanism.server(n)
    g = server.aggregate({i: codec.decompress(payload_i) for the clients that replied})

Mechanisms (one module each, client and server half side by side; equations in
shared/reference/algorithms.md section 2):

| spec | client memory | server memory | module |
|---|---|---|---|
| none | - | - | none.py |
| ef | residual e_i (d values) | - | ef.py |
| ef21(init=full) | g_i (d values) | g (d values) | ef21.py |
| efbv(lam, nu, init=full) | h_i (d values) | h (d values) + 1 bit per client | efbv.py |
| diana(a, init=zero) | h_i (d values) | h (d values) (+ 1 bit per client, init=full) | diana.py |
| downlink ef21p | w (d values) + step counter | w (d values) (+ the step each client holds, in the app) | downlink.py |

The mechanisms act on whatever flat vector v_i the algorithm communicates: in gradient mode (one
local gradient per round, the setting of the theory) v_i = grad f_i and the server steps
x <- x - gamma g; in model-delta mode v_i is the client's model delta after local training and the
server steps x <- x + g.

`theory` computes lambda*, nu*, r, r_av, s*, the EF-BV, EF21 and DIANA stepsizes from a compressor's
declared (eta, omega). The Flower apps
use these halves through `fedsqueeze.engine` (config keys `feedback`, `downlink-feedback`, `mode`,
`lr = "theory"`): the client half in the ClientApp, the server half in the engine's server half.
"""

from . import diana, ef, ef21, efbv, none  # noqa: F401  (register the built-in mechanisms)
from .base import Codec, FeedbackError, Mechanism, Outgoing, ServerHalf, SparseVector
from .downlink import Broadcast, Downlink, DownlinkServer, build_downlink
from .registry import Context, available, build, mechanism, parse_spec, register

__all__ = [
    "Broadcast",
    "Codec",
    "Context",
    "Downlink",
    "DownlinkServer",
    "FeedbackError",
    "Mechanism",
    "Outgoing",
    "ServerHalf",
    "SparseVector",
    "available",
    "build",
    "build_downlink",
    "mechanism",
    "parse_spec",
    "register",
]
