"""A model's ArrayRecord as fedsqueeze payloads and back, for the client mod and the strategy wrapper.

The floating arrays (in record order, `settings.Layout`) form one flat float32 vector that an
`UpdatePlan` compresses; its payloads go in the record as the packing of `fedsqueeze.client.app`
(`payload_record`), under `settings.PAYLOAD_PREFIX + group key`. Other arrays go unchanged.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedsqueeze import wire
from fedsqueeze.client.app import payload_record, payloads_from
from fedsqueeze.compressors import Compressed
from fedsqueeze.engine.payloads import UpdatePlan

from .settings import PAYLOAD_PREFIX, STYPE, Layout


def is_packed(record: ArrayRecord) -> bool:
    """Whether the record carries fedsqueeze payloads."""
    return any(a.stype == STYPE for a in record.values())


def dense_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The record's arrays as numpy (ValueError for a fedsqueeze payload: decode it with `unpack`)."""
    if is_packed(record):
        raise ValueError("the record holds fedsqueeze payloads, not arrays")
    return {k: a.numpy() for k, a in record.items()}


def pack(
    plan: UpdatePlan, payload: list[Compressed], layout: Layout, record: ArrayRecord
) -> tuple[ArrayRecord, dict[str, bytes]]:
    """The record with its floating arrays replaced by the payloads' bytes, and those bytes by group key."""
    data = plan.encode(payload)
    out = payload_record({PAYLOAD_PREFIX + k: b for k, b in data.items()})
    for key, array in record.items():
        if key not in layout.names:
            out[key] = array
    return out, data


def unpack(plan: UpdatePlan, record: ArrayRecord, layout: Layout) -> tuple[torch.Tensor, dict[str, Array], int]:
    """(the flat vector the payloads stand for, the other arrays, payload bytes); wire.PayloadError or
    ValueError for a record that is not what the plan expects."""
    payload_keys = {PAYLOAD_PREFIX + g.key for g in plan.groups}
    packed = ArrayRecord({k: a for k, a in record.items() if a.stype == STYPE})
    data = payloads_from(packed)
    if set(data) != payload_keys:
        raise ValueError(f"payloads {sorted(data)} differ from the expected {sorted(payload_keys)}")
    compressed = [wire.decode(data[PAYLOAD_PREFIX + g.key], g.numel) for g in plan.groups]
    vector = plan.decompress(compressed)
    extras = {k: a for k, a in record.items() if a.stype != STYPE}
    missing = [k for k in extras if k in layout.names]
    if missing:
        raise ValueError(f"arrays {missing} came dense beside the payloads")
    return vector, extras, sum(len(b) for b in data.values())


def dense_record(layout: Layout, vector: np.ndarray, extras: dict[str, Array]) -> ArrayRecord:
    """An ordinary ArrayRecord: the floating arrays from `vector` (in their dtypes), the others as they are,
    in the layout's key order (ValueError if one is missing)."""
    arrays = {k: Array(v) for k, v in layout.unflatten(vector).items()}
    arrays.update(extras)
    missing = [k for k in layout.order if k not in arrays]
    if missing:
        raise ValueError(f"arrays {missing} are missing")
    return ArrayRecord({k: arrays[k] for k in layout.order})
