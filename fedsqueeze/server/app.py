"""fedsqueeze's Flower ServerApp: the engine's round loop over a Flower Grid.

`FlowerTransport` turns a round's outbox into Messages (`fedsqueeze.engine.protocol` is the schema),
sends them with `grid.send_and_receive`, and turns the replies (or their absence) into arrivals;
everything else (sampling, configs, decoding, aggregation, rows) is `fedsqueeze.engine`.

Before the first round the server asks every node for its partition id (a `query` message), so
that sampling and aggregation order depend on partitions, never on node ids: the same config and
seed give the same run on every backend. Where the nodes report the federation's num-partitions
(Flower's simulation engine does), num-clients follows it (`follow_federation`), so `flwr run .`
trains every partition whatever the size of the federation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedsqueeze.client.app import payload_record, payloads_from
from fedsqueeze.config import Config, ConfigError
from fedsqueeze.engine import protocol, secure
from fedsqueeze.engine.loop import MODEL_FILE, Arrival, Exchange, Observer, run
from fedsqueeze.engine.server import Outbox

log = logging.getLogger("fedsqueeze.server")
flwr_log = logging.getLogger("flwr")

__all__ = ["MODEL_FILE", "FlowerTransport", "app", "follow_federation", "run_server"]

#: how often the server looks for nodes that have not connected yet (deployment)
NODE_POLL_S = 1.0
#: the least time the partition query before round 1 waits for answers
DISCOVERY_TIMEOUT_S = 60.0

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = follow_federation(grid, Config.from_run_config(context.run_config))
    summary = run_server(grid, cfg, observer=getattr(grid, "observer", None))
    # Flower's own logger reaches `flwr run --stream` and `flwr log`
    run_dir = Path(summary.get("run_dir", cfg.run_dir())).resolve()
    flwr_log.info("fedsqueeze: run %s: %s", summary.get("status", "?"), run_dir)


def follow_federation(grid: Grid, cfg: Config) -> Config:
    """The config with num-clients = the federation's num-partitions, when the nodes report one.

    Flower's simulation engine gives every simulated SuperNode `partition-id` and `num-partitions`
    (2 nodes by default, `--federation-config "num-supernodes=N"` for N); a deployment's node configs may
    set them too. The nodes connected now are asked once (after waiting up to round-timeout for the
    first to connect): if they report num-partitions N, every partition 0..N-1 takes part, and a config
    that says otherwise is logged and follows N. Nodes that disagree about N are a ConfigError at once;
    nodes without num-partitions leave num-clients as configured.
    """
    deadline = time.monotonic() + cfg.round_timeout
    node_ids = sorted(grid.get_node_ids())
    while not node_ids and time.monotonic() < deadline:
        time.sleep(NODE_POLL_S)
        node_ids = sorted(grid.get_node_ids())
    msgs = [Message(RecordDict(), dst_node_id=n, message_type=protocol.QUERY, group_id="federation") for n in node_ids]
    replies = grid.send_and_receive(msgs, timeout=max(cfg.round_timeout, DISCOVERY_TIMEOUT_S)) if msgs else []
    counts: dict[int, int] = {}
    for reply in replies:
        if reply.has_error():
            continue
        value = reply.content[protocol.INFO].get(protocol.NUM_PARTITIONS) if protocol.INFO in reply.content else None
        if isinstance(value, int) and not isinstance(value, bool):
            counts[reply.metadata.src_node_id] = value
    sizes = sorted(set(counts.values()))
    if not sizes:
        return cfg
    if len(sizes) > 1:
        raise ConfigError("num-clients", cfg.num_clients, f"the nodes disagree about num-partitions ({sizes}): "
                          "each node's node config must give the same num-partitions")  # fmt: skip
    (size,) = sizes
    if size == cfg.num_clients:
        flwr_log.info("fedsqueeze: %d partitions, one per node of the federation (num-clients)", size)
        return cfg
    flwr_log.warning(
        "fedsqueeze: the federation's nodes hold %d partitions (num-partitions): num-clients = %d, not the %d of "
        "the run config; for %d clients on Flower's simulation engine run with --federation-config "
        '"num-supernodes=%d"', size, size, cfg.num_clients, cfg.num_clients, cfg.num_clients,
    )  # fmt: skip
    return cfg.replace(num_clients=size)


def run_server(grid: Grid, cfg: Config, observer: Observer | None = None) -> dict[str, Any]:
    """Run every round of `cfg` on `grid`; returns the summary. `observer(event, data)` sees progress."""
    return run(cfg, FlowerTransport(grid, cfg), observer)


class FlowerTransport:
    """A round's messages through a Flower Grid; nodes are found by asking for their partition."""

    def __init__(self, grid: Grid, cfg: Config) -> None:
        self.grid = grid
        self.cfg = cfg
        #: partition id -> node id
        self.nodes: dict[int, int] = {}
        #: nodes that answered the partition query
        self.asked: set[int] = set()

    def prepare(self, server_round: int) -> None:
        if server_round == 0:
            discover(self.grid, self.cfg, self.nodes, self.asked, wait=True)
        elif len(self.nodes) < self.cfg.num_clients:
            discover(self.grid, self.cfg, self.nodes, self.asked)

    def flush(self) -> None:
        """Wait for what the clients keep between rounds to be written, where the grid runs them in this
        process and writes it behind their replies (the in-process backend); nothing to wait for elsewhere."""
        flush = getattr(self.grid, "flush", None)
        if flush is not None:
            flush()

    def exchange(self, server_round: int, outbox: Outbox, partition_ids: Sequence[int]) -> Exchange:
        msgs, missing = [], []
        for pid in partition_ids:
            node = self.nodes.get(pid)
            if node is None:
                missing.append(Arrival(pid, -1, failure=f"partition {pid}: no node holds it"))
                continue
            content = RecordDict(
                {
                    protocol.BROADCAST: payload_record(outbox.payloads[pid]),
                    protocol.CONFIG: ConfigRecord(outbox.config[pid]),
                }
            )
            msg = Message(content, dst_node_id=node, message_type=protocol.TRAIN, group_id=str(server_round))
            msgs.append((pid, node, msg))
        downlink = outbox.bytes_to([pid for pid, _, _ in msgs])
        return Exchange(self._arrivals(server_round, msgs, missing), downlink)

    def stage(
        self, server_round: int, action: str, messages: Mapping[int, secure.StageMessage]
    ) -> list[secure.StageReply]:
        """One stage of a secure round: `query.<action>` messages (`train.<action>` for the masked
        upload, which carries the broadcast and the training config), one reply or failure each."""
        category = protocol.TRAIN if action == secure.MASKED else protocol.QUERY
        out, msgs = [], {}
        for pid, message in messages.items():
            node = self.nodes.get(pid)
            if node is None:
                out.append(secure.StageReply(pid, failure="no node holds it"))
                continue
            content = RecordDict({secure.RECORD: ConfigRecord(message.record)})  # type: ignore[arg-type]
            if message.payloads:
                content[protocol.BROADCAST] = payload_record(message.payloads)
            if message.config:
                content[protocol.CONFIG] = ConfigRecord(message.config)  # type: ignore[arg-type]
            msg = Message(content, dst_node_id=node, message_type=f"{category}.{action}", group_id=str(server_round))
            msgs[pid] = msg
        replies = self.grid.send_and_receive(list(msgs.values()), timeout=self.cfg.round_timeout) if msgs else []
        sent = {m.metadata.message_id: pid for pid, m in msgs.items()}
        answered = set()
        for reply in replies:
            pid = sent.get(reply.metadata.reply_to_message_id)
            if pid is None or pid in answered:
                continue
            answered.add(pid)
            if reply.has_error():
                out.append(secure.StageReply(pid, failure=f"error reply: {reply.error.reason}"))
                continue
            try:
                record = {k: v for k, v in reply.content[secure.RECORD].items() if isinstance(v, bytes)}
            except KeyError:
                out.append(secure.StageReply(pid, failure="a reply without its secagg record"))
                continue
            out.append(secure.StageReply(pid, record, uplink_bytes=secure.record_bytes(record)))
        timeout = self.cfg.round_timeout
        out.extend(secure.StageReply(p, failure=f"no reply within {timeout:g} s") for p in msgs if p not in answered)
        return out

    def _arrivals(
        self, server_round: int, msgs: list[tuple[int, int, Message]], missing: list[Arrival]
    ) -> Iterator[Arrival]:
        """The round's outcomes as they come: a grid that streams replies (the in-process one) hands
        each over as its call ends, so the server holds one reply at a time, not the cohort's."""
        yield from missing
        stream = getattr(self.grid, "stream", None) or self.grid.send_and_receive
        replies = stream([m for _, _, m in msgs], timeout=self.cfg.round_timeout)
        sent: dict[str, tuple[int, int]] = {}
        answered: set[str] = set()
        for reply in replies:
            key = reply.metadata.reply_to_message_id
            if key not in sent:  # message ids are given as the messages are sent
                sent = {m.metadata.message_id: (pid, node) for pid, node, m in msgs}
            if key not in sent or key in answered:
                log.warning("round %d: unexpected reply from node %d ignored", server_round, reply.metadata.src_node_id)
                continue
            answered.add(key)
            pid, node = sent[key]
            yield arrival_of(reply, pid, node)
        sent = {m.metadata.message_id: (pid, node) for pid, node, m in msgs}
        for key, (pid, node) in sent.items():
            if key not in answered:
                why = f"node {node} (partition {pid}): no reply within round-timeout {self.cfg.round_timeout:g} s"
                yield Arrival(pid, node, failure=why)


def arrival_of(reply: Message, pid: int, node: int) -> Arrival:
    """A reply Message as the engine's Arrival (a failure for error replies and unreadable records)."""
    who = f"node {node} (partition {pid})"
    if reply.has_error():
        return Arrival(pid, node, failure=f"{who}: error reply {reply.error.code}: {reply.error.reason}")
    nbytes = 0
    try:
        record = reply.content[protocol.UPDATE]
        nbytes = sum(len(a.data) for a in record.values())
        payloads = payloads_from(record)
        metrics = dict(reply.content[protocol.METRICS])
    except (ValueError, KeyError, TypeError) as exc:
        return Arrival(pid, node, failure=f"{who}: invalid reply: {exc}", uplink_bytes=nbytes)
    return Arrival(pid, node, payloads, metrics, uplink_bytes=nbytes)


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
        Message(RecordDict(), dst_node_id=n, message_type=protocol.QUERY, group_id="discover")
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
            pid = int(reply.content[protocol.INFO][protocol.PARTITION_ID])
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
