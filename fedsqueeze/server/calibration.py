"""The server half of the calibration exchange for `fedsqueeze prune`, on any Flower Grid.

`flower_asker(grid)` is a `fedsqueeze.pruning.Asker`: it sends the model to every node as a
`query.calibrate` message (`fedsqueeze.pruning.protocol`), checks each reply against the layers it
asked for, and adds the statistics in partition order (the same floats whatever the node ids).
Bytes are the lengths of the Arrays' data that crossed the wire: the model to each node (downlink)
and each node's statistics (uplink). A node that fails is logged and left out (its data then is not
in the sums: `Exchange.failed` says which); with no valid reply the exchange raises PruneError.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid
from torch import nn

from fedsqueeze.pruning import Exchange, PruneError, Stats, merge, prunable_layers, weight_matrix
from fedsqueeze.pruning import protocol as P

log = logging.getLogger("fedsqueeze.server")


def model_record(model: nn.Module) -> ArrayRecord:
    """The model's state_dict as float32 Arrays."""
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(v.detach().cpu().float().numpy())) for k, v in model.state_dict().items()}
    )


def record_bytes(record: ArrayRecord) -> int:
    return sum(len(a.data) for a in record.values())


def flower_asker(grid: Grid, *, max_examples: int = 0, timeout: float = 600.0):
    """An Asker that gathers statistics from every node of `grid`."""
    calls = {"n": 0}

    def ask(model: nn.Module, layers: Sequence[str], outputs: bool) -> Exchange:
        calls["n"] += 1
        available = prunable_layers(model)
        expected = {n: tuple(weight_matrix(available[n]).shape) for n in layers}
        model_rec = model_record(model)
        config = ConfigRecord({P.LAYERS: ",".join(layers), P.OUTPUTS: bool(outputs), P.MAX_EXAMPLES: int(max_examples)})
        nodes = sorted(grid.get_node_ids())
        msgs = [
            Message(
                RecordDict({P.MODEL: model_rec, P.CONFIG: config}),
                dst_node_id=n,
                message_type=P.MESSAGE_TYPE,
                group_id=f"calibrate-{calls['n']}",
            )
            for n in nodes
        ]
        replies = list(grid.send_and_receive(msgs, timeout=timeout)) if msgs else []
        sent = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
        downlink = record_bytes(model_rec) * len(msgs)
        uplink = 0
        parts: list[tuple[int, Stats]] = []
        failed: list[str] = []
        answered = set()
        for reply in replies:
            key = reply.metadata.reply_to_message_id
            node = sent.get(key)
            if node is None or key in answered:
                continue
            answered.add(key)
            if reply.has_error():
                failed.append(f"node {node}: error reply {reply.error.code}: {reply.error.reason}")
                continue
            try:
                record = reply.content[P.STATS]
                uplink += record_bytes(record)
                stats = Stats.from_arrays({k: a.numpy() for k, a in record.items()}, expected)
                pid = int(reply.content[P.INFO]["partition-id"])
            except (KeyError, TypeError, ValueError) as exc:
                failed.append(f"node {node}: invalid reply: {exc}")
                continue
            parts.append((pid, stats))
        failed += [f"node {n}: no reply within {timeout:g} s" for k, n in sent.items() if k not in answered]
        for f in failed:
            log.warning("calibration: %s", f)
        if not parts:
            raise PruneError(f"no node answered the calibration query ({len(msgs)} asked): " + "; ".join(failed))
        total = merge(s for _, s in sorted(parts, key=lambda p: p[0]))
        return Exchange(total, len(parts), uplink, downlink, failed)

    return ask
