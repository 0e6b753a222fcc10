"""The client half of the calibration exchange: the global model in, this partition's statistics out.

The client runs its own training examples through the model it was sent and returns, per requested
layer, the sums of squares of `fedsqueeze.pruning.stats` (no example leaves the device).
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from fedsqueeze.config import Config, build_task
from fedsqueeze.pruning import collect
from fedsqueeze.pruning import protocol as P


def calibration_reply(msg: Message, cfg: Config, partition_id: int) -> RecordDict:
    task = build_task(cfg)
    if not 0 <= partition_id < task.num_clients:
        raise ValueError(f"partition-id {partition_id} is outside 0..{task.num_clients - 1} (num-clients)")
    config = msg.content[P.CONFIG]
    model = task.new_model()
    model.load_state_dict(msg.content[P.MODEL].to_torch_state_dict())
    layers = [n for n in str(config[P.LAYERS]).split(",") if n]
    x = task.clients[partition_id].train.x
    limit = int(config.get(P.MAX_EXAMPLES, 0))
    if limit > 0:
        x = x[:limit]
    stats = collect(model, x, layers or None, outputs=bool(config.get(P.OUTPUTS, False)))
    record = ArrayRecord({k: Array(v) for k, v in stats.to_arrays().items()})
    info = MetricRecord({"partition-id": partition_id, "num-examples": stats.examples})
    return RecordDict({P.STATS: record, P.INFO: info})
