"""A secure round (`secagg = "masked(...)"`): the round's four exchanges through a transport, the
client's stages, and the decoding of the cohort's sum (fedsqueeze.secagg holds the protocol itself).

    server: cohort, broadcast as in a plain round; params = (run, round, fresh nonce, cohort, t, b, w, K, c)
    advertise  -> keys of U0      transport.stage(round, ADVERTISE, {pid: params})
    share      -> shares of U1    ... {pid: params + U0's keys}
    masked     -> y_i of U2       ... {pid: params + U1 + shares for pid, broadcast + training config}:
                                  the client trains as in a plain round (ClientHalf.train), reads the
                                  values its payloads hold on the round's common support, scales them
                                  by its weight a_i and rounds them to b bits (fedsqueeze.secagg.quantize)
    unmask     -> shares          ... {pid: params + U2 + D}
    server: S = sum_{U2} q_i; sum_{U2} a_i v_i = D S - |U2| c on the support, times the sparsifier's
            scale (d/k, 1/p), into the mechanism's server half with the weights' sum; then the step

The common support is the one every client's compressor draws from the round seed
(`randomness = "shared"`): the server finds it by compressing a vector of ones with the same
generators, which also gives the sparsifier's scale. The weights a_i = w_i / max_cohort w_j are the
server's own (client shares, or a sampling's s_i / p_i), so nothing per client is sent in plaintext:
a reply is y_i alone, and rows report no per-client train loss or compression error.
The round is skipped (row `applied` false, `secagg_aborted` says why) when fewer than t clients
remain at any stage; a client's refusal is an error reply, counted as its dropout.
A secure round is resumable like any other: the checkpoint follows the round, and a round that a
crash interrupted is run again with a fresh nonce and fresh keys.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from fedsqueeze import wire
from fedsqueeze.compressors import Dense, Sparse
from fedsqueeze.feedback import SparseVector
from fedsqueeze.secagg import masking, quantize
from fedsqueeze.secagg.session import ClientSession, RoundParams, SecAggAbort, SecAggError, ServerSession
from fedsqueeze.secagg.spec import SecAgg, parse

from . import protocol
from .client import ClientHalf
from .payloads import UpdatePlan
from .server import Outbox, Server
from .shared import SharedSeed, round_seed, shared_seed_of

log = logging.getLogger("fedsqueeze.server")

#: the stages' actions (Flower message types "query.<action>", and "train.<action>" for the masked one)
ADVERTISE, SHARE, MASKED, UNMASK = "secagg_advertise", "secagg_share", "secagg_masked", "secagg_unmask"
STAGES = (ADVERTISE, SHARE, MASKED, UNMASK)
#: the record of a stage message holding the round parameters and the stage's data
RECORD = "secagg"
#: config key of a client's aggregation weight a_i in the masked stage
WEIGHT = "secagg-weight"

Value = bool | int | float | str | bytes


@dataclass
class StageMessage:
    """What one client gets in one stage: the secagg record, and in the masked stage the broadcast and
    the training config of a plain round."""

    record: dict[str, Value]
    payloads: dict[str, bytes] = field(default_factory=dict)
    config: dict[str, Value] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(len(b) for b in self.payloads.values()) + record_bytes(self.record)


@dataclass
class StageReply:
    partition_id: int
    record: dict[str, bytes] | None = None
    failure: str | None = None
    uplink_bytes: int = 0


class StageTransport(Protocol):
    def stage(self, server_round: int, action: str, messages: Mapping[int, StageMessage]) -> Iterable[StageReply]:
        """Send every message of one stage; its replies (or failures), one per partition, in any order."""


def record_bytes(record: Mapping[str, object]) -> int:
    """The bytes a record's byte values carry (keys, ciphertexts, masked vectors)."""
    return sum(len(v) for v in record.values() if isinstance(v, bytes))


def _ids(text: object) -> list[int]:
    return [int(p) for p in str(text).split(",") if p]


def _join(ids: Iterable[int]) -> str:
    return ",".join(str(i) for i in ids)


# ---- the round's common support --------------------------------------------------------------


@dataclass(frozen=True)
class Support:
    """Where one payload group's values sit (None: every coordinate) and the scale its sparsifier applies."""

    indices: torch.Tensor | None
    scale: float

    def size(self, numel: int) -> int:
        return numel if self.indices is None else int(self.indices.numel())


def supports(plan: UpdatePlan, seed: SharedSeed) -> list[Support]:
    """Each group's support and scale this round: its compressor applied to ones with the round's generators."""
    out = []
    for group, gen in zip(plan.groups, seed.uplink(plan.keys()), strict=True):
        c = group.compressor.compress(torch.ones(group.numel), gen)
        if isinstance(c, Sparse):
            values = c.values.to_dense()
            indices: torch.Tensor | None = c.indices
        elif isinstance(c, Dense):
            values, indices = c.to_dense(), None
        else:
            raise ValueError(f"group {group.key!r}: {group.spec} does not decode as a function of the sum")
        scale = float(values[0]) if values.numel() else 1.0
        if values.numel() and not bool(torch.all(values == scale)):
            raise ValueError(f"group {group.key!r}: {group.spec} scales its values unevenly")
        out.append(Support(indices, scale))
    return out


def support_values(plan: UpdatePlan, payloads: Mapping[str, bytes], layout: Sequence[Support]) -> np.ndarray:
    """The unscaled values a client's payloads hold on the round's support, concatenated over groups."""
    parts = []
    for group, support in zip(plan.groups, layout, strict=True):
        c = wire.decode(payloads[group.key], group.numel)
        if support.indices is None:
            dense = c.to_dense() if isinstance(c, Dense) else None
            if dense is None:
                raise SecAggError(f"group {group.key!r}: expected a dense payload")
            parts.append(dense.to(torch.float64).numpy())
            continue
        if not isinstance(c, Sparse) or not torch.equal(c.indices, support.indices):
            raise SecAggError(f"group {group.key!r}: the payload is not on the round's shared support")
        parts.append(c.values.to_dense().to(torch.float64).numpy() / support.scale)
    return np.concatenate(parts) if parts else np.zeros(0)


def decode_sum(plan: UpdatePlan, layout: Sequence[Support], sums: np.ndarray) -> torch.Tensor | SparseVector:
    """The flat vector of per-group sums on the support (scaled back), sparse where every group is."""
    payloads: list[Dense | Sparse] = []
    start = 0
    for group, support in zip(plan.groups, layout, strict=True):
        size = support.size(group.numel)
        values = torch.from_numpy(sums[start : start + size] * support.scale).to(torch.float32)
        start += size
        if support.indices is None:
            payloads.append(Dense(group.numel, torch.float32, values))
        else:
            payloads.append(Sparse(group.numel, torch.float32, support.indices, Dense(size, torch.float32, values)))
    sparse = plan.decompress_sparse(payloads)
    if sparse is not None:
        return SparseVector(plan.numel, *sparse)
    return plan.decompress(payloads)


# ---- the server's side --------------------------------------------------------------------------


def secure_round(server: Server, transport: StageTransport, server_round: int) -> dict[str, Any]:
    """One secure round; returns its row (as `fedsqueeze.engine.loop.run_round` does)."""
    cfg = server.cfg
    spec = parse(cfg.secagg)
    assert spec is not None
    start = server.open_round(server_round)
    chosen, outbox = start.chosen, start.outbox
    seed = round_seed(cfg.seed, server_round)
    layout = supports(server.uplink, SharedSeed(seed))
    length = sum(s.size(g.numel) for g, s in zip(server.uplink.groups, layout, strict=True))
    params = RoundParams(
        run_uid=server.run_uid, server_round=server_round, nonce=os.urandom(16), cohort=tuple(chosen),
        threshold=spec.threshold, bits=spec.bits, word=masking.word_bits(len(chosen), spec.bits), length=length,
        clip=spec.clip, round_seed=seed,
    )  # fmt: skip
    weights = {pid: server.secure_weight(pid) for pid in chosen}
    top = max(weights.values())
    traffic = {"up": 0, "down": 0}
    failures: list[str] = []
    survivors: list[int] = []
    aborted = None
    server.begin(server_round)
    try:
        survivors = _stages(server, transport, params, spec, outbox, weights, top, layout, traffic, failures)
    except SecAggAbort as exc:
        aborted = str(exc)
        log.warning("round %d skipped: secure aggregation stopped: %s", server_round, exc)
    for failure in failures:
        log.warning("round %d: %s", server_round, failure)
    applied = aborted is None and len(survivors) >= cfg.min_replies
    server.finish(server_round, step=applied)
    row = server.row(
        start,
        ok=len(survivors) if aborted is None else 0,
        applied=applied,
        clients_rejected=0,
        uplink_bytes=traffic["up"],
        downlink_bytes=traffic["down"],
        train_loss=None,
        compression_error=None,
    )
    return {**row, "secagg_aborted": aborted}


def _stages(
    server: Server,
    transport: StageTransport,
    params: RoundParams,
    spec: SecAgg,
    outbox: Outbox,
    weights: Mapping[int, float],
    top: float,
    layout: Sequence[Support],
    traffic: dict[str, int],
    failures: list[str],
) -> list[int]:
    """The four exchanges; returns U2 after taking the decoded sum in (SecAggAbort below the threshold)."""
    session = ServerSession(params)
    base = params.to_record()

    def exchange(action: str, messages: dict[int, StageMessage]) -> dict[int, dict[str, bytes]]:
        traffic["down"] += sum(m.nbytes() for m in messages.values())
        replies = {}
        for reply in transport.stage(params.server_round, action, messages):
            traffic["up"] += reply.uplink_bytes
            if reply.failure is not None or reply.record is None:
                failures.append(f"partition {reply.partition_id}: {action}: {reply.failure or 'no reply'}")
            elif reply.partition_id in messages:
                replies[reply.partition_id] = reply.record
        return replies

    keys = session.advertised(exchange(ADVERTISE, {pid: StageMessage(dict(base)) for pid in params.cohort}))
    key_record: dict[str, Value] = {f"c-pk.{j}": c for j, (c, _) in keys.items()}
    key_record.update({f"s-pk.{j}": s for j, (_, s) in keys.items()})
    routed = session.shared(exchange(SHARE, {pid: StageMessage({**base, **key_record}) for pid in keys}))
    u1 = _join(session.u1)
    masked = {
        pid: StageMessage(
            {**base, "u1": u1, **{f"from.{j}": blob for j, blob in sealed.items()}},
            payloads=outbox.payloads[pid],
            config={**outbox.config[pid], WEIGHT: weights[pid] / top},
        )
        for pid, sealed in routed.items()
    }
    dtype = masking.WORDS[params.word]
    ys = {}
    for pid, record in exchange(MASKED, masked).items():
        data = record.get("y", b"")
        if len(data) == params.length * dtype.itemsize:
            ys[pid] = np.frombuffer(data, dtype=dtype)
    survivors, dropped = session.masked(ys)
    unmask = {pid: StageMessage({**base, "u2": _join(survivors), "dropped": _join(dropped)}) for pid in survivors}
    total = session.unmasked(exchange(UNMASK, unmask))
    sums = quantize.decode_sum(total, len(survivors), spec.clip, spec.bits) * top
    server.take_sum(decode_sum(server.uplink, layout, sums), survivors, sum(weights[p] for p in survivors))
    return survivors


# ---- the client's side ----------------------------------------------------------------------------


def client_stage(
    client: ClientHalf,
    action: str,
    partition_id: int,
    message: StageMessage,
    session: dict[str, object],
    state: dict[str, torch.Tensor] | None = None,
) -> dict[str, bytes]:
    """One stage on a client: its reply; `session` (the client's secagg record) is updated in place,
    `state` (its training state, masked stage only) as in a plain round. SecAggError: refused."""
    params = RoundParams.from_record(message.record)
    if params.run_uid != str(message.config.get(protocol.RUN_UID, params.run_uid)):
        raise SecAggError("the training config names another run than the round parameters")
    me = ClientSession(partition_id, session)
    if action == ADVERTISE:
        reply = me.advertise(params)
    elif action == SHARE:
        keys = {
            int(k.removeprefix("c-pk.")): (bytes(v), bytes(message.record[f"s-pk.{k.removeprefix('c-pk.')}"]))  # type: ignore[arg-type]
            for k, v in message.record.items()
            if k.startswith("c-pk.")
        }
        reply = me.share(params, keys)
    elif action == MASKED:
        cts = {int(k.removeprefix("from.")): bytes(v) for k, v in message.record.items() if k.startswith("from.")}  # type: ignore[arg-type]
        me.receive(params, _ids(message.record.get("u1", "")), cts)  # refused before any training
        if int(message.config.get(protocol.SERVER_ROUND, -1)) != params.server_round:  # type: ignore[call-overload]
            raise SecAggError("the training config is for another round than the round parameters")
        reply = {"y": _masked_upload(client, partition_id, message, params, me, state if state is not None else {})}
    elif action == UNMASK:
        reply = me.unmask(params, _ids(message.record.get("u2", "")), _ids(message.record.get("dropped", "")))
    else:
        raise SecAggError(f"unknown secure aggregation stage {action!r}; valid: {', '.join(STAGES)}")
    session.clear()
    session.update(me.record)
    return reply


def _masked_upload(
    client: ClientHalf,
    partition_id: int,
    message: StageMessage,
    params: RoundParams,
    me: ClientSession,
    state: dict[str, torch.Tensor],
) -> bytes:
    """Train as in a plain round, take the values on the round's support, weigh, round, mask."""
    config = message.config
    # (without shared randomness every group is dense: the support needs no seed)
    if protocol.ROUND_SEED in config and shared_seed_of(config).value != params.round_seed:
        raise SecAggError("the training config's round seed is not the one the round parameters bind")
    weight = config.get(WEIGHT)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
        raise SecAggError(f"{WEIGHT} must be a number in [0, 1], got {weight!r}")
    result = client.train(partition_id, message.payloads, config, state)  # type: ignore[arg-type]
    plan = client.plan.uplink
    values = support_values(plan, result.payloads, supports(plan, SharedSeed(params.round_seed)))
    rng = np.random.default_rng(int.from_bytes(os.urandom(16), "big"))  # rounding noise the server cannot know
    q, _ = quantize.encode(values * float(weight), params.clip, params.bits, params.word, rng)
    return me.mask(params, q).tobytes()


# ---- without Flower ---------------------------------------------------------------------------------


class LocalStages:
    """The stages of `fedsqueeze.engine.loop.LocalTransport`: every client called in this process, with
    its secagg record beside its training state; `drop(round, action, pid)` loses that reply."""

    def __init__(self, client: ClientHalf, states: dict[int, dict[str, torch.Tensor]], drop=None) -> None:
        self.client = client
        self.states = states
        self.sessions: dict[int, dict[str, object]] = {}
        self.drop = drop or (lambda server_round, action, pid: False)

    def stage(self, server_round: int, action: str, messages: Mapping[int, StageMessage]) -> list[StageReply]:
        out = []
        for pid, message in messages.items():
            session = self.sessions.setdefault(pid, {})
            try:
                record = client_stage(self.client, action, pid, message, session, self.states.setdefault(pid, {}))
            except SecAggError as exc:
                out.append(StageReply(pid, failure=f"refused: {exc}"))
                continue
            if self.drop(server_round, action, pid):
                out.append(StageReply(pid, failure="reply lost"))
                continue
            out.append(StageReply(pid, record, uplink_bytes=record_bytes(record)))
        return out
