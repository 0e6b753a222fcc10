"""The server half of a round without Flower: sampling, broadcast, validation, aggregation, evaluation.

    x --downlink plan--> payload bytes (the same for every sampled client; with ef21p C(x - w), and
                         the dense w for a client that missed broadcasts)
    reply bytes --wire.decode against the expected group sizes--> Compressed --> v_i   (or InvalidReply)
    g = feedback server half ({i: v_i})  or, without feedback in delta mode,
        algorithm.aggregate(v_i, weights = AGGREGATION_WEIGHT or examples)
    x' = algorithm.server_step(x, g)

`fedsqueeze.server.app` drives these calls from its round loop and turns Messages into them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedsqueeze import wire
from fedsqueeze.algorithms import AGGREGATION_WEIGHT, Algorithm, derive_seed
from fedsqueeze.client.local import DOWNLINK_RESYNC, DOWNLINK_STEP, FEEDBACK_ACK
from fedsqueeze.config import Config
from fedsqueeze.runplan import plan_for


class InvalidReply(ValueError):
    """A client's reply that cannot be used (error reply, bad payload, bad metrics); the message says why."""


@dataclass
class Reply:
    """A client's decoded, validated reply."""

    partition_id: int
    node_id: int
    update: torch.Tensor
    num_examples: int
    train_loss: float
    compression_error: float
    uplink_bytes: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Outbox:
    """A round's downlink: payloads and round config per sampled partition, and the bytes they cost."""

    payloads: dict[int, dict[str, bytes]]
    config: dict[int, dict[str, bool | int | float | str]]

    def bytes_to(self, partition_ids: Sequence[int]) -> int:
        return sum(sum(len(b) for b in self.payloads[pid].values()) for pid in partition_ids)


class Coordinator:
    """The global model and everything the server does with it."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.plan = plan_for(cfg)
        self.task = self.plan.task
        self.model = self.task.new_model(seed=derive_seed(cfg.seed, "init"))
        self.layout = self.plan.layout
        self.x = self.plan.x0.clone()
        self.uplink = self.plan.uplink
        self.downlink = self.plan.downlink
        self.algorithm: Algorithm = self.plan.new_algorithm()
        mechanism = self.plan.mechanism
        self.feedback = None if mechanism is None else mechanism.server(cfg.num_clients, self.plan.shares())
        down = self.plan.downlink_feedback
        self.downlink_server = None if down is None else down.server(self.plan.x0)
        #: ef21p: the downlink step each partition's copy of w is known to be at (0: w^0 = x^0)
        self.synced: dict[int, int] = {}
        #: feedback: the last round whose reply from each partition the server half took in (sent
        #: back as feedback-ack, so that a client commits its memory update only for replies that counted)
        self.accepted: dict[int, int] = {}

    # ---- sampling --------------------------------------------------------------------------
    def sample(self, partition_ids: Sequence[int], server_round: int) -> list[int]:
        """The partitions that train this round: `cohort-size` of them, seeded by (seed, round), sorted."""
        ids = sorted(partition_ids)
        k = min(self.cfg.cohort_count(), len(ids))
        if k == len(ids):
            return ids
        gen = torch.Generator(device="cpu").manual_seed(derive_seed(self.cfg.seed, server_round, "sample"))
        chosen = torch.randperm(len(ids), generator=gen)[:k].tolist()
        return sorted(ids[i] for i in chosen)

    # ---- downlink --------------------------------------------------------------------------
    def broadcast(self, server_round: int, partition_ids: Sequence[int]) -> Outbox:
        """What each sampled partition receives this round.

        Without downlink feedback every client gets the same payloads. With ef21p the server first
        moves w <- w + C(x - w); a client whose copy is at the previous step gets C(x - w), one that
        missed a broadcast (not sampled, or its reply was lost) gets w itself, exact.
        """
        gen = torch.Generator(device="cpu").manual_seed(derive_seed(self.cfg.seed, server_round, "down"))
        base = self.round_config(server_round)
        if self.feedback is not None:
            configs = {p: {**base, FEEDBACK_ACK: self.accepted.get(p, 0)} for p in partition_ids}
        else:
            configs = {p: base for p in partition_ids}
        if self.downlink_server is None:
            payloads = self.downlink.encode(self.downlink.compress(self.x, gen))
            return Outbox({p: payloads for p in partition_ids}, configs)
        message = self.downlink_server.broadcast(self.x, gen)
        step = message.step
        delta = self.downlink.encode(message.payload)
        resync: dict[str, bytes] | None = None
        out = Outbox({}, {})
        for pid in partition_ids:
            if self.synced.get(pid, 0) == step - 1:
                out.payloads[pid] = delta
                out.config[pid] = {**configs[pid], DOWNLINK_STEP: step, DOWNLINK_RESYNC: False}
            else:
                if resync is None:
                    dense = self.plan.downlink_dense
                    resync = dense.encode(dense.compress(self.downlink_server.w))
                out.payloads[pid] = resync
                out.config[pid] = {**configs[pid], DOWNLINK_STEP: step, DOWNLINK_RESYNC: True}
        # a partition that does not reply may or may not have applied this broadcast: it gets w next time
        for pid in partition_ids:
            self.synced.pop(pid, None)
        return out

    def acknowledge(self, partition_id: int) -> None:
        """A valid reply: the partition applied this round's broadcast."""
        if self.downlink_server is not None:
            self.synced[partition_id] = self.downlink_server.step

    def round_config(self, server_round: int) -> dict[str, bool | int | float | str]:
        return {
            "server-round": server_round,
            **self.algorithm.round_config(server_round, derive_seed(self.cfg.seed, server_round, "algorithm")),
        }

    # ---- uplink ----------------------------------------------------------------------------
    def decode(
        self, payloads: Mapping[str, bytes], metrics: Mapping[str, object], partition_id: int, node_id: int
    ) -> Reply:
        """Validate and decode one reply against the layout the server expects; InvalidReply if it fails."""
        keys = [g.key for g in self.uplink.groups]
        if sorted(payloads) != sorted(keys):
            raise InvalidReply(f"payload groups {sorted(payloads)} differ from the expected {sorted(keys)}")
        try:
            compressed = [wire.decode(payloads[g.key], g.numel) for g in self.uplink.groups]
        except wire.PayloadError as exc:
            raise InvalidReply(f"payload rejected: {exc}") from None
        try:
            update = self.uplink.decompress(compressed)
        except (ValueError, RuntimeError) as exc:
            raise InvalidReply(f"payload does not fit the model: {exc}") from None
        if not bool(torch.isfinite(update).all()):
            raise InvalidReply("update has non-finite values")
        n = metrics.get("num-examples")
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
            raise InvalidReply(f"num-examples must be a positive number, got {n!r}")
        loss = _number(metrics.get("train-loss"))
        err = _number(metrics.get("compression-error"))
        extra = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k not in _KNOWN}
        return Reply(
            partition_id=partition_id,
            node_id=node_id,
            update=update,
            num_examples=int(n),
            train_loss=loss,
            compression_error=err,
            uplink_bytes=sum(len(b) for b in payloads.values()),
            metrics=extra,
        )

    # ---- aggregation -----------------------------------------------------------------------
    def apply(self, replies: Sequence[Reply], server_round: int, *, step: bool = True) -> None:
        """Aggregate the replies (in partition order, so the result does not depend on arrival order).

        step=False (a round with too few replies): the model stays, but a feedback mechanism's running
        quantities still take the replies in, since those clients have already updated their memory.
        """
        ordered = sorted(replies, key=lambda r: r.partition_id)
        if self.feedback is not None:
            if not ordered:
                return
            estimate = self.feedback.aggregate({r.partition_id: r.update for r in ordered})
            self.accepted.update({r.partition_id: server_round for r in ordered})
        elif not step:
            return
        else:
            weights = [float(r.metrics.get(AGGREGATION_WEIGHT, r.num_examples)) for r in ordered]
            estimate = self.algorithm.aggregate([r.update for r in ordered], weights)
        if step:
            self.x = self.algorithm.server_step(self.x, estimate, server_round).detach()

    def save_model(self, path: Path) -> None:
        """The current global model as a state_dict (written atomically)."""
        self._load_global()
        tmp = path.with_name(path.name + ".tmp")
        torch.save({k: v.detach().clone() for k, v in self.model.state_dict().items()}, tmp)
        os.replace(tmp, path)

    # ---- evaluation ------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Global test loss and accuracy; for convex tasks subopt, grad_norm_sq, dist_sq."""
        w = self._load_global()
        loss, acc = self.task.evaluate(self.model)
        out = {"test_loss": float(loss), "test_accuracy": float(acc)}
        out.update({k: float(v) for k, v in self.task.convex_metrics(w).items()})
        return out

    def _load_global(self) -> torch.Tensor:
        """Put the global model's part of x into `self.model`; returns that part."""
        w = self.algorithm.global_params(self.x, self.model).clone()
        torch.nn.utils.vector_to_parameters(w, self.model.parameters())
        return w


_KNOWN = {"num-examples", "train-loss", "compression-error", "partition-id"}


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    pairs = [(v, w) for v, w in zip(values, weights, strict=True) if math.isfinite(v)]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total > 0 else math.nan


def mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan
