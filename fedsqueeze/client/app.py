"""fedsqueeze's Flower ClientApp: Message in -> LocalClient -> Message out.

Messages (the contract with `fedsqueeze.server.app`):

    query   server -> client: {}                      client -> server: MetricRecord "info"
                                                       {partition-id, num-examples}
    train   server -> client: ArrayRecord "broadcast"  client -> server: ArrayRecord "update"
                              ConfigRecord "config"                       MetricRecord "metrics"
                              {server-round, ...}      {num-examples, train-loss, compression-error,
                                                        partition-id}
    query.calibrate  server -> client: ArrayRecord "model"  client -> server: ArrayRecord "stats"
                     (fedsqueeze prune; the contract is in fedsqueeze.pruning.protocol)

Every payload is `Array(dtype="uint8", shape=(n,), stype="fedsqueeze/v1", data=bytes)` keyed by
its group (see `fedsqueeze.algorithms.updates`); `len(data)` is what crossed the wire. The run
configuration comes from `context.run_config`, the partition (and, for file-backed tasks, the
device's own `data-path`) from `context.node_config`; the
algorithm's persistent tensors live in `context.state["fedsqueeze.state"]` between rounds, and
also in a file under `state-dir` when the node config sets it (`fedsqueeze.deploy.state`).
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsqueeze.config import Config, with_data_path
from fedsqueeze.deploy.state import store_for

from .local import client_for

STYPE = "fedsqueeze/v1"
#: node config key: where this device keeps its copy of a file-backed task's data
DATA_PATH_KEY = "data-path"
STATE_KEY = "fedsqueeze.state"
#: in context.state once this node's state is there and on disk (state-dir): no file to restore
DURABLE_KEY = "fedsqueeze.durable"

log = logging.getLogger("fedsqueeze.client")

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this node holds (it samples and orders clients by it)."""
    client = client_for(_config(context), partition_id(context))
    info = MetricRecord({"partition-id": client.partition_id, "num-examples": client.num_examples})
    return Message(RecordDict({"info": info}), reply_to=msg)


# ---- calibration for post-training pruning (fedsqueeze prune) ---------------------------------------


@app.query("calibrate")
def calibrate(msg: Message, context: Context) -> Message:
    """This partition's calibration statistics for the model in the message (fedsqueeze.pruning)."""
    from .calibration import calibration_reply

    return Message(calibration_reply(msg, _config(context), partition_id(context)), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    client = client_for(_config(context), partition_id(context))
    broadcast = payloads_from(msg.content["broadcast"])
    config = msg.content["config"]
    server_round = int(config["server-round"])
    extra = {k: v for k, v in config.items() if k != "server-round"}
    # the digest is of the resolved config, so it does not depend on how Flower typed the values
    store = store_for(context.node_config, context.run_id, client.cfg.to_run_config(), client.partition_id)
    state = load_state(context)
    if store is not None and DURABLE_KEY not in context.state and store.exists():
        # a SuperNode restart emptied context.state: the file written after the last round is the
        # client's state (a corrupted or foreign file raises StateError, so the reply is an error)
        restored = store.load()
        state = restored.tensors
        log.warning("restored the state of round %d from %s", restored.server_round, store.path)
    result = client.train(broadcast, server_round, state, extra)
    save_state(context, state)
    if store is not None:
        store.save(state, server_round)
        context.state[DURABLE_KEY] = ConfigRecord({"server-round": server_round})
    metrics = MetricRecord(
        {
            "num-examples": result.num_examples,
            "train-loss": result.train_loss,
            "compression-error": result.compression_error,
            "partition-id": client.partition_id,
            **result.metrics,
        }
    )
    content = RecordDict({"update": payload_record(result.payloads), "metrics": metrics})
    return Message(content, reply_to=msg)


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


def load_state(context: Context) -> dict[str, torch.Tensor]:
    record = context.state.array_records.get(STATE_KEY)
    if record is None:
        return {}
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}


def save_state(context: Context, state: dict[str, torch.Tensor]) -> None:
    if state:
        context.state[STATE_KEY] = ArrayRecord({k: Array(v.detach().cpu().numpy()) for k, v in state.items()})
    elif STATE_KEY in context.state:
        del context.state[STATE_KEY]


def _config(context: Context) -> Config:
    cfg = _config_cached(tuple(sorted(context.run_config.items())))
    path = context.node_config.get(DATA_PATH_KEY)
    return with_data_path(cfg, str(path)) if path else cfg


@functools.lru_cache(maxsize=8)
def _config_cached(items: tuple[tuple[str, bool | int | float | str], ...]) -> Config:
    return Config.from_run_config(dict(items))
