"""The client half of a round without Flower: payload bytes in, payload bytes and metrics out.

    broadcast payloads --wire.decode--> x (downlink plan; with ef21p the client's copy w of the model)
    algorithm.client_step(x, model, data, loss, cfg, state) -> v_i
    feedback mechanism (if any): v_i -> payload per group, state updated after sending
    uplink plan: v_i -> Compressed per group --wire.encode--> bytes

`fedsqueeze.client.app` only translates Messages and Context to and from these calls.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from fedsqueeze import wire
from fedsqueeze.algorithms import Algorithm, LocalConfig, derive_seed
from fedsqueeze.config import Config
from fedsqueeze.feedback import Broadcast, Outgoing
from fedsqueeze.runplan import RunPlan, plan_for
from fedsqueeze.tracking import relative_error

#: round-config keys of the compressed downlink with feedback (fedsqueeze.server.coordinator)
DOWNLINK_STEP = "downlink-step"
DOWNLINK_RESYNC = "downlink-resync"
#: round-config key: the last round whose reply from this partition the server's feedback half took in
FEEDBACK_ACK = "feedback-ack"
SERVER_KEYS = (DOWNLINK_STEP, DOWNLINK_RESYNC, FEEDBACK_ACK)
#: state keys of the feedback memory update that waits for the server's acknowledgement
PENDING = "pending."
PENDING_ROUND = PENDING + "round"


@dataclass
class LocalResult:
    payloads: dict[str, bytes]
    num_examples: int
    train_loss: float
    compression_error: float
    metrics: dict[str, float]


class LocalClient:
    """One client (one partition) of a run: its data, a model to train, and the run's plan."""

    def __init__(self, cfg: Config, partition_id: int) -> None:
        plan: RunPlan = plan_for(cfg)
        task = plan.task
        if not 0 <= partition_id < task.num_clients:
            raise ValueError(f"partition-id {partition_id} is outside 0..{task.num_clients - 1} (num-clients)")
        self.cfg = cfg
        self.plan = plan
        self.partition_id = partition_id
        self.task = task
        self.data = task.clients[partition_id]
        self.model: nn.Module = task.new_model(seed=derive_seed(cfg.seed, "init"))
        self.uplink = plan.uplink
        self.downlink = plan.downlink
        self.algorithm: Algorithm = plan.new_algorithm()

    @property
    def num_examples(self) -> int:
        return len(self.data.train.y)

    def receive(
        self, broadcast: Mapping[str, bytes], extra: Mapping[str, object], state: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The model to start from (raises wire.PayloadError, FeedbackError or ValueError if unusable).

        With ef21p the broadcast is C(x - w), or the server's w itself when `downlink-resync` is set,
        and `state` keeps the client's w between rounds.
        """
        down = self.plan.downlink_feedback
        resync = down is not None and bool(extra.get(DOWNLINK_RESYNC, False))
        plan = self.plan.downlink_dense if resync else self.downlink
        missing = [g.key for g in plan.groups if g.key not in broadcast]
        if missing:
            raise ValueError(f"broadcast lacks the payload(s) {missing}")
        payloads = [wire.decode(broadcast[g.key], g.numel) for g in plan.groups]
        if down is None:
            return plan.decompress(payloads)
        step = extra.get(DOWNLINK_STEP)
        if isinstance(step, bool) or not isinstance(step, int):
            raise ValueError(f"a {down.name} broadcast needs an integer {DOWNLINK_STEP}, got {step!r}")
        if resync:
            return down.resync(plan.decompress(payloads), step, state)
        return down.receive(Broadcast(payloads, step), state, initial=self.plan.x0)

    def settle(self, state: dict[str, torch.Tensor], acknowledged: object) -> None:
        """Commit the pending memory update if the server took in the reply it belongs to, else drop it."""
        if PENDING_ROUND not in state or self.plan.mechanism is None:
            return
        sent_in = int(state.pop(PENDING_ROUND))
        pending = {k.removeprefix(PENDING): state.pop(k) for k in [k for k in state if k.startswith(PENDING)]}
        if isinstance(acknowledged, int) and not isinstance(acknowledged, bool) and acknowledged == sent_in:
            self.plan.mechanism.commit(state, Outgoing(payload=None, sent=torch.empty(0), new_state=pending))

    def train(
        self,
        broadcast: Mapping[str, bytes],
        server_round: int,
        state: dict[str, torch.Tensor],
        extra: Mapping[str, bool | int | float | str] | None = None,
    ) -> LocalResult:
        """One round of local work; `state` (the client's persistent tensors) is updated in place."""
        cfg = self.cfg
        extra = dict(extra or {})
        x = self.receive(broadcast, extra, state)
        local = LocalConfig(
            server_round=server_round,
            lr=self.plan.lr,
            local_steps=cfg.local_steps,
            local_epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            seed=derive_seed(cfg.seed, server_round, self.partition_id, "local"),
            extra={k: v for k, v in extra.items() if k not in SERVER_KEYS},
        )
        out = self.algorithm.client_step(x, self.model, self.data, self.task.loss_fn, local, state)
        update = out.update.detach().to(torch.float32).reshape(-1)
        gen = torch.Generator(device="cpu").manual_seed(derive_seed(cfg.seed, server_round, self.partition_id, "up"))
        mechanism = self.plan.mechanism
        if mechanism is None:
            compressed = self.uplink.compress(update, gen)
            error = relative_error(update, self.uplink.decompress(compressed))
        else:
            self.settle(state, extra.get(FEEDBACK_ACK))
            outgoing = mechanism.prepare(update, state, gen)
            compressed = outgoing.payload
            error = relative_error(outgoing.source, outgoing.sent) if outgoing.source is not None else float("nan")
            # the memory update waits until the server says it took this reply in (next time this
            # client is sampled): a reply that never arrives, or arrives after the round timeout,
            # leaves client and server memory in agreement
            state.update({PENDING + k: v for k, v in outgoing.new_state.items()})
            state[PENDING_ROUND] = torch.tensor(server_round, dtype=torch.int64)
        payloads = self.uplink.encode(compressed)
        return LocalResult(
            payloads=payloads,
            num_examples=out.num_examples,
            train_loss=out.train_loss,
            compression_error=error,
            metrics=dict(out.metrics),
        )


@functools.lru_cache(maxsize=256)
def client_for(cfg: Config, partition_id: int) -> LocalClient:
    """The LocalClient of a partition, built once per process (a ClientApp is called once per message)."""
    return LocalClient(cfg, partition_id)
