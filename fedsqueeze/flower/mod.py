"""`compress_mod`: fedsqueeze compression of the update an unmodified Flower `@app.train()` function returns.

    app = ClientApp(mods=[fedsqueeze.flower.compress_mod(uplink="topk(0.01)", feedback="ef21")])

For a train message from a `fedsqueeze.flower.Compressed` strategy the mod
1. checks that the settings in the message's config are its own (else an error reply naming both);
2. decodes a compressed broadcast (the wrapper's `downlink`) into the dense ArrayRecord the train
   function expects, and remembers the arrays the client received;
3. calls the train function (and the mods after this one: DP clipping belongs there, so that the update
   is clipped before it is compressed);
4. forms the update v = reply arrays - received arrays (the floating ones, as one float32 vector),
   compresses it through the feedback mechanism's client half (`fedsqueeze.feedback`, memory in
   `context.state`, committed only once the server acknowledges the reply) with the payload plan of
   the uplink spec and per-tensor rules (`fedsqueeze.engine.payloads.UpdatePlan`), and replies with
   the packed bytes in place of the floating arrays.

Evaluate messages are decoded when compressed and passed on. A train message without fedsqueeze
settings (a strategy that is not wrapped) is passed on uncompressed, with a warning.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Error, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.clientapp.typing import ClientAppCallable, Mod
from flwr.common.constant import ErrorCode

from fedsqueeze import feedback as fb
from fedsqueeze import wire
from fedsqueeze.client.app import load_state, save_state
from fedsqueeze.config import ConfigError
from fedsqueeze.engine.client import keep_pending, settle
from fedsqueeze.engine.shared import SharedSeed
from fedsqueeze.seeding import generator

from . import records
from .settings import (
    FEEDBACK_ACK,
    FEEDBACK_RESOLVED,
    LAYOUT,
    ROUND_SEED,
    STATE_KEY,
    Layout,
    Settings,
    downlink_plan,
    uplink_plan,
)

log = logging.getLogger("fedsqueeze.flower")

SHARED = "shared"


class ModError(ValueError):
    """A train message or reply the mod cannot work with; becomes the error reply's reason."""


def compress_mod(
    uplink: str = "identity",
    feedback: str = "none",
    *,
    rules: str = "",
    dense_below: int = 0,
    randomness: str = "independent",
    downlink: str = "none",
) -> Mod:
    """A client mod compressing train replies; the arguments must equal the server's `Compressed(...)`.

    uplink: compressor spec of the update ("topk(0.01)", "qsgd(levels=16)", "topk(0.1) | fp16", ...);
    feedback: "none", "ef", "ef21", "efbv", "diana" (with arguments, as in fedsqueeze's run config);
    rules: per-tensor specs by array-name glob, "*.bias=identity; fc1.weight=powersgd(rank=4)";
    dense_below: arrays with fewer entries go in one dense group;
    randomness: "independent", or "shared" (every client of a round draws from the server's round seed);
    downlink: the broadcast's spec ("none": dense); the mod decodes it. ConfigError for a bad value.
    """
    settings = Settings(uplink, feedback, rules, dense_below, randomness, downlink)
    settings.normalised()  # every value checked now, when the ClientApp is built
    warned: list[bool] = []

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        kind = msg.metadata.message_type.split(".")[0]
        if kind not in (MessageType.TRAIN, MessageType.EVALUATE) or not msg.has_content():
            return call_next(msg, context)
        try:
            config = _one(msg.content.config_records, "ConfigRecord")
            sent = Settings.from_config_record(config)
            if sent is None:
                if kind == MessageType.TRAIN and not warned:
                    log.warning(
                        "compress_mod: the train message carries no fedsqueeze settings (is the server's strategy "
                        "wrapped in fedsqueeze.flower.Compressed?): the reply goes uncompressed"
                    )
                    warned.append(True)
                return call_next(msg, context)
            differences = settings.differences(sent)
            if differences:
                raise ModError("compress_mod and the server's Compressed strategy disagree: " + "; ".join(differences))
            key, record = _one(msg.content.array_records, "ArrayRecord", keyed=True)
            received, layout, msg = _received(settings, msg, key, record, config)
        except (ModError, ConfigError, wire.PayloadError, ValueError) as exc:
            return _error(msg, str(exc))
        if kind == MessageType.EVALUATE:
            return call_next(msg, context)
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        try:
            return _compress_reply(settings, config, reply, received, layout, context)
        except (ModError, ConfigError, wire.PayloadError, fb.FeedbackError, ValueError) as exc:
            return _error(msg, str(exc))

    mod.__name__ = mod.__qualname__ = "compress_mod"
    return mod


def _received(
    settings: Settings, msg: Message, key: str, record: ArrayRecord, config
) -> tuple[np.ndarray, Layout, Message]:
    """(the received floating arrays as a vector, their layout, the message the train function gets)."""
    if not records.is_packed(record):
        arrays = records.dense_arrays(record)
        layout = Layout.of(arrays)
        return layout.flatten(arrays), layout, msg
    if LAYOUT not in config:
        raise ModError(f"a compressed broadcast without its {LAYOUT}")
    layout = Layout.from_json(config[LAYOUT])
    vector, extras, _ = records.unpack(downlink_plan(settings, layout), record, layout)
    x = vector.numpy()
    content = RecordDict({k: v for k, v in msg.content.items()})
    content[key] = records.dense_record(layout, x, extras)
    msg.content = content
    return x, layout, msg


def _compress_reply(
    settings: Settings, config, reply: Message, received: np.ndarray, layout: Layout, context: Context
) -> Message:
    key, record = _one(reply.content.array_records, "ArrayRecord", keyed=True)
    trained = layout.flatten(records.dense_arrays(record))
    update = torch.from_numpy(trained - received)
    plan = uplink_plan(settings, layout)
    spec = config.get(FEEDBACK_RESOLVED, settings.feedback)
    mechanism = fb.build(str(spec), plan, dim=plan.numel, dense=plan.dense_like())
    seed = config.get(ROUND_SEED)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ModError(f"the train message has no integer {ROUND_SEED}")
    server_round = int(config.get("server-round", 0))
    if settings.randomness == SHARED:
        gen: torch.Generator | list[torch.Generator] = SharedSeed(seed).uplink(plan.keys())
    else:
        gen = generator(seed, context.node_id, "uplink")
    state = load_state(context, STATE_KEY)
    stateful = mechanism.name != "none"
    if stateful:
        settle(mechanism, plan, state, config.get(FEEDBACK_ACK))
    outgoing = mechanism.prepare(update, state, gen, eager=not mechanism.replayable)
    packed, data = records.pack(plan, outgoing.payload, layout, record)
    if stateful:
        keep_pending(mechanism, state, outgoing, data, server_round)
        save_state(context, state, STATE_KEY)
    content = RecordDict({k: v for k, v in reply.content.items()})
    content[key] = packed
    reply.content = content
    return reply


def _one(records_of, what: str, keyed: bool = False):
    if len(records_of) != 1:
        raise ModError(f"compress_mod expects exactly one {what} in the message, found {len(records_of)}")
    key, value = next(iter(records_of.items()))
    return (key, value) if keyed else value


def _error(msg: Message, reason: str) -> Message:
    log.error("compress_mod: %s", reason)
    return Message(Error(code=ErrorCode.MOD_FAILED_PRECONDITION, reason=reason), reply_to=msg)
