"""fedsqueeze's Flower ClientApp: Message in -> the engine's client half -> Message out.

The message schema is `fedsqueeze.engine.protocol`; `query.calibrate` (for `fedsqueeze prune`) has
its contract in `fedsqueeze.pruning.protocol`. Every payload is
`Array(dtype="uint8", shape=(n,), stype="fedsqueeze/v1", data=bytes)` keyed by its group (see
`fedsqueeze.engine.payloads`); `len(data)` is what crossed the wire. The run configuration comes
from `context.run_config`, the partition (and, for file-backed tasks, the device's own `data-path`)
from `context.node_config`. The client's persistent tensors live in
`context.state["fedsqueeze.state"]` between rounds or, when the node config (a device) or the run
config (a simulation) sets `state-dir`, only in a file there (`fedsqueeze.deploy.state`): memory
then holds no client state between calls, which is how simulations of many clients with large
state keep within memory, and a SuperNode restart or a resumed server loses nothing.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsqueeze.config import Config, with_data_path
from fedsqueeze.deploy.state import StateStore, store_for
from fedsqueeze.engine import protocol, secure
from fedsqueeze.engine.client import client_half

STYPE = protocol.STYPE
#: node config key: where this device keeps its copy of a file-backed task's data
DATA_PATH_KEY = "data-path"
#: node config key: how many partitions the federation's data has (Flower's simulation engine sets it)
NUM_PARTITIONS_KEY = "num-partitions"
STATE_KEY = "fedsqueeze.state"
#: in context.state once this node's state is there and on disk (state-dir): no file to restore
DURABLE_KEY = "fedsqueeze.durable"

log = logging.getLogger("fedsqueeze.client")
T = TypeVar("T")

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (it samples and orders clients by it)."""
    pid = partition_id(context)
    n = client_half(_config(context)).num_examples(pid)
    info = MetricRecord({protocol.PARTITION_ID: pid, protocol.NUM_EXAMPLES: n})
    if NUM_PARTITIONS_KEY in context.node_config:  # the federation's size, which num-clients follows
        info[protocol.NUM_PARTITIONS] = int(context.node_config[NUM_PARTITIONS_KEY])
    return Message(RecordDict({protocol.INFO: info}), reply_to=msg)


# ---- calibration for post-training pruning (fedsqueeze prune) ---------------------------------------


@app.query("calibrate")
def calibrate(msg: Message, context: Context) -> Message:
    """This partition's calibration statistics for the model in the message (fedsqueeze.pruning)."""
    from .calibration import calibration_reply

    return Message(calibration_reply(msg, _config(context), partition_id(context)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    client = client_half(_config(context))
    pid = partition_id(context)
    broadcast = payloads_from(msg.content[protocol.BROADCAST])
    config = dict(msg.content[protocol.CONFIG])
    result = with_state(context, config, pid, lambda state: client.train(pid, broadcast, config, state))
    metrics = MetricRecord(result.report(pid))
    content = RecordDict({protocol.UPDATE: payload_record(result.payloads), protocol.METRICS: metrics})
    return Message(content, reply_to=msg)


def with_state(
    context: Context, config: dict[str, object], pid: int, work: Callable[[dict[str, torch.Tensor]], T]
) -> T:
    """`work(state)` on this client's state, loaded before and kept after (context.state or state-dir)."""
    server_round = int(config[protocol.SERVER_ROUND])  # type: ignore[call-overload]
    store = state_store(context, config, pid)
    if store is None:
        state = load_state(context)
    else:
        # the state written before this round is this client's (a corrupted or foreign file raises
        # StateError, so the reply is an error); after a SuperNode restart, say so
        restored = store.load(before_round=server_round)
        state = {} if restored is None else restored.tensors
        if restored is not None and DURABLE_KEY not in context.state:
            log.warning("restored the state of round %d from %s", restored.server_round, store.path)
    result = work(state)
    if store is None:
        save_state(context, state)
    else:
        if state or store.exists():  # a stateless algorithm writes no files
            store.save_behind(state, server_round)  # on disk before the exchange ends (deploy.state)
        context.state[DURABLE_KEY] = ConfigRecord({protocol.SERVER_ROUND: server_round})
    return result


def state_store(context: Context, config: dict[str, object], pid: int) -> StateStore | None:
    """The file this client's state lives in (state-dir), or None (context.state)."""
    # the digest is of the resolved config, so it does not depend on how Flower typed the values
    return store_for(context.node_config, run_identity(config, context), _config(context).to_run_config(), pid)


def read_ahead(msg: Message, context: Context) -> None:
    """Start reading the state file that a train message's call will load (fedsqueeze.deploy.state's
    read-ahead: the in-process backend calls this for the next message while a call runs). Only a
    hint: a message it cannot read this from is left to its call, which reports what is wrong."""
    if msg.metadata.message_type != "train" or protocol.CONFIG not in msg.content:
        return
    try:
        config = dict(msg.content[protocol.CONFIG])
        server_round = int(config[protocol.SERVER_ROUND])  # type: ignore[call-overload]
        store = state_store(context, config, partition_id(context))
    except (KeyError, TypeError, ValueError):
        return
    if store is not None:
        store.read_ahead(before_round=server_round)


# ---- secure aggregation: the four stages of a secure round (fedsqueeze.engine.secure) ---------------

#: this node's secagg session (the round's secret keys, seed and shares) in context.state: it never leaves
#: the node, and the unmask stage wipes it
SECAGG_KEY = "fedsqueeze.secagg"


def _stage(action: str, msg: Message, context: Context) -> Message:
    client = client_half(_config(context))
    pid = partition_id(context)
    message = secure.StageMessage(
        dict(msg.content[secure.RECORD]),
        payloads_from(msg.content[protocol.BROADCAST]) if protocol.BROADCAST in msg.content else {},
        dict(msg.content[protocol.CONFIG]) if protocol.CONFIG in msg.content else {},
    )
    record = context.state.config_records.get(SECAGG_KEY)
    session: dict[str, object] = dict(record) if record is not None else {}
    if action == secure.MASKED:
        reply = with_state(
            context,
            message.config,
            pid,
            lambda state: secure.client_stage(client, action, pid, message, session, state),
        )
    else:
        reply = secure.client_stage(client, action, pid, message, session)
    context.state[SECAGG_KEY] = ConfigRecord(session)  # type: ignore[arg-type]
    return Message(RecordDict({secure.RECORD: ConfigRecord(reply)}), reply_to=msg)  # type: ignore[arg-type]


@app.query(secure.ADVERTISE)
def secagg_advertise(msg: Message, context: Context) -> Message:
    return _stage(secure.ADVERTISE, msg, context)


@app.query(secure.SHARE)
def secagg_share(msg: Message, context: Context) -> Message:
    return _stage(secure.SHARE, msg, context)


@app.train(secure.MASKED)
def secagg_masked(msg: Message, context: Context) -> Message:
    return _stage(secure.MASKED, msg, context)


@app.query(secure.UNMASK)
def secagg_unmask(msg: Message, context: Context) -> Message:
    return _stage(secure.UNMASK, msg, context)


def run_identity(config: dict[str, object], context: Context) -> int | str:
    """What this client's state files are kept under: the run uid the server sends (a resumed run
    keeps it, where Flower gives it a new run id), or Flower's run id."""
    uid = config.get(protocol.RUN_UID)
    if uid is None:
        return int(context.run_id)
    if not isinstance(uid, str) or not 0 < len(uid) <= 32 or any(c not in "0123456789abcdef" for c in uid):
        raise ValueError(f"{protocol.RUN_UID} must be up to 32 lowercase hex digits, got {uid!r}")
    return uid


def partition_id(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise ValueError(
            "this node has no partition-id in its node config; start it with --node-config 'partition-id=0'"
        ) from None


def payload_record(payloads: dict[str, bytes]) -> ArrayRecord:
    """Payload bytes as uint8 Arrays with fedsqueeze's stype."""
    return ArrayRecord({k: Array(dtype="uint8", shape=(len(b),), stype=STYPE, data=b) for k, b in payloads.items()})


def payloads_from(record: ArrayRecord) -> dict[str, bytes]:
    """The payload bytes of a record (ValueError if an entry is not a fedsqueeze payload)."""
    out = {}
    for key, array in record.items():
        if array.stype != STYPE or array.dtype != "uint8" or list(array.shape) != [len(array.data)]:
            raise ValueError(f"entry {key!r} is not a {STYPE} payload (stype {array.stype!r}, dtype {array.dtype!r})")
        out[key] = bytes(array.data)
    return out


#: stype of a state tensor in context.state: its raw little-endian bytes (one copy each way, where
#: Flower's numpy stype goes through np.save and np.load)
STATE_STYPE = "fedsqueeze/raw"


def load_state(context: Context, key: str = STATE_KEY) -> dict[str, torch.Tensor]:
    """The tensors kept under `key` in the node's context.state ({} the first time)."""
    record = context.state.array_records.get(key)
    if record is None:
        return {}
    out = {}
    for key, a in record.items():
        raw = np.frombuffer(a.data, dtype=np.dtype(a.dtype).newbyteorder("<")).astype(a.dtype)  # a writable copy
        out[key] = torch.from_numpy(raw.reshape(a.shape))
    return out


def save_state(context: Context, state: dict[str, torch.Tensor], key: str = STATE_KEY) -> None:
    """Keep `state` under `key` in the node's context.state (raw bytes; nothing when it is empty)."""
    if not state:
        if key in context.state:
            del context.state[key]
        return
    arrays = {}
    for name, v in state.items():
        a = v.detach().cpu().contiguous().numpy()
        data = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        arrays[name] = Array(dtype=a.dtype.name, shape=tuple(a.shape), stype=STATE_STYPE, data=data)
    context.state[key] = ArrayRecord(arrays)


def _config(context: Context) -> Config:
    """The run config as this node applies it: num-clients is the node config's num-partitions when it
    has one (Flower's simulation engine gives every node one), as the ServerApp does (server.app)."""
    items = dict(context.run_config)
    if NUM_PARTITIONS_KEY in context.node_config:
        items[protocol.NUM_CLIENTS] = int(context.node_config[NUM_PARTITIONS_KEY])
    cfg = _config_cached(tuple(sorted(items.items())))
    path = context.node_config.get(DATA_PATH_KEY)
    return with_data_path(cfg, str(path)) if path else cfg


@functools.lru_cache(maxsize=8)
def _config_cached(items: tuple[tuple[str, bool | int | float | str], ...]) -> Config:
    return Config.from_run_config(dict(items))
