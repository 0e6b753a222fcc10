"""The one round loop, between a `Server` and a transport that carries a round's messages.

    for round in 1..rounds:
        transport.prepare(round)                       # deployment: find nodes that connected late
        cohort = server.select(round)                  # the algorithm's sampling hook
        outbox = server.broadcast(round, cohort)       # per-client config and payload bytes
        arrivals = transport.exchange(round, outbox)   # replies (payloads, metrics) or failures
        server.begin(); server.take(reply) for each valid reply, in partition order; server.finish
                                                       # (begin and take on the lane: engine/lane.py)
        row = bytes, failures, losses, evaluation,     # -> tracker (metrics.jsonl), observer
              cohort, inner_round, total_cost          # (algorithm.position; local/global-round-cost)

With `secagg` set a round is four exchanges instead (`fedsqueeze.engine.secure`; transports then also
have `stage`). Transports: `fedsqueeze.server.app` carries messages through a Flower Grid (the in-process backend,
Flower's simulation engine, a deployment); `LocalTransport` calls the client half directly, for
library use and tests without Flower. Replies are taken in partition order whatever order they
arrived in, so the result never depends on arrival order.

A reply that is an error, fails validation or never comes is counted in `clients_failed` and logged;
the round goes on with the others. With fewer than `min-replies` valid replies the model is left
unchanged for that round (logged; the row still records bytes and failures). Every row is on disk
when the next round starts; an interrupted run writes summary.json with status "interrupted".
After every row the server's checkpoint and model.pt follow (`checkpoint`), and `resume` goes on
from them after a crash (fedsqueeze.engine.checkpoint).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from fedsqueeze.algorithms.personal import summarize
from fedsqueeze.config import RESOLVED_TABLE, Config
from fedsqueeze.tracking import RunDir, Tracker

from . import checkpoint
from .client import client_half
from .lane import Lane
from .secure import LocalStages, StageMessage, StageReply, secure_round
from .server import InvalidReply, Outbox, RejectedReply, Reply, Server, mean, weighted_mean, write_model

log = logging.getLogger("fedsqueeze.server")

#: the global model at the end of the run (a state_dict for torch.load), written next to metrics.jsonl
MODEL_FILE = "model.pt"

#: per-client metrics that rows summarise over clients (see fedsqueeze.algorithms.personal)
PERSONAL_METRICS = ("global_accuracy", "personal_accuracy")

Observer = Callable[[str, dict[str, Any]], None]


@dataclass
class Arrival:
    """One sampled partition's outcome: its reply (payloads and metrics), or why there is none."""

    partition_id: int
    node_id: int
    payloads: dict[str, bytes] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    #: why the reply is unusable (error reply, no reply, unreadable record); None for a reply to decode
    failure: str | None = None
    #: bytes of the reply's payloads as they arrived (counted even when the reply is then rejected)
    uplink_bytes: int = 0


@dataclass
class Exchange:
    #: every sampled partition's outcome, once each, in any order (an iterator may yield them as they
    #: come: the server takes each in as soon as those of all lower partitions are in)
    arrivals: Iterable[Arrival]
    #: bytes of the broadcasts that were sent
    downlink_bytes: int


class Transport(Protocol):
    def prepare(self, server_round: int) -> None:
        """Before a round: e.g. ask nodes that have not answered yet which partition they hold."""

    def exchange(self, server_round: int, outbox: Outbox, partition_ids: Sequence[int]) -> Exchange:
        """Send each sampled partition its broadcast and config; return what came back."""

    # optional: `flush()`, wait for what the clients keep between rounds to be written, where they
    # write it behind their replies (the in-process backend); called before every checkpoint


def run(
    cfg: Config, transport: Transport, observer: Observer | None = None, server: Server | None = None
) -> dict[str, Any]:
    """Run every round of `cfg` through `transport`; returns the summary. `observer(event, data)` sees progress.

    With `checkpoint` on, the server's checkpoint and model.pt are written after every round; with
    `resume` set, the run goes on from its directory's checkpoint (fedsqueeze.engine.checkpoint).
    """
    started_at = time.time()
    server = server or Server(cfg)
    if cfg.resume:
        run_dir = RunDir(cfg.resume)
    else:
        # [resolved]: what the run derived at start (theory stepsize and constants, feedback parameters)
        config = {**cfg.to_run_config(), RESOLVED_TABLE: server.plan.resolved}
        run_dir = RunDir.create(cfg.out_dir, cfg.name, config)
    with checkpoint.locked(run_dir), Lane() as lane:
        done = 0
        if cfg.resume:
            done = checkpoint.check(cfg)
            checkpoint.rewind(run_dir, done)
            server.load_state_dict(checkpoint.load(run_dir))
            log.info("run %s: resumed after round %d", run_dir.path, done)
        elif cfg.checkpoint:
            _checkpoint(server, run_dir, 0, lane, transport)
        return _rounds(cfg, transport, server, run_dir, done, started_at, observer, lane)


def _rounds(
    cfg: Config,
    transport: Transport,
    server: Server,
    run_dir: RunDir,
    done: int,
    started_at: float,
    observer: Observer | None,
    lane: Lane,
) -> dict[str, Any]:
    """Rounds done+1..rounds, then the summary (the server's own work on `lane`: see fedsqueeze.engine.lane)."""
    convex = bool(server.task.is_convex)
    tracker = Tracker(run_dir, convex=convex, target_accuracy=cfg.target_accuracy or None, resume=done > 0)
    notify = observer or (lambda event, data: None)
    notify("start", {"run_dir": str(run_dir.path), "rounds": cfg.rounds, "params": server.uplink.numel})
    # Flower's own logger: this line reaches `flwr run --stream`, whose ServerApp runs in another directory
    logging.getLogger("flwr").info("fedsqueeze: writing the run to %s", Path(run_dir.path).resolve())
    log.info("run %s: %d rounds, %d parameters, uplink %s", run_dir.path, cfg.rounds, server.uplink.numel,
             server.uplink.describe())  # fmt: skip
    status = "interrupted"
    setup_s = None
    try:
        transport.prepare(0)
        setup_s = time.time() - started_at
        for server_round in range(done + 1, cfg.rounds + 1):
            if server_round > done + 1:
                transport.prepare(server_round)
            row = run_round(server, transport, server_round, lane)
            row = tracker.record(server_round, **row)
            if cfg.checkpoint:  # after the row: a checkpoint never runs ahead of metrics.jsonl
                _checkpoint(server, run_dir, server_round, lane, transport)
            notify("round", row)
        lane.drain()  # the last checkpoint is on disk before the run says it completed
        status = "completed"
    finally:
        if status != "completed":  # let a checkpoint being written end (an error there is already on its way)
            _quietly(lane.drain)
        extra: dict[str, Any] = {
            "run_dir": str(Path(run_dir.path)),
            "task": _plain(server.task.info),
            # when the run started (epoch seconds) and how long model set-up and node discovery took
            "started_at": started_at,
            "setup_s": setup_s,
            "resolved": server.plan.resolved,
        }
        if done:
            extra["resumed_after_round"] = done
        if server.task.is_convex and server.task.objective is not None:
            optimum = server.task.optimum  # computed once (cached by the task), kept with the run
            extra["optimum"] = {"f_star": optimum.f, "grad_norm": optimum.grad_norm, "iterations": optimum.iterations}
            (Path(run_dir.path) / "optimum.json").write_text(json.dumps(optimum.to_dict()) + "\n")
        if not cfg.checkpoint:  # (with checkpoints, model.pt is the last complete round's already)
            server.save_model(Path(run_dir.path) / MODEL_FILE)
        summary = tracker.finish(status=status, **extra)
        notify("finish", summary)
    return summary


def _checkpoint(server: Server, run_dir: RunDir, server_round: int, lane: Lane, transport: Transport) -> None:
    """model.pt, then the checkpoint: a checkpoint of round t always has model.pt of round t or later.

    Both are taken now and written on the lane while the next round's first client trains: the
    server's state_dict is a snapshot (x is replaced by each server step, never changed in place,
    and the mechanism and downlink halves hand over copies), and the next round's takes queue
    behind the write. The write first waits for the clients' state files of the round where the
    transport's clients write them behind their replies (`flush`), so that a resumed run finds the
    state every client had after the checkpoint's round."""
    model, state = server.model_state(), server.state_dict(server_round)
    lane.submit(_write_checkpoint, model, state, run_dir, getattr(transport, "flush", None))


def _write_checkpoint(
    model: dict[str, torch.Tensor], state: dict[str, Any], run_dir: RunDir, flush: Callable[[], None] | None
) -> None:
    if flush is not None:
        flush()
    write_model(model, Path(run_dir.path) / MODEL_FILE)
    checkpoint.save(state, run_dir)


def _quietly(fn: Callable[[], None]) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001 - only on the way out of a run that already failed
        log.exception("while stopping the run")


def run_round(server: Server, transport: Transport, server_round: int, lane: Lane | None = None) -> dict[str, Any]:
    """One round; returns the metrics of its row (without the cumulative columns the tracker adds).

    The replies are taken in on `lane` (a round of its own without one) while the next ones come."""
    if server.cfg.secagg != "none":  # several exchanges per round (fedsqueeze.engine.secure)
        return secure_round(server, transport, server_round)  # type: ignore[arg-type]
    if lane is None:
        with Lane() as own:
            return run_round(server, transport, server_round, own)
    cfg = server.cfg
    start = server.open_round(server_round)
    chosen = start.chosen
    exchange = transport.exchange(server_round, start.outbox, chosen)

    # each arrival's outcome, in partition order: a failure now, or the lane's take of its reply
    outcomes: list[str | Future[Reply | Failure]] = []
    uplink_bytes = 0
    lane.submit(server.begin, server_round)
    for arrival in in_partition_order(exchange.arrivals, chosen):
        uplink_bytes += arrival.uplink_bytes
        if arrival.failure is not None or arrival.payloads is None:
            who = f"node {arrival.node_id} (partition {arrival.partition_id})"
            outcomes.append(arrival.failure if arrival.failure is not None else f"{who}: no payloads")
        else:
            outcomes.append(lane.submit(_take, server, arrival))
    lane.drain()
    failures: list[str] = []
    ok: list[Reply] = []
    rejected = 0
    for outcome in outcomes:
        result = outcome if isinstance(outcome, str) else outcome.result()
        if isinstance(result, Reply):
            ok.append(result)
        elif isinstance(result, Failure):
            failures.append(result.why)
            rejected += result.rejected
        else:
            failures.append(result)
    for failure in failures:
        log.warning("round %d: %s", server_round, failure)

    applied = len(ok) >= cfg.min_replies
    server.finish(server_round, step=applied)
    if not applied:
        log.warning(
            "round %d skipped: %d valid replies, min-replies is %d; the model is unchanged",
            server_round,
            len(ok),
            cfg.min_replies,
        )
    weights = [float(r.num_examples) for r in ok]
    row = server.row(
        start,
        ok=len(ok),
        applied=applied,
        # of the failed, the replies a defence turned away (norm bound, example cap, overflow)
        clients_rejected=rejected,
        uplink_bytes=uplink_bytes,
        downlink_bytes=exchange.downlink_bytes,
        train_loss=weighted_mean([r.train_loss for r in ok], weights) if ok else None,
        compression_error=mean([r.compression_error for r in ok]) if ok else None,
    )
    # algorithms with personal models (flix, scafflix, lowrank) report each client's accuracy with the
    # global and with its personal model: mean, std, min and max over the valid replies
    reports = [{k: v for k, v in r.metrics.items() if k in PERSONAL_METRICS} for r in ok]
    row.update(summarize(reports))
    return row


@dataclass
class Failure:
    """Why a reply was not taken in; `rejected`: a defence turned it away (clients_rejected)."""

    why: str
    rejected: bool = False


def _take(server: Server, arrival: Arrival) -> Reply | Failure:
    """One reply into the server's sums (on the lane): the Reply, or why it failed."""
    who = f"node {arrival.node_id} (partition {arrival.partition_id})"
    assert arrival.payloads is not None
    try:
        return server.take(arrival.payloads, arrival.metrics, arrival.partition_id, arrival.node_id)
    except RejectedReply as exc:
        return Failure(f"{who}: rejected: {exc}", rejected=True)
    except (InvalidReply, ValueError, KeyError, TypeError) as exc:
        return Failure(f"{who}: invalid reply: {exc}")


def in_partition_order(arrivals: Iterable[Arrival], order: Sequence[int]) -> Iterator[Arrival]:
    """The arrivals in `order`, each as soon as every earlier one is in: replies that come in order
    (the in-process backend) pass straight through, others wait only for the ones before them."""
    waiting: dict[int, Arrival] = {}
    position = 0
    for arrival in arrivals:
        waiting[arrival.partition_id] = arrival
        while position < len(order) and order[position] in waiting:
            yield waiting.pop(order[position])
            position += 1
    yield from (waiting[pid] for pid in sorted(waiting))  # only if an arrival was never expected


class LocalTransport:
    """Every client of a run called directly in this process, each with its own state dict (no Flower).

    `states[pid]` is client pid's persistent memory; `lost` replies (partition ids, per round) are
    computed by the client but never reach the server, as a reply lost on the network.
    """

    def __init__(
        self,
        cfg: Config,
        lost: Callable[[int, int], bool] | None = None,
        dropped: Callable[[int, str, int], bool] | None = None,
    ) -> None:
        self.client = client_half(cfg)
        self.states: dict[int, dict[str, torch.Tensor]] = {}
        self.lost = lost or (lambda server_round, pid: False)
        self.calls: list[tuple[int, int]] = []
        #: secure rounds' stages; `dropped(round, stage, pid)` loses that stage's reply
        self.stages = LocalStages(self.client, self.states, dropped)

    def stage(self, server_round: int, action: str, messages: Mapping[int, StageMessage]) -> list[StageReply]:
        return self.stages.stage(server_round, action, messages)

    def prepare(self, server_round: int) -> None:
        pass

    def exchange(self, server_round: int, outbox: Outbox, partition_ids: Sequence[int]) -> Exchange:
        return Exchange(self._calls(server_round, outbox, partition_ids), outbox.bytes_to(partition_ids))

    def _calls(self, server_round: int, outbox: Outbox, partition_ids: Sequence[int]) -> Iterator[Arrival]:
        for pid in partition_ids:
            state = self.states.setdefault(pid, {})
            result = self.client.train(pid, outbox.payloads[pid], outbox.config[pid], state)
            self.calls.append((server_round, pid))
            if self.lost(server_round, pid):
                yield Arrival(pid, pid, failure=f"partition {pid}: reply lost")
                continue
            nbytes = sum(len(b) for b in result.payloads.values())
            yield Arrival(pid, pid, result.payloads, result.report(pid), uplink_bytes=nbytes)


def _plain(value: Any) -> Any:
    """Task info as JSON-friendly data."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
