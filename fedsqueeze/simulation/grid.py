"""The in-process backend: a Flower `Grid` that calls the ClientApp directly.

`InProcessGrid` gives a real ServerApp main function what Flower's runtime gives it (node ids,
messages with ids, replies or error replies) and runs the real ClientApp for each message in the
same process, with one persistent `Context` per node, as Flower's simulation engine keeps them:
`node_config` holds `partition-id` and `num-partitions`, `state` survives across rounds.

What it keeps from Flower's engine:
- every message is delivered as a copy, and the client works on a copy of its node's Context that
  replaces the stored one only when the call succeeds (as the Ray backend, which gets the Context
  back from the actor only then);
- an exception in the ClientApp becomes an error reply with `ErrorCode.CLIENT_APP_RAISED_EXCEPTION`
  (reason `"<class ...>:<'message'>"`), logged with the node id;
- `send_and_receive(timeout=t)`: a reply arrives only if its call finished within t seconds. Calls run
  one after another (deterministic) on one worker thread, so each call gets the whole budget, as if
  clients ran in parallel (a round then takes at most n * t here). A call still running at its
  deadline is abandoned with its thread (a new worker takes the next calls); its node takes no
  message until that call ends, and its late result is dropped.

Node ids are pseudo-random 63-bit integers drawn from the seed (Flower's are random too), so nothing
can rely on node id == partition id; they are the same for the same seed.
"""

from __future__ import annotations

import copy
import importlib
import logging
import queue
import random
import signal
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import NUM_PARTITIONS_KEY, PARTITION_ID_KEY, SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.date import now
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedsqueeze.deploy import state as client_state

log = logging.getLogger(__name__)

#: on Ctrl-C, how long to wait for the ClientApp call in flight before the interrupt goes on
INTERRUPT_GRACE_S = 30.0

ClientAppLike = ClientApp | Callable[[], ClientApp] | str
UserConfig = dict[str, bool | float | int | str]


@dataclass
class _Node:
    node_id: int
    context: Context
    busy: _Worker | None = None  # the worker of an abandoned call that has not ended yet


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process.

    client_app: a ClientApp, a function returning one, or a "module:attribute" reference.
    num_nodes: nodes (partition ids 0..num_nodes-1, unless `node_configs` says otherwise).
    run_config: the run_config every node's Context carries.
    node_configs: optional per-node node_config (defaults: partition-id, num-partitions).
    read_ahead: optional `read_ahead(message, context)`, called with the next message of a batch and
    its node's Context while the call before it runs (fedsqueeze.client.app.read_ahead starts reading
    the state file that the next call will load); a hint, which must not change what a call does.
    """

    def __init__(
        self,
        client_app: ClientAppLike,
        num_nodes: int,
        run_config: Mapping[str, bool | float | int | str] | None = None,
        *,
        node_configs: Iterable[Mapping[str, bool | float | int | str]] | None = None,
        run_id: int = 1,
        seed: int = 0,
        observer: Callable[[str, dict[str, Any]], None] | None = None,
        client_threads: int | None = None,
        read_ahead: Callable[[Message, Context], None] | None = None,
    ) -> None:
        if num_nodes < 1:
            raise ValueError(f"num_nodes must be at least 1, got {num_nodes}")
        self._client_app = _load_client_app(client_app)
        self._run = Run.create_empty(run_id)
        self._run.override_config = dict(run_config or {})
        configs = list(node_configs) if node_configs is not None else None
        if configs is not None and len(configs) != num_nodes:
            raise ValueError(f"{len(configs)} node configs for {num_nodes} nodes")
        rng = random.Random(f"fedsqueeze-node-ids-{seed}")
        self._nodes: dict[int, _Node] = {}
        while len(self._nodes) < num_nodes:
            node_id = rng.getrandbits(63)
            if node_id in self._nodes or node_id == SUPERLINK_NODE_ID:
                continue
            i = len(self._nodes)
            node_config: UserConfig = (
                dict(configs[i]) if configs is not None else {PARTITION_ID_KEY: i, NUM_PARTITIONS_KEY: num_nodes}
            )
            ctx = Context(run_id, node_id, node_config, RecordDict(), dict(run_config or {}))
            self._nodes[node_id] = _Node(node_id, ctx)
        self._replies: dict[str, Message] = {}
        self._counter = 0
        #: wall seconds spent inside ClientApp calls (for overhead measurements)
        self.client_seconds = 0.0
        #: how many ClientApp calls were made
        self.client_calls = 0
        self._worker: _Worker | None = None
        #: torch intra-op threads for ClientApp calls (None: leave torch's setting alone)
        self.client_threads = client_threads
        #: a progress callback a ServerApp may call as `grid.observer(event, data)` (not part of Flower's Grid)
        self.observer = observer
        self.read_ahead = read_ahead

    # ---- Grid API ------------------------------------------------------------------------
    def set_run(self, run: Run | int) -> None:
        if isinstance(run, int):
            run = Run.create_empty(run)
        if not isinstance(run, Run):
            raise TypeError(f"`run` must be an instance of Run, got {type(run).__name__}")
        self._run = run

    @property
    def run(self) -> Run:
        return Run(**vars(self._run))

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> list[int]:
        return list(self._nodes)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        """Deliver every message now (no time limit); replies wait for `pull_messages`."""
        return self._deliver_all(messages, timeout=None)

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        out = []
        for mid in message_ids:
            reply = self._replies.pop(mid, None)
            if reply is not None:
                out.append(reply)
        return out

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        return list(self.stream(messages, timeout=timeout))

    def stream(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterator[Message]:
        """`send_and_receive`, one reply at a time as each call ends (not part of Flower's Grid): a
        server that takes each reply in before the next call holds one reply, not the cohort's."""
        for msg, upcoming in _with_next(messages):
            mid = self._deliver(msg, timeout, upcoming)
            if mid is not None:
                yield from self.pull_messages([mid])

    def flush(self) -> None:
        """Wait for the state files the ClientApp calls so far wrote behind their replies
        (fedsqueeze.deploy.state's write-behind; not part of Flower's Grid): a server calls it before
        its checkpoint, so that the checkpoint never runs ahead of its clients' files."""
        client_state.flush()

    # ---- contexts (for tests and inspection) ----------------------------------------------
    def context(self, node_id: int) -> Context:
        """The stored Context of a node."""
        return self._nodes[node_id].context

    def node_for_partition(self, partition_id: int) -> int:
        for node in self._nodes.values():
            if node.context.node_config.get(PARTITION_ID_KEY) == partition_id:
                return node.node_id
        raise KeyError(f"no node has partition-id {partition_id}")

    # ---- delivery ---------------------------------------------------------------------------
    def _next_id(self) -> str:
        self._counter += 1
        return str(uuid.UUID(int=(self._run.run_id << 64) | self._counter))

    def _deliver_all(self, messages: Iterable[Message], timeout: float | None) -> list[str]:
        ids = [self._deliver(msg, timeout, upcoming) for msg, upcoming in _with_next(messages)]
        return [mid for mid in ids if mid is not None]

    def _deliver(self, msg: Message, timeout: float | None, upcoming: Message | None = None) -> str | None:
        """Run the call of one message (and the read-ahead for `upcoming`, the next one, beside it);
        its reply waits for `pull_messages`. None: not stored."""
        msg.metadata.__dict__["_message_id"] = self._next_id()
        _check_instruction(msg)
        node = self._nodes.get(msg.metadata.dst_node_id)
        if node is None:  # as the SuperLink: a message to an unknown node is not stored
            log.error("message to unknown node %d dropped", msg.metadata.dst_node_id)
            return None
        reply = self._call(node, msg, timeout, upcoming)
        if reply is not None:
            reply.metadata.__dict__["_message_id"] = self._next_id()
            self._replies[msg.metadata.message_id] = reply
        return msg.metadata.message_id

    def _call(self, node: _Node, msg: Message, timeout: float | None, upcoming: Message | None) -> Message | None:
        if node.busy is not None:
            if not node.busy.idle():
                log.warning("node %d is still running an abandoned call: no reply this time", node.node_id)
                return None
            node.busy = None
        delivered = Message(content=copy.deepcopy(msg.content), metadata=copy.deepcopy(msg.metadata))
        delivered.metadata.delivered_at = now().isoformat()
        context = copy.deepcopy(node.context)
        outcome: dict[str, Any] = {}

        def work() -> None:
            if self.client_threads is not None and torch.get_num_threads() != self.client_threads:
                torch.set_num_threads(self.client_threads)
            t0 = time.perf_counter()
            try:
                outcome["reply"] = self._client_app(delivered, context)
            except BaseException as exc:  # noqa: BLE001 - reported as an error reply, as Flower does
                outcome["error"] = exc
                outcome["trace"] = traceback.format_exc()
            outcome["seconds"] = time.perf_counter() - t0

        if self._worker is None or not self._worker.idle():
            self._worker = _Worker.get()
        done = self._worker.submit(work)
        if self.read_ahead is not None and upcoming is not None:
            following = self._nodes.get(upcoming.metadata.dst_node_id)
            if following is not None and following.busy is None:
                self.read_ahead(upcoming, following.context)
        try:
            finished = done.wait(None if timeout is None else max(timeout, 0.0))
        except KeyboardInterrupt:
            # let the call in flight end: a process that exits while a thread is inside torch aborts
            done.wait(INTERRUPT_GRACE_S)
            raise
        if not finished:
            node.busy = self._worker  # abandoned: this worker is stuck in that call
            self._worker = None
            log.warning("node %d did not reply within %.3g s: its reply is dropped", node.node_id, timeout)
            return None
        self.client_calls += 1
        self.client_seconds += outcome["seconds"]
        if timeout is not None and outcome["seconds"] > timeout:
            log.warning(
                "node %d replied after %.3g s (timeout %.3g s): dropped", node.node_id, outcome["seconds"], timeout
            )
            return None
        if "error" in outcome:
            exc = outcome["error"]
            if isinstance(exc, KeyboardInterrupt):
                raise exc
            log.error("ClientApp raised on node %d: %s: %s", node.node_id, type(exc).__name__, exc)
            log.debug("traceback of node %d:\n%s", node.node_id, outcome["trace"])
            reason = f"{type(exc)}:<'{exc}'>"
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
        reply = outcome["reply"]
        if not isinstance(reply, Message) or reply.metadata.reply_to_message_id != msg.metadata.message_id:
            log.error("ClientApp on node %d returned no reply to the message it got", node.node_id)
            reason = f"ClientApp returned {type(reply).__name__}, not a reply Message"
            return Message(Error(code=ErrorCode.UNKNOWN, reason=reason), reply_to=msg)
        node.context = context
        return _copy_message(reply)


def _with_next(messages: Iterable[Message]) -> Iterator[tuple[Message, Message | None]]:
    """Each message with the one after it (None for the last)."""
    batch = list(messages)
    for i, msg in enumerate(batch):
        yield msg, batch[i + 1] if i + 1 < len(batch) else None


class _Worker:
    """One daemon thread that runs ClientApp calls, one at a time.

    Calls run on a thread so that a call past its timeout can be abandoned. The thread is kept
    for every call (not one thread per call): each new thread that enters PyTorch gets its own
    OpenMP team, and a trail of idle teams spinning on two cores slows every later call tenfold.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], None], threading.Event]] = queue.SimpleQueue()
        self._busy = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="fedsqueeze-clientapp", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        # SIGINT is for the main thread, the only one whose Python handler runs: with it blocked here
        # (and in the OpenMP threads torch starts from here, which inherit the mask) the kernel can only
        # pick a thread that wakes from its wait at once, never this one in a long ClientApp call
        if hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        while True:
            fn, done = self._jobs.get()
            try:
                fn()
            finally:
                self._busy.clear()
                done.set()

    _shared: _Worker | None = None

    @classmethod
    def get(cls) -> _Worker:
        """The process's idle worker (grids share it: one thread, one OpenMP team), or a new one."""
        if cls._shared is None or not cls._shared.idle():
            cls._shared = cls()
        return cls._shared

    def idle(self) -> bool:
        return not self._busy.is_set()

    def submit(self, fn: Callable[[], None]) -> threading.Event:
        done = threading.Event()
        self._busy.set()
        self._jobs.put((fn, done))
        return done


def _copy_message(msg: Message) -> Message:
    """What the server receives: a copy that shares nothing with the client."""
    if msg.has_error():
        return Message(error=copy.deepcopy(msg.error), metadata=copy.deepcopy(msg.metadata))
    return Message(content=copy.deepcopy(msg.content), metadata=copy.deepcopy(msg.metadata))


def _check_instruction(msg: Message) -> None:
    md = msg.metadata
    if md.reply_to_message_id != "" or md.ttl <= 0:
        raise ValueError(f"Invalid message: {msg}")


def _load_client_app(client_app: ClientAppLike) -> ClientApp:
    if isinstance(client_app, ClientApp):
        return client_app
    if isinstance(client_app, str):
        module, _, attr = client_app.partition(":")
        obj = getattr(importlib.import_module(module), attr or "app")
        if not isinstance(obj, ClientApp):
            raise TypeError(f"{client_app} is a {type(obj).__name__}, not a ClientApp")
        return obj
    if callable(client_app):
        app = client_app()
        if not isinstance(app, ClientApp):
            raise TypeError(f"client_app() returned {type(app).__name__}, not a ClientApp")
        return app
    raise TypeError(f"expected a ClientApp, a factory or 'module:attr', got {type(client_app).__name__}")


def _load_server_app(server_app: ServerApp | str) -> ServerApp:
    if isinstance(server_app, ServerApp):
        return server_app
    module, _, attr = server_app.partition(":")
    obj = getattr(importlib.import_module(module), attr or "app")
    if not isinstance(obj, ServerApp):
        raise TypeError(f"{server_app} is a {type(obj).__name__}, not a ServerApp")
    return obj


@contextmanager
def task_identity(run_id: int, node_id: int = SUPERLINK_NODE_ID, task_id: int = 1) -> Iterator[None]:
    """Set Flower's process-wide task identity (Message() reads it) and restore it afterwards."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


def run_inprocess(
    server_app: ServerApp | str,
    client_app: ClientAppLike,
    num_nodes: int,
    run_config: Mapping[str, bool | float | int | str] | None = None,
    *,
    seed: int = 0,
    run_id: int = 1,
    node_configs: Iterable[Mapping[str, bool | float | int | str]] | None = None,
    observer: Callable[[str, dict[str, Any]], None] | None = None,
    client_threads: int | None = None,
    read_ahead: Callable[[Message, Context], None] | None = None,
) -> tuple[InProcessGrid, Context]:
    """Run a ServerApp against `num_nodes` in-process ClientApp nodes; returns the grid and server Context."""
    grid = InProcessGrid(
        client_app,
        num_nodes,
        run_config,
        node_configs=node_configs,
        run_id=run_id,
        seed=seed,
        observer=observer,
        client_threads=client_threads,
        read_ahead=read_ahead,
    )
    context = Context(run_id, SUPERLINK_NODE_ID, {}, RecordDict(), dict(run_config or {}))
    app = _load_server_app(server_app)
    with task_identity(run_id):
        app(grid, context)
    return grid, context
