"""A pure driver for gradient mode, the setting of the theory: one exact local gradient per client and round.

    round t: [downlink: server broadcasts, clients update w]  clients compute at w (or x)
             cohort S (all clients, or a seeded uniform sample of round(participation n))
             client i in S: v_i = grad f_i(w); payload = mechanism.client_step(v_i, state_i, gen)
             the payload crosses the wire (fedsqueeze.wire.encode / decode), the server decompresses it
             g = server.aggregate({i: decoded_i});  x <- x - gamma g
             metrics of x: f(x) - f*, ||grad f(x)||^2, ||x - x*||^2, bits up and down

Bits are the real payload sizes, 8 * len(fedsqueeze.wire.encode(payload)); while the wire module
is not installed nothing is counted (`History.bits_counted` is False, every bits column 0).
Randomness: the compressor's generator for client i in round t is seeded from (seed, t, i); with
`shared_randomness` all clients of a round use the seed (seed, t) (the same rand-k support).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from fedsqueeze.feedback.base import FeedbackError, Mechanism
from fedsqueeze.feedback.downlink import Downlink, build_downlink
from fedsqueeze.feedback.registry import build


@dataclass(frozen=True)
class Round:
    """Metrics after a round (round 0: the initial point, nothing sent)."""

    round: int
    grad_norm_sq: float
    subopt: float
    dist_sq: float
    #: bits sent client -> server this round (sum over the cohort)
    bits_up: int
    #: bits sent server -> clients this round (sum over the receivers)
    bits_down: int
    bits_up_total: int
    bits_down_total: int
    clients: int


@dataclass
class History:
    mechanism: str
    compressor: str
    gamma: float
    participation: float
    downlink: str | None
    bits_counted: bool
    rows: list[Round] = field(default_factory=list)
    #: True when the iterates left the finite range (the run stopped there)
    diverged: bool = False
    #: the server half's running quantities after the last round
    server_state: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the final model x
    x: torch.Tensor | None = None

    def column(self, name: str) -> list[Any]:
        return [getattr(r, name) for r in self.rows]

    @property
    def final(self) -> Round:
        return self.rows[-1]

    def best_within(self, bits_up: float, column: str = "grad_norm_sq") -> float:
        """The lowest value of `column` among the rounds whose cumulative uplink bits are <= bits_up."""
        values = [getattr(r, column) for r in self.rows if r.bits_up_total <= bits_up]
        return min(values) if values else math.inf

    def to_rows(self) -> list[dict[str, Any]]:
        return [asdict(r) for r in self.rows]


def _seed(*parts: object) -> int:
    text = "\x1f".join(repr(p) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big") >> 1


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(_seed(*parts))


class _Wire:
    """encode/decode through fedsqueeze.wire when it exists; otherwise payloads pass as they are, uncounted."""

    def __init__(self, enabled: bool = True) -> None:
        self.encode = self.decode = None
        if not enabled:
            return
        try:
            from fedsqueeze.wire import decode, encode
        except ImportError:
            pass
        else:
            self.encode, self.decode = encode, decode

    @property
    def available(self) -> bool:
        return self.encode is not None

    def transfer(self, payload: Any, numel: int) -> tuple[Any, int]:
        """(the payload as the receiver decodes it, bits sent)."""
        if self.encode is None:
            return payload, 0
        if isinstance(payload, (list, tuple)):
            raise FeedbackError("the gradient-mode driver sends single-payload codecs only")
        data = self.encode(payload)
        return self.decode(data, numel), 8 * len(data)


def run_gradient_mode(
    objective: Any,
    mechanism: str | Mechanism,
    compressor_spec: str,
    rounds: int,
    gamma: float,
    seed: int = 0,
    participation: float = 1.0,
    downlink: str | None = None,
    *,
    downlink_feedback: str = "ef21p",
    shared_randomness: bool = False,
    wire: bool = True,
    x0: torch.Tensor | None = None,
    states: list[dict[str, torch.Tensor]] | None = None,
) -> History:
    """Run `rounds` rounds of compressed gradient descent with feedback on an exact objective.

    objective: a `fedsqueeze.tasks.LogisticObjective` (or anything with num_clients, dim, grad_i,
        metrics); mechanism: a feedback spec ("ef21", "efbv(lam=0.1)", ...) or a built Mechanism;
    compressor_spec: the uplink compressor; downlink: a compressor spec for the server -> client
        broadcast with `downlink_feedback` ("ef21p" or "plain"), None for exact float64 broadcasts;
    participation: fraction of clients sampled per round (uniformly, seeded); x0: start (zeros);
    states: the clients' state dicts (created if None; pass your own to inspect them afterwards);
    wire: False skips the wire round trip (faster; nothing is counted).
    """
    from fedsqueeze.compressors import build as build_compressor

    n = objective.num_clients
    d = objective.dim
    if not 0.0 < participation <= 1.0:
        raise FeedbackError(f"participation must be in (0, 1], got {participation}")
    if not (gamma > 0 and math.isfinite(gamma)):
        raise FeedbackError(f"gamma must be a positive number, got {gamma}")
    codec = build_compressor(compressor_spec)
    if isinstance(mechanism, str):
        mechanism = build(mechanism, codec, dim=d, num_clients=n, shared_randomness=shared_randomness)
    server = mechanism.server(n)
    cohort_size = max(1, round(participation * n))
    if states is None:
        states = [{} for _ in range(n)]
    if len(states) != n:
        raise FeedbackError(f"expected {n} client states, got {len(states)}")
    x = torch.zeros(d, dtype=torch.float64) if x0 is None else x0.detach().to(torch.float64).clone()
    down: Downlink | None = None
    if downlink is not None:
        down = build_downlink(downlink_feedback, downlink)
        down_server = down.server(x)
        down_states: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    x_initial = x.clone()
    link = _Wire(enabled=wire)
    history = History(
        mechanism.spec, codec.spec, gamma, participation,
        None if down is None else f"{down.name}({down.codec.spec})", link.available,
    )  # fmt: skip
    history.rows.append(_row(objective, x, 0, 0, 0, 0, 0, 0))
    up_total = down_total = 0
    for t in range(1, rounds + 1):
        bits_down = 0
        points = [x] * n
        if down is not None:
            message = down_server.broadcast(x, _generator(seed, t, "down"))
            payload, bits = link.transfer(message.payload, d)
            received = type(message)(payload, message.step)
            points = [down.receive(received, down_states[i], x_initial) for i in range(n)]
            bits_down = bits * n
        if cohort_size == n:
            cohort = list(range(n))
        else:
            cohort = sorted(torch.randperm(n, generator=_generator(seed, t, "sample"))[:cohort_size].tolist())
        replies = {}
        bits_up = 0
        for i in cohort:
            v = objective.grad_i(i, points[i])
            gen = _generator(seed, t, "up") if shared_randomness else _generator(seed, t, i, "up")
            payload = mechanism.client_step(v, states[i], gen)
            decoded, bits = link.transfer(payload, d)
            bits_up += bits
            replies[i] = mechanism.codec.decompress(decoded).reshape(-1).to(torch.float64)
        g = server.aggregate(replies)
        x = x - gamma * g
        up_total += bits_up
        down_total += bits_down
        row = _row(objective, x, t, bits_up, bits_down, up_total, down_total, len(cohort))
        history.rows.append(row)
        if not all(math.isfinite(v) for v in (row.grad_norm_sq, row.subopt, row.dist_sq)):
            history.diverged = True
            break
    history.server_state = server.state_dict()
    history.x = x
    return history


def _row(objective: Any, x: torch.Tensor, t: int, up: int, down: int, up_total: int, down_total: int, k: int) -> Round:
    if not bool(torch.isfinite(x).all()):
        return Round(t, math.inf, math.inf, math.inf, up, down, up_total, down_total, k)
    m = objective.metrics(x)
    return Round(t, m["grad_norm_sq"], m["subopt"], m["dist_sq"], up, down, up_total, down_total, k)


__all__: Sequence[str] = ("History", "Round", "run_gradient_mode")
