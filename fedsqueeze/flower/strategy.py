"""`Compressed`: a Flower strategy wrapper that takes compressed replies from `compress_mod` clients.

    strategy = fedsqueeze.flower.Compressed(FedAvg(...), uplink="topk(0.01)", feedback="ef21")

Around any `flwr.serverapp.strategy.Strategy` (the inner strategy):
- configure_train: with `downlink` set, the model is compressed, and the inner strategy is configured
  with the model the clients will decode (so that its idea of the current model, FedAdam's
  `current_arrays` for one, is what the clients start from); each of its messages gets the settings,
  the round's shared seed and (feedback with client memory) the acknowledgement in its config, and
  the packed broadcast in place of its arrays;
- aggregate_train: each reply's payloads are decoded against the layout the server expects (a reply
  that fails is dropped and counted, never guessed at); then
  * `feedback` "none" or "ef": each decoded vector is that client's (compressed) update v_i, and the
    inner strategy gets the client's model as the dense arrays x + v_i, so it aggregates as it
    always does: FedAvg/FedProx average them, FedAdam/FedYogi step from their average, FedMedian,
    FedTrimmedAvg, Krum and Bulyan apply their robust rule to the clients' compressed models;
  * "ef21", "efbv", "diana": the per-client vectors are increments of running memories, not updates;
    the mechanism's server half (uniform shares over the nodes present at round 1) forms the
    estimate g, and every reply becomes x + g, so an averaging inner strategy returns x + g (FedAdam:
    its delta is g). Robust and per-client inner strategies are refused with this feedback.
- it records, per round, uplink bytes (the payloads' lengths), what they would cost as dense float32,
  downlink bytes of the train messages, replies taken and dropped (`rounds`, and `fedsqueeze-*`
  entries in the round's aggregated train metrics).
Evaluation messages are the inner strategy's own (dense).

Use it outermost: Flower's DP wrappers go inside it (`Compressed(DifferentialPrivacyServerSideFixedClipping
(FedAvg(...), ...), ...)`), so that they see dense arrays; see docs/flower.md.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    Bulyan,
    FedMedian,
    FedTrimmedAvg,
    FedXgbBagging,
    FedXgbCyclic,
    MultiKrum,
    QFedAvg,
    Strategy,
)

from fedsqueeze import feedback as fb
from fedsqueeze import wire
from fedsqueeze.compressors import build as build_compressor
from fedsqueeze.config import ConfigError
from fedsqueeze.engine.shared import round_seed
from fedsqueeze.seeding import generator

from . import records
from .settings import FEEDBACK_ACK, FEEDBACK_RESOLVED, LAYOUT, ROUND_SEED, Layout, Settings, downlink_plan, uplink_plan

log = logging.getLogger("fedsqueeze.flower")

#: inner strategies that need every client's own update (robust rules, per-client weights)
PER_CLIENT = (FedMedian, FedTrimmedAvg, MultiKrum, Bulyan, QFedAvg)
#: inner strategies whose arrays are not tensors to compress
NOT_TENSORS = (FedXgbBagging, FedXgbCyclic)


class Compressed(Strategy):
    """Compressed uplink (and optionally downlink) around an inner strategy; see the module docstring.

    strategy: the inner strategy; uplink, feedback, rules, dense_below, randomness: as in `compress_mod`,
    which must be given the same values; downlink: spec of the broadcast model ("none": dense float32);
    seed: the seed of the round seeds and of the downlink's randomness.
    """

    def __init__(
        self,
        strategy: Strategy,
        uplink: str = "identity",
        feedback: str = "none",
        *,
        downlink: str = "none",
        rules: str = "",
        dense_below: int = 0,
        randomness: str = "independent",
        seed: int = 0,
    ) -> None:
        if not isinstance(strategy, Strategy):
            raise TypeError(f"Compressed wraps a flwr.serverapp.strategy.Strategy, got {type(strategy).__name__}")
        chain = _chain(strategy)
        if any(isinstance(s, Compressed) for s in chain):
            raise ValueError("the inner strategy is already Compressed: wrap it once")
        self.strategy = strategy
        self.settings = Settings(uplink, feedback, rules, dense_below, randomness, downlink)
        self.settings.normalised()  # ConfigError for a bad value, now
        self.seed = int(seed)
        # whether the mechanism's per-client vectors are updates (its server half is the cohort mean)
        self.per_client = fb.build(feedback, build_compressor("identity"), dim=1, num_clients=1).server(1).reweighable
        for inner in chain:
            if isinstance(inner, NOT_TENSORS):
                raise ConfigError("strategy", type(inner).__name__, "its arrays are serialised models, not tensors "
                                  "to compress")  # fmt: skip
            if isinstance(inner, PER_CLIENT) and not self.per_client:
                raise ConfigError(
                    "feedback", feedback, f"{type(inner).__name__} needs each client's own update, but the "
                    f"per-client messages of {feedback} are increments of its running memory, not updates (its "
                    "server forms one estimate for the cohort); use feedback 'none' or 'ef' with it, or an "
                    "averaging strategy (FedAvg, FedProx, FedAdam, FedYogi)", ["none", "ef"],
                )  # fmt: skip
        self.layout: Layout | None = None
        #: the model the clients of the current round start from, flat float32
        self._reference: np.ndarray | None = None
        self._downlink_bytes = 0
        self._mechanism: fb.Mechanism | None = None
        self._server: fb.ServerHalf | None = None
        #: node id -> client index of the mechanism's server half (nodes present at round 1)
        self._index: dict[int, int] = {}
        #: node id -> the last round whose reply the server half took in (sent back as the acknowledgement)
        self._accepted: dict[int, int] = {}
        #: per round: bytes, replies taken and dropped, randomness (also in the aggregated train metrics)
        self.rounds: dict[int, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"Compressed({self.strategy!r}, uplink={self.settings.uplink!r}, feedback={self.settings.feedback!r})"

    def summary(self) -> None:
        s = self.settings
        log.info("\t├──> fedsqueeze: uplink %s, feedback %s, downlink %s, rules %r, randomness %s", s.uplink,
                 s.feedback, s.downlink, s.rules, s.randomness)  # fmt: skip
        self.strategy.summary()

    # ---- train ---------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        dense = records.dense_arrays(arrays)
        layout = Layout.of(dense)
        # dtypes may change (FedAdam returns float64 arrays); the plans depend on names and shapes only
        if self.layout is not None and (layout.pairs(), layout.order) != (self.layout.pairs(), self.layout.order):
            raise ValueError("the model's arrays changed between rounds: the payload plans no longer fit")
        self.layout = layout
        x = layout.flatten(dense)
        packed: ArrayRecord | None = None
        if self.settings.downlink != "none":
            plan = downlink_plan(self.settings, layout)
            payload = plan.compress(torch.from_numpy(x.copy()), generator(self.seed, server_round, "downlink"))
            packed, data = records.pack(plan, payload, layout, arrays)
            # the model exactly as every client decodes it from these bytes
            decoded = [wire.decode(data[g.key], g.numel) for g in plan.groups]
            x = plan.decompress(decoded).numpy()
            extras = {k: a for k, a in arrays.items() if k not in layout.names}
            arrays = records.dense_record(layout, x, extras)
        self._reference = x
        messages = list(self.strategy.configure_train(server_round, arrays, config, grid))
        if self._mechanism is None:
            self._start(layout, messages, grid)
        assert self._mechanism is not None
        added: dict[str, bool | int | float | str] = {
            **self.settings.to_config_record(),
            ROUND_SEED: round_seed(self.seed, server_round),
            FEEDBACK_RESOLVED: self._mechanism.spec,
        }
        if packed is not None:
            added[LAYOUT] = layout.to_json()
        self._downlink_bytes = 0
        for msg in messages:
            content = RecordDict(dict(msg.content.items()))
            (ckey, crecord), = content.config_records.items() or [("config", ConfigRecord())]  # fmt: skip
            new_config = ConfigRecord({**dict(crecord), **added})
            if self._server is not None:
                new_config[FEEDBACK_ACK] = self._accepted.get(msg.metadata.dst_node_id, 0)
            content[ckey] = new_config
            if packed is not None:
                (akey, _), = content.array_records.items()  # fmt: skip
                content[akey] = packed
            msg.content = content
            self._downlink_bytes += sum(len(a.data) for r in content.array_records.values() for a in r.values())
        return messages

    def _start(self, layout: Layout, messages: list[Message], grid: Grid) -> None:
        """The mechanism (its theory defaults take the cohort size) and, with memory, its server half."""
        plan = uplink_plan(self.settings, layout)
        cohort = max(1, len(messages))
        shared = self.settings.randomness == "shared"
        self._mechanism = fb.build(
            self.settings.feedback, plan, dim=plan.numel, num_clients=cohort, dense=plan.dense_like(),
            shared_randomness=shared,
        )  # fmt: skip
        if not self.per_client:
            nodes = sorted(set(grid.get_node_ids()) | {m.metadata.dst_node_id for m in messages})
            self._index = {node: i for i, node in enumerate(nodes)}
            self._server = self._mechanism.server(len(nodes))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        assert self.layout is not None and self._reference is not None, "configure_train comes first"
        plan = uplink_plan(self.settings, self.layout)
        passed: list[Message] = []
        decoded: list[tuple[int, Message, str, torch.Tensor, dict]] = []
        dropped = uplink = 0
        for reply in replies:
            if reply.has_error():
                passed.append(reply)  # the inner strategy logs and counts it as a failure
                continue
            node = reply.metadata.src_node_id
            try:
                (key, record), = reply.content.array_records.items()  # fmt: skip
                vector, extras, nbytes = records.unpack(plan, record, self.layout)
                if not torch.isfinite(vector).all():
                    raise ValueError("the update has non-finite values")
                if self._server is not None and node not in self._index:
                    raise ValueError(f"{self.settings.feedback} keeps memory for the nodes of round 1 only")
            except (ValueError, wire.PayloadError) as exc:
                log.warning("fedsqueeze: round %d: reply from node %d dropped: %s", server_round, node, exc)
                dropped += 1
                continue
            uplink += nbytes
            decoded.append((node, reply, key, vector, extras))
        if self._server is not None and decoded:
            self._server.begin()
            for node, _, _, vector, _ in sorted(decoded, key=lambda t: self._index[t[0]]):
                self._server.add(self._index[node], vector)
            estimate = self._server.finish()
            self._accepted.update({node: server_round for node, *_ in decoded})
            decoded = [(node, reply, key, estimate, extras) for node, reply, key, _, extras in decoded]
        for _, reply, key, vector, extras in decoded:
            model = self._reference + vector.numpy()
            content = RecordDict(dict(reply.content.items()))
            content[key] = records.dense_record(self.layout, model, extras)
            reply.content = content
            passed.append(reply)
        arrays, metrics = self.strategy.aggregate_train(server_round, passed)
        row = {
            "uplink_bytes": uplink,
            "dense_uplink_bytes": 4 * plan.numel * len(decoded),
            "downlink_bytes": self._downlink_bytes,
            "clients_ok": len(decoded),
            "clients_dropped": dropped,
            "randomness": self.settings.randomness,
        }
        self.rounds[server_round] = row
        log.info(
            "fedsqueeze: round %d: uplink %d B (dense %d B) from %d replies, %d dropped; downlink %d B",
            server_round, uplink, row["dense_uplink_bytes"], len(decoded), dropped, self._downlink_bytes,
        )  # fmt: skip
        if metrics is not None:
            for name in ("uplink_bytes", "dense_uplink_bytes", "downlink_bytes", "clients_dropped"):
                metrics["fedsqueeze-" + name.replace("_", "-")] = row[name]
        return arrays, metrics

    # ---- evaluate: the inner strategy's own ----------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


def _chain(strategy: Strategy) -> list[Strategy]:
    """The strategy and those it wraps (Flower's DP wrappers keep theirs in `.strategy`)."""
    out = [strategy]
    while isinstance(getattr(out[-1], "strategy", None), Strategy):
        out.append(out[-1].strategy)
    return out
