"""The client half of a round: payload bytes in, payload bytes and metrics out.

    broadcast payloads --wire.decode--> x (downlink plan; with ef21p the client's copy w of the model)
    settle: commit or drop the memory update of the previous reply (protocol.FEEDBACK_ACK)
    out = algorithm.client_step(x, model, data_i, loss, LocalConfig(config_i), state_i) -> v_i
    mechanism.prepare(v_i, state_i) -> Compressed per group --wire.encode--> bytes
    the mechanism's memory update waits in state_i as *pending* until the server acknowledges it

One `ClientHalf` serves every client of a run in a process (a worker): it holds the plan, the task,
the algorithm and one model instance, and no client's state, which the caller passes in (Flower's
`context.state`, a `state-dir` file, or the engine's local transport). `fedsqueeze.client.app` only
translates Messages and Context to and from these calls.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fedsqueeze import wire
from fedsqueeze.algorithms import Algorithm, LocalConfig
from fedsqueeze.config import RANDOMNESS, Config
from fedsqueeze.feedback import Broadcast, Mechanism, Outgoing
from fedsqueeze.seeding import derive_seed, generator

from . import protocol
from .payloads import UpdatePlan
from .plan import RunPlan, plan_for
from .shared import shared_seed_of

Scalar = bool | int | float | str
SHARED = RANDOMNESS[1]


@dataclass
class LocalResult:
    server_round: int
    payloads: dict[str, bytes]
    num_examples: int
    train_loss: float
    compression_error: float
    metrics: dict[str, float]

    def report(self, partition_id: int) -> dict[str, Scalar]:
        """The reply's metrics record."""
        return {
            protocol.NUM_EXAMPLES: self.num_examples,
            protocol.TRAIN_LOSS: self.train_loss,
            protocol.COMPRESSION_ERROR: self.compression_error,
            protocol.PARTITION_ID: partition_id,
            protocol.SERVER_ROUND: self.server_round,
            **self.metrics,
        }


class ClientHalf:
    """Every client of one run in this process: the run's plan, one model, the algorithm."""

    def __init__(self, cfg: Config) -> None:
        plan: RunPlan = plan_for(cfg)
        self.cfg = cfg
        self.plan = plan
        self.task = plan.task
        #: one model per worker: each call loads the broadcast into it before training
        self.model: nn.Module = plan.task.new_model(seed=derive_seed(cfg.seed, "init"))
        self.algorithm: Algorithm = plan.new_algorithm()
        #: the last broadcast decoded: (its plan, its payload bytes, x, x's version counter)
        self._decoded: tuple[UpdatePlan, list[bytes], torch.Tensor, int] | None = None

    def check(self, partition_id: int) -> None:
        if not 0 <= partition_id < self.task.num_clients:
            raise ValueError(f"partition-id {partition_id} is outside 0..{self.task.num_clients - 1} (num-clients)")

    def num_examples(self, partition_id: int) -> int:
        self.check(partition_id)
        return len(self.task.clients[partition_id].train.y)

    def receive(
        self, broadcast: Mapping[str, bytes], config: Mapping[str, object], state: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The model to start from (raises wire.PayloadError, FeedbackError or ValueError if unusable).

        With ef21p the broadcast is C(x - w), or the server's w itself when `downlink-resync` is set,
        and `state` keeps the client's w between rounds.
        """
        down = self.plan.downlink_feedback
        resync = down is not None and bool(config.get(protocol.DOWNLINK_RESYNC, False))
        plan = self.plan.downlink_dense if resync else self.plan.downlink
        missing = [g.key for g in plan.groups if g.key not in broadcast]
        if missing:
            raise ValueError(f"broadcast lacks the payload(s) {missing}")
        if down is None:
            return self.decode_broadcast(plan, [broadcast[g.key] for g in plan.groups])
        payloads = [wire.decode(broadcast[g.key], g.numel) for g in plan.groups]
        step = config.get(protocol.DOWNLINK_STEP)
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"a {down.name} broadcast needs an integer {protocol.DOWNLINK_STEP}, got {step!r}")
        if resync:
            return down.resync(plan.decompress(payloads), step, state)
        return down.receive(Broadcast(payloads, step), state, initial=self.plan.x0)

    def decode_broadcast(self, plan: UpdatePlan, data: list[bytes]) -> torch.Tensor:
        """x from a plain broadcast, decoded once for all the clients of a round that this process serves:
        they get the same bytes (the very same object in-process, equal bytes on a Ray worker), so the
        same x. Algorithms read x and never write it (`train` checks)."""
        last = self._decoded
        if last is not None and last[0] is plan and last[1] == data and last[2]._version == last[3]:
            return last[2]
        self._decoded = None
        x = plan.decompress([wire.decode(b, g.numel) for b, g in zip(data, plan.groups, strict=True)])
        self._decoded = (plan, data, x, x._version)
        return x

    def settle(self, state: dict[str, torch.Tensor], acknowledged: object) -> None:
        """Commit the pending memory update if the server took in the reply it belongs to, else drop it."""
        settle(self.plan.mechanism, self.plan.uplink, state, acknowledged)

    def train(
        self,
        partition_id: int,
        broadcast: Mapping[str, bytes],
        config: Mapping[str, Scalar],
        state: dict[str, torch.Tensor],
    ) -> LocalResult:
        """One round of local work for `partition_id`; its `state` is updated in place."""
        self.check(partition_id)
        cfg = self.cfg
        server_round = int(config[protocol.SERVER_ROUND])
        x = self.receive(broadcast, config, state)
        local = LocalConfig(
            server_round=server_round,
            lr=self.plan.lr,
            local_steps=cfg.local_steps,
            local_epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            seed=derive_seed(cfg.seed, server_round, partition_id, "local"),
            extra={k: v for k, v in config.items() if k not in protocol.SERVER_KEYS},
        )
        data = self.task.clients[partition_id]
        version = x._version
        out = self.algorithm.client_step(x, self.model, data, self.task.loss_fn, local, state)
        if x._version != version:  # x may be the round's shared broadcast (decode_broadcast)
            self._decoded = None
            raise RuntimeError(f"{self.algorithm.name}.client_step changed the broadcast model x in place; it must not")
        update = out.update.detach().to(torch.float32).reshape(-1)
        if cfg.randomness == SHARED:  # the round's cohort draws the same (fedsqueeze.engine.shared)
            gen: torch.Generator | list[torch.Generator] = shared_seed_of(config).uplink(self.plan.uplink.keys())
        else:
            gen = generator(cfg.seed, server_round, partition_id, "up")
        mechanism = self.plan.mechanism
        self.settle(state, config.get(protocol.FEEDBACK_ACK))
        # a replayable mechanism's memory update is rebuilt from the payload when it is acknowledged
        outgoing = mechanism.prepare(update, state, gen, eager=not mechanism.replayable)
        payloads = self.plan.uplink.encode(outgoing.payload)
        error = self.plan.uplink.error(outgoing.source if outgoing.source is not None else update, outgoing.payload)
        if self.plan.stateful:
            self.keep_pending(state, outgoing, payloads, server_round)
        return LocalResult(
            server_round=server_round,
            payloads=payloads,
            num_examples=out.num_examples,
            train_loss=out.train_loss,
            compression_error=error,
            metrics=dict(out.metrics),
        )

    def keep_pending(
        self, state: dict[str, torch.Tensor], outgoing: Outgoing, payloads: Mapping[str, bytes], server_round: int
    ) -> None:
        keep_pending(self.plan.mechanism, state, outgoing, payloads, server_round)


@functools.lru_cache(maxsize=4)
def client_half(cfg: Config) -> ClientHalf:
    """The ClientHalf of a run config in this process (it holds no client's state: the cache only saves
    building the plan and the model again for every message)."""
    return ClientHalf(cfg)


# ---- the feedback acknowledgement protocol's client end (also used by fedsqueeze.flower's client mod)


def settle(mechanism: Mechanism, uplink: UpdatePlan, state: dict[str, torch.Tensor], acknowledged: object) -> None:
    """Commit the pending memory update if the server took in the reply it belongs to (`acknowledged`
    names that reply's round), else drop it."""
    if protocol.PENDING_ROUND not in state:
        return
    sent_in = int(state.pop(protocol.PENDING_ROUND))
    pending = {k: state.pop(k) for k in [k for k in state if k.startswith(protocol.PENDING)]}
    ok = isinstance(acknowledged, int) and not isinstance(acknowledged, bool) and acknowledged == sent_in
    if not ok:
        return
    if mechanism.replayable:
        initial = bool(pending.pop(protocol.PENDING_INITIAL))
        payload = [
            wire.decode(pending[protocol.PENDING_PAYLOAD + g.key].numpy().tobytes(), g.numel) for g in uplink.groups
        ]
        new_state = mechanism.replay(state, payload, initial)
    else:
        new_state = {k.removeprefix(protocol.PENDING): v for k, v in pending.items()}
    mechanism.commit(state, Outgoing(payload=None, sent=torch.empty(0), new_state=new_state))


def keep_pending(
    mechanism: Mechanism,
    state: dict[str, torch.Tensor],
    outgoing: Outgoing,
    payloads: Mapping[str, bytes],
    server_round: int,
) -> None:
    """The memory update waits until the server says it took this reply in (the next time this client
    is sampled): a reply that never arrives, or arrives after the round timeout, leaves client and
    server memory in agreement. A replayable mechanism keeps it as the payload bytes it sent."""
    if mechanism.replayable:
        for key, data in payloads.items():
            state[protocol.PENDING_PAYLOAD + key] = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
        state[protocol.PENDING_INITIAL] = torch.tensor(outgoing.initial)
    else:
        state.update({protocol.PENDING + k: v for k, v in outgoing.new_state.items()})
    state[protocol.PENDING_ROUND] = torch.tensor(server_round, dtype=torch.int64)
