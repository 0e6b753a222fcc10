"""The mechanism interface: a client half and a server half around a compression codec.

A *codec* is anything with `compress(x, generator) -> payload` and `decompress(payload) -> Tensor`:
a `fedsqueeze.compressors.Compressor` (payload: one `Compressed`) or a per-tensor plan such as
`fedsqueeze.engine.payloads.UpdatePlan` (payload: a list of `Compressed`). A mechanism never
looks inside a payload.

Client half (runs on the node; `state` is the node's persistent dict of tensors, kept between rounds
and across rounds in which the client is not sampled; every key a mechanism uses starts with
`feedback.` so that it can share the dict with an algorithm's own state):

    out = mechanism.prepare(v, state, generator)  # compress; state untouched
    send(out.payload)
    mechanism.commit(state, out)                  # the state update after sending
    # or both at once: payload = mechanism.client_step(v, state, generator)

The client updates its memory with the *decoded* payload (`out.sent`), the exact vector the server
will reconstruct, so that both sides' running quantities stay equal bit for bit. With `init=full`
(EF21, EF-BV, DIANA) a client's first message is its vector uncompressed; the client knows it is the
first because its state has no memory yet, the EF-BV and DIANA servers because of a bit per client.
A client that loses its state while the server keeps its own breaks that agreement (and the running
means): client state must persist for the whole run.

Server half (one object per run, holding the server's running quantities in `state`):

    server = mechanism.server(num_clients, weights=None)
    g = server.aggregate({client_id: decoded_vector, ...})
    # or streaming, one reply at a time (memory O(d) whatever the cohort; the engine adds replies in
    # client order, so the sums never depend on arrival order):
    server.begin(); server.add(client_id, decoded_vector); ...; g = server.finish()

`weights` are the clients' shares p_i of the objective f = sum_i p_i f_i (uniform 1/n by default;
normalised to sum to 1 over all n clients). They are fixed for the run: the running means the
stateful mechanisms keep (h = sum_i p_i h_i) are only meaningful with fixed shares.

Partial participation: when only a cohort S replies, P_S = sum_{i in S} p_i is the cohort's share.
Every module documents what its server does with P_S; the rule common to all of them is that a
running mean over all clients (EF21's g, DIANA's and EF-BV's h) is updated with p_i times each
replying client's own increment, so it stays exactly the weighted mean of every client's memory,
sampled or not.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

Payload = Any  # a Compressed, or a list of Compressed for a multi-group codec

#: prefix of every key a mechanism keeps in the client's state dict
STATE_PREFIX = "feedback."


class FeedbackError(ValueError):
    """A feedback spec, argument, message or state that cannot be used; the message says why."""


class Codec(Protocol):
    def compress(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Payload: ...

    def decompress(self, payload: Payload) -> torch.Tensor: ...


@dataclass(frozen=True, eq=False)
class Outgoing:
    """A prepared client message: the payload to send and the vector the server will decode from it."""

    payload: Payload
    #: decompress(payload), in the dtype of the client's vector; None where the mechanism needs no
    #: dense copy of it (no feedback: nothing is remembered, so the vector is never rebuilt)
    sent: torch.Tensor | None
    #: the client's memory after sending (written into the state by `commit`)
    new_state: Mapping[str, torch.Tensor] = field(default_factory=dict)
    #: True when this is the client's first message and it carries its vector uncompressed
    initial: bool = False
    #: the vector the codec compressed (v_i, v_i - h_i, e_i + v_i, ...), for the compression error
    source: torch.Tensor | None = None


# --------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Param:
    """One argument a feedback spec accepts."""

    name: str
    #: turns the spec value into the stored one, raising FeedbackError with the reason if invalid
    check: Callable[[str, Any], Any]
    #: None: resolved from the compressor's constants when the mechanism is built
    default: Any = None
    help: str = ""


def unit_interval(what: str, value: Any) -> float:
    """A number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
        raise FeedbackError(f"{what} must be a number in (0, 1], got {value!r}")
    return float(value)


def choice(*valid: str) -> Callable[[str, Any], str]:
    def check(what: str, value: Any) -> str:
        if value not in valid:
            raise FeedbackError(f"{what} must be one of {', '.join(valid)}, got {value!r}")
        return str(value)

    return check


INIT_PARAM_HELP = "full: the first message of a client is its vector uncompressed; zero: memory starts at 0"


# --------------------------------------------------------------------------- mechanism


class Mechanism(ABC):
    """Error feedback or variance reduction around a codec: client half plus a factory for the server half."""

    #: registered name, used in specs
    name: str = ""
    #: the arguments its spec accepts, in positional order
    params: tuple[Param, ...] = ()
    #: state keys this mechanism keeps on the client (documentation and checks)
    client_keys: tuple[str, ...] = ()
    #: True when the server's estimate is the weighted mean of this round's messages alone (none, ef):
    #: it then takes per-reply weights (a sampling's s_i / p_i) and estimates a cohort's own objective;
    #: False for running means over every client's memory (ef21, efbv, diana)
    cohort_mean: bool = False

    def __init__(self, codec: Codec, dense: Codec | None = None) -> None:
        self.codec = codec
        self._dense = dense

    # ---- client half ---------------------------------------------------------------------------

    @abstractmethod
    def prepare(
        self, v: torch.Tensor, state: dict[str, torch.Tensor], generator: torch.Generator | None, *, eager: bool = True
    ) -> Outgoing:
        """Compress this round's vector v_i (flat); reads `state`, does not change it.

        eager=False (replayable mechanisms): leave `sent` and `new_state` out, for a caller that keeps
        the payload and rebuilds the memory update with `replay` once the server acknowledges it."""

    def commit(self, state: dict[str, torch.Tensor], out: Outgoing) -> None:
        """Update the client's memory once `out.payload` is sent (writes `out.new_state`)."""
        state.update(out.new_state)

    #: True when the memory after sending is a function of the memory before and the payload sent
    #: (`replay`): a client can then keep an unacknowledged update as its payload, not as d values
    replayable: bool = False

    def replay(self, state: Mapping[str, torch.Tensor], payload: Payload, initial: bool) -> Mapping[str, torch.Tensor]:
        """`new_state` of the Outgoing that sent `payload` from `state` (replayable mechanisms only).

        The result is committed into `state` at once, so it may reuse the memory of the state tensors
        it replaces (EF21 adds a sparse message into g_i in place)."""
        raise FeedbackError(f"{self.name} cannot rebuild its memory update from the payload alone")

    def _sent(self, payload: Payload, like: torch.Tensor | None, initial: bool) -> torch.Tensor:
        """decompress(payload) as `prepare` computed it (flat, in the memory's dtype)."""
        dtype = torch.float32 if like is None else like.dtype
        codec = self._dense if initial and self._dense is not None else self.codec
        return codec.decompress(payload).to(dtype).reshape(-1)

    def client_step(
        self, v: torch.Tensor, state: dict[str, torch.Tensor], generator: torch.Generator | None = None
    ) -> Payload:
        """prepare + commit: the payload to send; `state` is updated in place."""
        out = self.prepare(v, state, generator)
        self.commit(state, out)
        return out.payload

    # ---- server half ---------------------------------------------------------------------------

    @abstractmethod
    def server(self, num_clients: int, weights: Sequence[float] | None = None) -> ServerHalf:
        """A fresh server half for a run with `num_clients` clients with shares `weights`."""

    # ---- helpers -------------------------------------------------------------------------------

    @classmethod
    def resolve(cls, codec: Codec, kwargs: dict[str, Any], ctx: Any) -> dict[str, Any]:
        """Fill the arguments left as None from the codec's constants (`ctx`: a registry.Context)."""
        return kwargs

    def arguments(self) -> dict[str, Any]:
        """The resolved arguments (for the spec and for logging the values a run used)."""
        return {}

    @property
    def spec(self) -> str:
        args = ", ".join(f"{k}={_format(v)}" for k, v in self.arguments().items())
        return f"{self.name}({args})" if args else self.name

    def __repr__(self) -> str:
        return f"<feedback {self.spec}>"

    def _compress(self, x: torch.Tensor, generator: torch.Generator | None) -> tuple[Payload, torch.Tensor]:
        payload = self.codec.compress(x, generator)
        return payload, self.codec.decompress(payload).to(x.dtype).reshape(-1)

    def _compress_dense(self, x: torch.Tensor) -> tuple[Payload, torch.Tensor]:
        """The vector as exactly as the wire carries it (float32 values), for a client's first message."""
        if self._dense is None:
            from fedsqueeze.compressors import build

            self._dense = build("identity")
        payload = self._dense.compress(x, None)
        return payload, self._dense.decompress(payload).to(x.dtype).reshape(-1)


class ServerHalf(ABC):
    """The server's running quantities of a mechanism and the estimate it forms from the replies."""

    def __init__(self, num_clients: int, weights: Sequence[float] | None = None) -> None:
        if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
            raise FeedbackError(f"num_clients must be a positive integer, got {num_clients!r}")
        self.num_clients = num_clients
        self.p = client_shares(num_clients, weights)
        #: the running quantities (tensors only, so that a checkpoint can store them)
        self.state: dict[str, torch.Tensor] = {}

    def aggregate(self, messages: Mapping[int, torch.Tensor] | Iterable[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """The estimate g from the decoded messages of the clients that replied this round (in client order)."""
        pairs = list(messages.items()) if isinstance(messages, Mapping) else list(messages)
        for pair in pairs:
            if not isinstance(pair, tuple) or len(pair) != 2:
                raise FeedbackError(f"expected (client id, vector) pairs, got {type(pair).__name__}")
        self.begin()
        for cid, vec in sorted(pairs, key=lambda t: t[0] if isinstance(t[0], int) else -1):
            self.add(cid, vec)
        return self.finish()

    def begin(self) -> None:
        """Start a round: no message taken in yet."""
        self._round: set[int] = set()
        self._dim: int | None = None
        self._share = 0.0
        self._start()

    def add(self, cid: int, vec: torch.Tensor | SparseVector, weight: float | None = None) -> None:
        """Take in client `cid`'s decoded message; `weight` replaces its share p_i for this round
        (only where the mechanism keeps no running mean over fixed shares)."""
        if isinstance(cid, bool) or not isinstance(cid, int) or not 0 <= cid < self.num_clients:
            raise FeedbackError(f"client id {cid!r} is outside 0..{self.num_clients - 1}")
        if cid in self._round:
            raise FeedbackError(f"client {cid} replied twice in one round")
        if not isinstance(vec, SparseVector) and (not isinstance(vec, torch.Tensor) or vec.dim() != 1):
            raise FeedbackError(f"client {cid}: expected a flat tensor, got {getattr(vec, 'shape', type(vec))}")
        if self._dim is None:
            self._dim = _numel(vec)
        elif _numel(vec) != self._dim:
            raise FeedbackError(f"client {cid}: vector of length {_numel(vec)}, others have {self._dim}")
        if weight is not None and not self.reweighable:
            raise FeedbackError(f"{type(self).__name__} keeps running means over fixed shares: no per-reply weights")
        p = float(self.p[cid]) if weight is None else float(weight)
        self._round.add(cid)
        self._share += p
        self._add(cid, p, vec)

    def add_sum(self, cids: Sequence[int], total: Message, share: float) -> None:
        """Take in sum_{i in cids} p_i v_i at once, as secure aggregation reveals it, with share =
        sum_{i in cids} p_i (server halves whose sums are linear in the messages only: `sum_only`)."""
        if not self.sum_only:
            raise FeedbackError(f"{type(self).__name__} needs each client's message, not only the cohort's sum")
        if not cids or set(cids) & self._round or len(set(cids)) != len(cids):
            raise FeedbackError(f"clients {list(cids)}: empty, repeated or already taken in this round")
        self._round.update(cids)
        self._share += share
        self._add(cids[0], 1.0, total)

    #: True when the round's sums are linear in the messages (so a sum of messages can be added as one)
    sum_only: bool = False

    def finish(self) -> torch.Tensor:
        """The estimate from the messages taken in since `begin`."""
        if not self._round:
            raise FeedbackError("no client messages to aggregate (skip the round instead)")
        return self._finish(self._share)

    #: True when `add` may give a reply a weight of its own (the cohort mean keeps nothing between rounds)
    reweighable: bool = False

    @abstractmethod
    def _start(self) -> None:
        """Reset the round's sums."""

    @abstractmethod
    def _add(self, cid: int, p: float, vec: torch.Tensor | SparseVector) -> None:
        """Add one message (dense or sparse) with its weight p to the round's sums."""

    @abstractmethod
    def _finish(self, share: float) -> torch.Tensor:
        """The estimate (and the running quantities' update) from the round's sums; share = P_S."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.state.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.state = {k: v.clone() for k, v in state.items()}

    # ---- helpers -------------------------------------------------------------------------------

    def _running(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """The running vector `key`, zero until a first message arrives."""
        value = self.state.get(key)
        if value is None:
            value = torch.zeros_like(like)
            self.state[key] = value
        elif value.shape != like.shape:
            raise FeedbackError(f"messages have length {like.numel()}, the server's {key} has {value.numel()}")
        return value

    def _seen(self) -> torch.Tensor:
        """Which clients have sent their first message (a bool per client)."""
        seen = self.state.get("seen")
        if seen is None:
            seen = torch.zeros(self.num_clients, dtype=torch.bool)
            self.state["seen"] = seen
        return seen


@dataclass(frozen=True, eq=False)
class SparseVector:
    """A flat vector of `numel` entries, zero outside `indices` (distinct): a decoded sparse message,
    which a server half adds at its support without making it dense."""

    numel: int
    indices: torch.Tensor
    values: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    def to_dense(self) -> torch.Tensor:
        out = torch.zeros(self.numel, dtype=self.values.dtype)
        out[self.indices] = self.values
        return out


Message = torch.Tensor | SparseVector


def _numel(vec: Message) -> int:
    return vec.numel if isinstance(vec, SparseVector) else vec.numel()


class Sum:
    """sum_i w_i v_i over one round's messages as they come, in the messages' dtype (one d-vector).

    The engine adds messages in client order, so the sum is the same whatever order they arrived in.
    Float32 messages are summed in float32: an in-place add, where a float64 sum of a float32 vector
    costs about three copies of it per message at d = 1e7 (the float64 references sum in float64).
    """

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.dtype: torch.dtype = torch.float32

    def add(self, vec: Message, weight: float) -> None:
        if self.total is None:
            self.dtype = vec.dtype
            self.total = torch.zeros(_numel(vec), dtype=self.dtype)
        if isinstance(vec, SparseVector):
            self.total.index_add_(0, vec.indices, vec.values.to(self.dtype), alpha=weight)
        else:
            self.total.add_(vec.to(self.dtype), alpha=weight)


def client_shares(num_clients: int, weights: Sequence[float] | None) -> torch.Tensor:
    """p_i as float64, summing to 1: uniform, or the given non-negative weights normalised."""
    if weights is None:
        return torch.full((num_clients,), 1.0 / num_clients, dtype=torch.float64)
    w = [float(x) for x in weights]
    if len(w) != num_clients:
        raise FeedbackError(f"expected {num_clients} client weights, got {len(w)}")
    if any(not math.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise FeedbackError("client weights must be finite, non-negative and not all zero")
    t = torch.tensor(w, dtype=torch.float64)
    return t / t.sum()


def state_vector(state: Mapping[str, torch.Tensor], key: str, v: torch.Tensor) -> torch.Tensor | None:
    """The client's memory `key`, checked against the vector v; None before the first message."""
    value = state.get(key)
    if value is None:
        return None
    if value.shape != v.shape:
        raise FeedbackError(f"state {key} has shape {tuple(value.shape)} but the vector has {tuple(v.shape)}")
    return value


def check_vector(v: torch.Tensor) -> torch.Tensor:
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or not v.is_floating_point():
        raise FeedbackError(f"expected a flat float tensor, got {getattr(v, 'shape', type(v))}")
    return v.detach()


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
