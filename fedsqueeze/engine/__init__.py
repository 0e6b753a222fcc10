"""The round engine: one federated round without Flower, and the one loop that repeats it.

To follow one round, read (in this order):
1. `loop.py`     the loop: select, broadcast, exchange through a transport, take replies, record;
2. `server.py`   the server half: the algorithm's hooks (select, configure), the broadcast, streaming
                 decode and aggregation through the mechanism's server half, the server step;
3. `client.py`   the client half: decode, settle the acknowledged memory update, train through the
                 algorithm, compress through the mechanism, encode;
4. `protocol.py` the message schema and the protocol constants both halves share;
5. `fedsqueeze/algorithms/base.py` the algorithm hooks; `fedsqueeze/feedback/base.py` the mechanisms.
`secure.py` runs a round as four exchanges when `secagg` is set (fedsqueeze.secagg is the protocol).
`plan.py` (what both halves build from a config) and `payloads.py` (the per-tensor codec plan) are
the shared set-up. The Flower apps (`fedsqueeze.server.app`, `fedsqueeze.client.app`) only translate
Messages and Context into these calls.
"""

from .client import ClientHalf, LocalResult, client_half
from .loop import Arrival, Exchange, LocalTransport, Transport, run, run_round
from .plan import RunPlan, plan_for
from .server import InvalidReply, Outbox, Reply, Server

__all__ = [
    "Arrival",
    "ClientHalf",
    "Exchange",
    "InvalidReply",
    "LocalResult",
    "LocalTransport",
    "Outbox",
    "Reply",
    "RunPlan",
    "Server",
    "Transport",
    "client_half",
    "plan_for",
    "run",
    "run_round",
]
