"""fedsqueeze's Flower ServerApp: the round loop, Messages in and out, and the run directory.

Per round: sample `cohort-size` partitions (seeded by seed and round), send each the broadcast
payloads, wait up to `round-timeout` for replies, decode each against the layout the server
expects, aggregate the valid ones (weighted by examples or the algorithm's aggregation weight, in
partition order), evaluate, and append a metrics row (with the clients' global and personal accuracy
when an algorithm with personal models reports them). A reply that is an error, fails validation
or never comes is counted in `clients_failed` and logged with its node id; the round goes on with
the others. With fewer than `min-replies` valid replies the model is left unchanged for that
round (logged; the row still records bytes and failures). Every row is on disk when the next round
starts; an interrupted run writes summary.json with status "interrupted".

Before the first round the server asks every node for its partition id (a `query` message), so
that sampling and aggregation order depend on partitions, never on node ids: the same config and
seed give the same run on every backend.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsqueeze.algorithms.personal import summarize
from fedsqueeze.client.app import payload_record, payloads_from
from fedsqueeze.config import RESOLVED_TABLE, Config
from fedsqueeze.tracking import RunDir, Tracker

from .coordinator import Coordinator, InvalidReply, Reply, mean, weighted_mean

log = logging.getLogger("fedsqueeze.server")

#: the global model at the end of the run (a state_dict for torch.load), written next to metrics.jsonl
MODEL_FILE = "model.pt"

#: how often the server looks for nodes that have not connected yet (deployment)
NODE_POLL_S = 1.0
#: the least time the partition query before round 1 waits for answers
DISCOVERY_TIMEOUT_S = 60.0

#: per-client metrics that rows summarise over clients (see fedsqueeze.algorithms.personal)
PERSONAL_METRICS = ("global_accuracy", "personal_accuracy")

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = Config.from_run_config(context.run_config)
    run_server(grid, cfg, observer=getattr(grid, "observer", None))


Observer = Callable[[str, dict[str, Any]], None]


def run_server(grid: Grid, cfg: Config, observer: Observer | None = None) -> dict[str, Any]:
    """Run every round of `cfg` on `grid`; returns the summary. `observer(event, data)` sees progress."""
    started_at = time.time()
    coord = Coordinator(cfg)
    # [resolved]: what the run derived at start (theory stepsize and constants, feedback parameters)
    run_dir = RunDir.create(cfg.out_dir, cfg.name, {**cfg.to_run_config(), RESOLVED_TABLE: coord.plan.resolved})
    tracker = Tracker(run_dir, convex=bool(coord.task.is_convex), target_accuracy=cfg.target_accuracy or None)
    notify = observer or (lambda event, data: None)
    notify("start", {"run_dir": str(run_dir.path), "rounds": cfg.rounds, "params": coord.uplink.numel})
    # Flower's own logger: this line reaches `flwr run --stream`, whose ServerApp runs in another directory
    logging.getLogger("flwr").info("fedsqueeze: writing the run to %s", Path(run_dir.path).resolve())
    log.info(
        "run %s: %d rounds, %d parameters, uplink %s",
        run_dir.path,
        cfg.rounds,
        coord.uplink.numel,
        coord.uplink.describe(),
    )
    status = "interrupted"
    setup_s = None
    try:
        nodes: dict[int, int] = {}
        asked: set[int] = set()
        discover(grid, cfg, nodes, asked, wait=True)
        setup_s = time.time() - started_at
        for server_round in range(1, cfg.rounds + 1):
            if server_round > 1 and len(nodes) < cfg.num_clients:
                discover(grid, cfg, nodes, asked)
            row = run_round(grid, cfg, coord, nodes, server_round)
            row = tracker.record(server_round, **row)
            notify("round", row)
        status = "completed"
    finally:
        extra: dict[str, Any] = {
            "run_dir": str(Path(run_dir.path)),
            "task": _plain(coord.task.info),
            # when the ServerApp started (epoch seconds) and how long model set-up and node discovery took
            "started_at": started_at,
            "setup_s": setup_s,
            "resolved": coord.plan.resolved,
        }
        if coord.task.is_convex and coord.task.objective is not None:
            optimum = coord.task.optimum  # computed once (cached by the task), kept with the run
            extra["optimum"] = {"f_star": optimum.f, "grad_norm": optimum.grad_norm, "iterations": optimum.iterations}
            (Path(run_dir.path) / "optimum.json").write_text(json.dumps(optimum.to_dict()) + "\n")
        coord.save_model(Path(run_dir.path) / MODEL_FILE)
        summary = tracker.finish(status=status, **extra)
        notify("finish", summary)
    return summary


def discover(grid: Grid, cfg: Config, nodes: dict[int, int], asked: set[int], *, wait: bool = False) -> None:
    """Fill `nodes` (partition id -> node id) from the nodes that answer a partition query.

    wait: first wait up to round-timeout for every node to connect (the call before round 1).
    Nodes that answered once (`asked`) are not asked again; the others (silent, or an error reply),
    and nodes that connect later, are asked before every round while a partition has no node: they
    miss only the rounds before they answer.
    """
    deadline = time.monotonic() + cfg.round_timeout
    node_ids = sorted(grid.get_node_ids())
    while wait and len(node_ids) < cfg.num_clients and time.monotonic() < deadline:
        log.info("waiting for nodes: %d of %d connected", len(node_ids), cfg.num_clients)
        time.sleep(NODE_POLL_S)
        node_ids = sorted(grid.get_node_ids())
    msgs = [
        Message(RecordDict(), dst_node_id=n, message_type="query", group_id="discover")
        for n in node_ids
        if n not in asked
    ]
    # before round 1 the query waits at least DISCOVERY_TIMEOUT_S: backends start clients on their
    # first message (Ray's workers take seconds), and this is no training round to keep short
    timeout = max(cfg.round_timeout, DISCOVERY_TIMEOUT_S) if wait else cfg.round_timeout
    replies = grid.send_and_receive(msgs, timeout=timeout) if msgs else []
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
    silent = set(sent.values())
    for reply in replies:
        node = sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        silent.discard(node)
        if reply.has_error():
            log.warning("node %d did not answer the partition query: %s", node, reply.error.reason)
            continue
        asked.add(node)
        try:
            pid = int(reply.content["info"]["partition-id"])
        except (KeyError, TypeError, ValueError):
            log.warning("node %d answered the partition query without a partition-id", node)
            continue
        if not 0 <= pid < cfg.num_clients:
            log.warning("node %d holds partition %d, outside 0..%d: ignored", node, pid, cfg.num_clients - 1)
        elif pid in nodes:
            log.warning("nodes %d and %d both hold partition %d: using %d", nodes[pid], node, pid, nodes[pid])
        else:
            nodes[pid] = node
    if silent:
        log.warning(
            "node(s) %s did not answer the partition query within %g s: asked again next round", sorted(silent), timeout
        )
    missing = sorted(set(range(cfg.num_clients)) - set(nodes))
    if missing:
        log.warning("no node holds partition(s) %s yet: they count as failed when sampled", missing)


def run_round(grid: Grid, cfg: Config, coord: Coordinator, nodes: dict[int, int], server_round: int) -> dict[str, Any]:
    """One round; returns the metrics of its row (without the cumulative columns the tracker adds)."""
    t0 = time.perf_counter()
    chosen = coord.sample(range(cfg.num_clients), server_round)
    outbox = coord.broadcast(server_round, chosen)
    failures: list[str] = []
    msgs, sent = [], {}
    for pid in chosen:
        node = nodes.get(pid)
        if node is None:
            failures.append(f"partition {pid}: no node holds it")
            continue
        msg = Message(
            RecordDict({"broadcast": payload_record(outbox.payloads[pid]), "config": ConfigRecord(outbox.config[pid])}),
            dst_node_id=node,
            message_type="train",
            group_id=str(server_round),
        )
        msgs.append((pid, node, msg))
    replies = list(grid.send_and_receive([m for _, _, m in msgs], timeout=cfg.round_timeout))
    sent = {m.metadata.message_id: (pid, node) for pid, node, m in msgs}
    downlink_bytes = outbox.bytes_to([pid for pid, _, _ in msgs])

    ok: list[Reply] = []
    uplink_bytes = 0
    answered: set[str] = set()
    for reply in replies:
        key = reply.metadata.reply_to_message_id
        if key not in sent or key in answered:
            log.warning("round %d: unexpected reply from node %d ignored", server_round, reply.metadata.src_node_id)
            continue
        answered.add(key)
        pid, node = sent[key]
        if reply.has_error():
            failures.append(f"node {node} (partition {pid}): error reply {reply.error.code}: {reply.error.reason}")
            continue
        try:
            record = reply.content["update"]
            uplink_bytes += sum(len(a.data) for a in record.values())
            decoded = coord.decode(payloads_from(record), dict(reply.content["metrics"]), pid, node)
        except (InvalidReply, ValueError, KeyError, TypeError) as exc:
            failures.append(f"node {node} (partition {pid}): invalid reply: {exc}")
            continue
        ok.append(decoded)
        coord.acknowledge(pid)
    for key, (pid, node) in sent.items():
        if key not in answered:
            failures.append(f"node {node} (partition {pid}): no reply within round-timeout {cfg.round_timeout:g} s")
    for failure in failures:
        log.warning("round %d: %s", server_round, failure)

    applied = len(ok) >= cfg.min_replies
    coord.apply(ok, server_round, step=applied)
    if not applied:
        log.warning(
            "round %d skipped: %d valid replies, min-replies is %d; the model is unchanged",
            server_round,
            len(ok),
            cfg.min_replies,
        )
    evaluation = coord.evaluate()
    weights = [float(r.num_examples) for r in ok]
    row: dict[str, Any] = {
        "clients_sampled": len(chosen),
        "clients_ok": len(ok),
        "clients_failed": len(chosen) - len(ok),
        "uplink_bytes": uplink_bytes,
        "downlink_bytes": downlink_bytes,
        "train_loss": weighted_mean([r.train_loss for r in ok], weights) if ok else None,
        "compression_error": mean([r.compression_error for r in ok]) if ok else None,
        **evaluation,
        "wall_s": time.perf_counter() - t0,
        "dense_uplink_bytes": 4 * coord.uplink.numel * len(ok),
        "applied": applied,
    }
    # algorithms with personal models (flix, scafflix, lowrank) report each client's accuracy with the
    # global and with its personal model: mean, std, min and max over the valid replies
    reports = [{k: v for k, v in r.metrics.items() if k in PERSONAL_METRICS} for r in ok]
    row.update(summarize(reports))
    return row


def _plain(value: Any) -> Any:
    """Task info as JSON-friendly data."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
