"""The server half of a round: sampling and per-client config through the algorithm's hooks, the
broadcast, streaming decode and aggregation of the replies, the server step and evaluation.

    cohort = algorithm.select(round, clients, cohort-size, generator(seed, round))   # ids, p_i (the
                         run's `sampling`, which the server builds and hands to the algorithm)
    config_i = {server-round, **algorithm.configure(round, i, seed), protocol keys}
    x --downlink plan--> payload bytes (the same for every client; with ef21p C(x - w), and the
                         dense w for a client that missed broadcasts)
    per reply, in client order: bytes --wire.decode against the expected group sizes--> v_i
                         (or InvalidReply) --> checks: its round, claimed examples, finite norm,
                         max-update-norm (RejectedReply, or clipped) --> the server half takes it in
    estimate = server half's finish (feedback "none": the weighted mean over the cohort)
    x' = algorithm.server_step(x, estimate)

Every reply goes into the one aggregation path: the mechanism's server half, with the algorithm's
client shares (`Algorithm.shares`), or the weight a reply reports for algorithms that report their
own (`Algorithm.reply_weight`), or s_i / p_i when the sampling's inclusion probabilities differ.
Only the running sums are held: memory O(d) whatever the cohort,
except with a robust `aggregation` rule (fedsqueeze.feedback.robust), which needs the whole cohort.
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedsqueeze import wire
from fedsqueeze.algorithms import Algorithm
from fedsqueeze.algorithms.base import Cohort
from fedsqueeze.algorithms.sampling import build_sampling
from fedsqueeze.config import Config
from fedsqueeze.feedback import SparseVector
from fedsqueeze.feedback.base import client_shares
from fedsqueeze.feedback.robust import robust_server
from fedsqueeze.seeding import derive_seed, generator

from . import protocol
from .plan import plan_for
from .shared import round_seed

Scalar = bool | int | float | str


class InvalidReply(ValueError):
    """A client's reply that cannot be used (error reply, bad payload, bad metrics); the message says why."""


class RejectedReply(InvalidReply):
    """A well-formed reply that a defence turned away: a norm above max-update-norm, more examples than
    the client holds, values that would overflow the aggregate (counted in `clients_rejected`)."""


@dataclass
class Reply:
    """What the server keeps of a valid reply once its vector is in the running sums."""

    partition_id: int
    node_id: int
    num_examples: int
    train_loss: float
    compression_error: float
    uplink_bytes: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Outbox:
    """A round's downlink: payloads and config per sampled partition, and the bytes they cost."""

    payloads: dict[int, dict[str, bytes]]
    config: dict[int, dict[str, Scalar]]

    def bytes_to(self, partition_ids: Sequence[int]) -> int:
        return sum(sum(len(b) for b in self.payloads[pid].values()) for pid in partition_ids)


@dataclass
class RoundStart:
    """A round as it opens: its cohort (partition ids, ascending), its place among the algorithm's
    cohorts, what each member is sent, and when it began (perf_counter)."""

    chosen: list[int]
    cohort: int
    inner_round: int
    outbox: Outbox
    t0: float


class Server:
    """The global model and everything the server does with it, one round at a time."""

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
        # the sampling is the server's alone (stratified by gradients computes them here, from the task)
        self.algorithm.sampling = build_sampling(cfg.sampling, self.task, self.plan.x0, self.model, cfg.seed)
        #: the one aggregation path: the mechanism's server half over the algorithm's client shares, or
        #: a robust rule in its place (feedback "none" only: see fedsqueeze.feedback.robust)
        shares = self.algorithm.shares(self.task)
        self.shares = client_shares(cfg.num_clients, shares)
        #: this round's cohort: its inclusion probabilities set the replies' weights
        self.cohort: Cohort | None = None
        self.unequal = False
        #: sum over the rounds so far of local-round-cost, plus global-round-cost where a cohort starts
        self.total_cost = 0.0
        if cfg.aggregation == "mean":
            self.aggregator = self.plan.mechanism.server(cfg.num_clients, shares)
        else:
            self.aggregator = robust_server(cfg.aggregation, cfg.num_clients, shares)
        #: the most examples each client may claim: max-examples, or its partition's size
        self.example_caps = [cfg.max_examples or len(c.train.y) for c in self.task.clients]
        self._round = 0
        down = self.plan.downlink_feedback
        self.downlink_server = None if down is None else down.server(self.plan.x0)
        #: ef21p: the downlink step each partition's copy of w is known to be at (0: w^0 = x^0)
        self.synced: dict[int, int] = {}
        #: feedback: the last round whose reply from each partition the server half took in (sent
        #: back as feedback-ack, so that a client commits its memory update only for replies that counted)
        self.accepted: dict[int, int] = {}
        self._taken: list[int] = []
        #: the run's identity, which a resumed run keeps (clients key their state files by it)
        self.run_uid = uuid.uuid4().hex[:16]

    # ---- checkpoint --------------------------------------------------------------------------
    def state_dict(self, server_round: int) -> dict[str, object]:
        """Everything the server needs to go on after `server_round` (fedsqueeze.engine.checkpoint)."""
        return {
            "round": server_round,
            "run_uid": self.run_uid,
            "x": self.x,
            "aggregator": self.aggregator.state_dict(),
            "downlink": None if self.downlink_server is None else self.downlink_server.state_dict(),
            "synced": dict(self.synced),
            "accepted": dict(self.accepted),
            "algorithm": self.algorithm.state_dict(),
            "total_cost": self.total_cost,
        }

    def load_state_dict(self, state: Mapping[str, object]) -> int:
        """Take up a checkpoint's state; returns the round it was written after."""
        x = state["x"]
        if not isinstance(x, torch.Tensor) or x.shape != self.x.shape:
            raise ValueError(f"the checkpoint's model has shape {getattr(x, 'shape', None)}, this run's {self.x.shape}")
        self.x = x.clone()
        self.run_uid = str(state["run_uid"])
        self.aggregator.load_state_dict(state["aggregator"])  # type: ignore[arg-type]
        if self.downlink_server is not None:
            self.downlink_server.load_state_dict(state["downlink"])  # type: ignore[arg-type]
        self.synced = dict(state["synced"])  # type: ignore[call-overload]
        self.accepted = dict(state["accepted"])  # type: ignore[call-overload]
        self.algorithm.load_state_dict(state["algorithm"])  # type: ignore[arg-type]
        self.total_cost = float(state["total_cost"])  # type: ignore[arg-type]
        return int(state["round"])  # type: ignore[call-overload]

    # ---- sampling and per-client config -------------------------------------------------------
    def select(self, server_round: int) -> Cohort:
        """The algorithm's cohort for this round, drawn from a generator seeded by (seed, round)."""
        gen = generator(self.cfg.seed, server_round, "sample")
        cohort = self.algorithm.select(server_round, range(self.cfg.num_clients), self.cfg.cohort_count(), gen)
        bad = [i for i in cohort.ids if not 0 <= i < self.cfg.num_clients]
        if bad or len(set(cohort.ids)) != len(cohort.ids):
            raise ValueError(
                f"{self.algorithm.name}.select returned clients {list(cohort.ids)}: "
                f"expected ids in 0..{self.cfg.num_clients - 1}, each once"
            )
        self.cohort = cohort
        self.unequal = len(set(cohort.probabilities.values())) > 1
        return cohort

    def cohort_weight(self, partition_id: int) -> float | None:
        """A reply's weight in the cohort mean: s_i / p_i when the cohort's p_i differ (so that the mean
        estimates the mean over all clients: Horvitz-Thompson weights, normalised over the replies), None
        (the share s_i) when they are equal, which gives the same mean."""
        if self.cohort is None or not self.unequal:
            return None
        return float(self.shares[partition_id]) / self.cohort.probabilities[partition_id]

    def client_config(self, server_round: int, partition_id: int) -> dict[str, Scalar]:
        """What a sampled partition is told this round: the round, the algorithm's values, the protocol's."""
        seed = derive_seed(self.cfg.seed, server_round, "algorithm")
        config: dict[str, Scalar] = {
            protocol.SERVER_ROUND: server_round,
            protocol.RUN_UID: self.run_uid,
            **self.algorithm.configure(server_round, partition_id, seed),
        }
        if self.plan.stateful:
            config[protocol.FEEDBACK_ACK] = self.accepted.get(partition_id, 0)
        if self.cfg.randomness == "shared":
            config[protocol.ROUND_SEED] = round_seed(self.cfg.seed, server_round)
        return config

    # ---- downlink --------------------------------------------------------------------------
    def broadcast(self, server_round: int, partition_ids: Sequence[int]) -> Outbox:
        """What each sampled partition receives this round.

        Without downlink feedback every client gets the same payloads. With ef21p the server first
        moves w <- w + C(x - w); a client whose copy is at the previous step gets C(x - w), one that
        missed a broadcast (not sampled, or its reply was lost) gets w itself, exact.
        """
        gen = generator(self.cfg.seed, server_round, "down")
        configs = {p: self.client_config(server_round, p) for p in partition_ids}
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
                out.config[pid] = {**configs[pid], protocol.DOWNLINK_STEP: step, protocol.DOWNLINK_RESYNC: False}
            else:
                if resync is None:
                    dense = self.plan.downlink_dense
                    resync = dense.encode(dense.compress(self.downlink_server.w))
                out.payloads[pid] = resync
                out.config[pid] = {**configs[pid], protocol.DOWNLINK_STEP: step, protocol.DOWNLINK_RESYNC: True}
        # a partition that does not reply may or may not have applied this broadcast: it gets w next time
        for pid in partition_ids:
            self.synced.pop(pid, None)
        return out

    # ---- uplink: one reply at a time --------------------------------------------------------
    def open_round(self, server_round: int) -> RoundStart:
        """Sample the round's cohort, count its cost and make its broadcast (every kind of round)."""
        t0 = time.perf_counter()
        chosen = sorted(self.select(server_round).ids)
        cohort, inner_round = self.algorithm.position(server_round)
        # a cohort costs c1 per communication round in it and c2 once (the round between cohorts)
        self.total_cost += self.cfg.local_round_cost + (self.cfg.global_round_cost if inner_round == 1 else 0.0)
        return RoundStart(chosen, cohort, inner_round, self.broadcast(server_round, chosen), t0)

    def row(self, start: RoundStart, *, ok: int, applied: bool, **columns: object) -> dict[str, object]:
        """A round's row of metrics.jsonl: the counts of `start`'s cohort with `ok` valid replies,
        the evaluation of the model now, and `columns` (bytes, losses, ...) in the order given."""
        return {
            "clients_sampled": len(start.chosen),
            "clients_ok": ok,
            "clients_failed": len(start.chosen) - ok,
            **columns,
            **self.evaluate(),
            "wall_s": time.perf_counter() - start.t0,
            "dense_uplink_bytes": 4 * self.uplink.numel * ok,
            "applied": applied,
            "cohort": start.cohort,
            "inner_round": start.inner_round,
            "total_cost": self.total_cost,
        }

    def begin(self, server_round: int) -> None:
        """Start taking in a round's replies (call `take` for each, in partition order, then `finish`)."""
        self.aggregator.begin()
        self._taken = []
        self._round = server_round

    def take(
        self, payloads: Mapping[str, bytes], metrics: Mapping[str, object], partition_id: int, node_id: int
    ) -> Reply:
        """Validate and decode one reply and add it to the round's sums; InvalidReply if it fails."""
        if partition_id in self._taken:
            raise InvalidReply(f"partition {partition_id} already replied this round")
        answered = metrics.get(protocol.SERVER_ROUND)
        if answered != self._round:  # a late reply to an earlier round must not be acknowledged as this one's
            raise InvalidReply(f"a reply to round {answered!r}, not to this round {self._round}")
        n = metrics.get(protocol.NUM_EXAMPLES)
        if isinstance(n, bool) or not isinstance(n, (int, float)) or not math.isfinite(n) or n <= 0:
            raise InvalidReply(f"{protocol.NUM_EXAMPLES} must be a positive number, got {n!r}")
        if n > self.example_caps[partition_id]:
            raise RejectedReply(
                f"claims {n:g} examples, more than the {self.example_caps[partition_id]} it may (max-examples, "
                "or its partition's size)"
            )
        extra = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k not in protocol.REPORTED}
        update = self.bound(self.decode(payloads))
        weight = self.algorithm.reply_weight(extra)
        if weight is None:
            weight = self.cohort_weight(partition_id)
        if weight is not None and (not math.isfinite(weight) or weight < 0):
            raise InvalidReply(f"aggregation weight must be a finite non-negative number, got {weight!r}")
        self.aggregator.add(partition_id, update, weight)
        self._taken.append(partition_id)
        if self.downlink_server is not None:  # the partition applied this round's broadcast
            self.synced[partition_id] = self.downlink_server.step
        return Reply(
            partition_id=partition_id,
            node_id=node_id,
            num_examples=int(n),
            train_loss=_number(metrics.get(protocol.TRAIN_LOSS)),
            compression_error=_number(metrics.get(protocol.COMPRESSION_ERROR)),
            uplink_bytes=sum(len(b) for b in payloads.values()),
            metrics=extra,
        )

    def secure_weight(self, partition_id: int) -> float:
        """A reply's weight when only the cohort's sum is seen (secagg): s_i / p_i, or the share s_i."""
        weight = self.cohort_weight(partition_id)
        return float(self.shares[partition_id]) if weight is None else weight

    def take_sum(self, total: torch.Tensor | SparseVector, partition_ids: Sequence[int], share: float) -> None:
        """Add the weighted sum of several replies at once, as secure aggregation reveals it."""
        self.aggregator.add_sum(list(partition_ids), total, share)
        self._taken.extend(partition_ids)
        if self.downlink_server is not None:
            self.synced.update({pid: self.downlink_server.step for pid in partition_ids})

    def decode(self, payloads: Mapping[str, bytes]) -> torch.Tensor | SparseVector:
        """The vector a reply's payloads stand for, checked against the layout the server expects
        (a SparseVector when every payload is sparse: it is added at its support, never made dense)."""
        keys = [g.key for g in self.uplink.groups]
        if sorted(payloads) != sorted(keys):
            raise InvalidReply(f"payload groups {sorted(payloads)} differ from the expected {sorted(keys)}")
        try:
            compressed = [wire.decode(payloads[g.key], g.numel) for g in self.uplink.groups]
        except wire.PayloadError as exc:
            raise InvalidReply(f"payload rejected: {exc}") from None
        try:
            sparse = self.uplink.decompress_sparse(compressed)
            if sparse is None:
                update: torch.Tensor | SparseVector = self.uplink.decompress(compressed)
                values = update
            else:
                update = SparseVector(self.uplink.numel, *sparse)
                values = update.values
        except (ValueError, RuntimeError) as exc:
            raise InvalidReply(f"payload does not fit the model: {exc}") from None
        # one BLAS pass: NaN and inf propagate into ||v||^2, and so does a norm beyond float32's range,
        # which is what could overflow the aggregate
        if not math.isfinite(float(torch.dot(values, values))):
            raise RejectedReply("update has non-finite values, or a norm beyond float32's range")
        return update

    def bound(self, update: torch.Tensor | SparseVector) -> torch.Tensor | SparseVector:
        """The reply within max-update-norm (L2, whole update): rejected above it, or clipped to it."""
        bound = self.cfg.max_update_norm
        if bound <= 0:
            return update
        values = update.values if isinstance(update, SparseVector) else update
        norm = float(torch.linalg.vector_norm(values, dtype=torch.float64))
        if norm <= bound:
            return update
        if self.cfg.over_norm == "reject":
            raise RejectedReply(f"update norm {norm:.4g} is above max-update-norm {bound:g}")
        scaled = values * (bound / norm)
        return SparseVector(update.numel, update.indices, scaled) if isinstance(update, SparseVector) else scaled

    def finish(self, server_round: int, *, step: bool = True) -> None:
        """Form the estimate from the replies taken in and step the model.

        step=False (a round with too few replies): the model stays, but a feedback mechanism's running
        quantities still take the replies in, since those clients have already updated their memory.
        """
        if not self._taken:
            return
        if not step and not self.plan.stateful:
            return
        estimate = self.aggregator.finish()
        if self.plan.stateful:
            self.accepted.update({pid: server_round for pid in self._taken})
        if step:
            self.x = self.algorithm.server_step(self.x, estimate, server_round).detach()

    def save_model(self, path: Path) -> None:
        """The current global model as a state_dict (written atomically)."""
        write_model(self.model_state(), path)

    def model_state(self) -> dict[str, torch.Tensor]:
        """The current global model's state_dict. Its tensors are this round's own: the next
        `_load_global` gives the model new ones, so a writer on another thread may take its time."""
        self._load_global()
        return {k: v.detach() for k, v in self.model.state_dict().items()}

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


def write_model(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """A model state_dict to `path`, atomically (a temporary file, then a rename)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)


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
