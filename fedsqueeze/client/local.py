"""The client half of a round without Flower: payload bytes in, payload bytes and metrics out.

    broadcast payloads --wire.decode--> x (downlink plan)
    algorithm.client_step(x, model, data, loss, cfg, state) -> v_i
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
from fedsqueeze.algorithms import Algorithm, LocalConfig, build, derive_seed
from fedsqueeze.algorithms.updates import UpdatePlan, layout_of
from fedsqueeze.config import Config, build_task
from fedsqueeze.tracking import relative_error


@dataclass
class LocalResult:
    payloads: dict[str, bytes]
    num_examples: int
    train_loss: float
    compression_error: float
    metrics: dict[str, float]


class LocalClient:
    """One client (one partition) of a run: its data, a model to train, and the two plans."""

    def __init__(self, cfg: Config, partition_id: int) -> None:
        task = build_task(cfg)
        if not 0 <= partition_id < task.num_clients:
            raise ValueError(f"partition-id {partition_id} is outside 0..{task.num_clients - 1} (num-clients)")
        self.cfg = cfg
        self.partition_id = partition_id
        self.task = task
        self.data = task.clients[partition_id]
        self.model: nn.Module = task.new_model(seed=derive_seed(cfg.seed, "init"))
        layout = layout_of(self.model)
        self.uplink = UpdatePlan.uplink(layout, cfg)
        self.downlink = UpdatePlan.downlink(layout, cfg)
        self.algorithm: Algorithm = build(cfg.algorithm)
        configure = getattr(self.algorithm, "configure", None)
        if configure is not None:
            configure(self.task)  # e.g. p = "theory" reads the task's objective

    @property
    def num_examples(self) -> int:
        return len(self.data.train.y)

    def receive(self, broadcast: Mapping[str, bytes]) -> torch.Tensor:
        """The global model from the broadcast payloads (raises wire.PayloadError or ValueError if malformed)."""
        missing = [g.key for g in self.downlink.groups if g.key not in broadcast]
        if missing:
            raise ValueError(f"broadcast lacks the payload(s) {missing}")
        payloads = [wire.decode(broadcast[g.key], g.numel) for g in self.downlink.groups]
        return self.downlink.decompress(payloads)

    def train(
        self,
        broadcast: Mapping[str, bytes],
        server_round: int,
        state: dict[str, torch.Tensor],
        extra: Mapping[str, bool | int | float | str] | None = None,
    ) -> LocalResult:
        """One round of local work; `state` (the client's persistent tensors) is updated in place."""
        cfg = self.cfg
        x = self.receive(broadcast)
        local = LocalConfig(
            server_round=server_round,
            lr=cfg.lr,
            local_steps=cfg.local_steps,
            local_epochs=cfg.local_epochs,
            batch_size=cfg.batch_size,
            seed=derive_seed(cfg.seed, server_round, self.partition_id, "local"),
            extra=dict(extra or {}),
        )
        out = self.algorithm.client_step(x, self.model, self.data, self.task.loss_fn, local, state)
        update = out.update.detach().to(torch.float32).reshape(-1)
        gen = torch.Generator(device="cpu").manual_seed(derive_seed(cfg.seed, server_round, self.partition_id, "up"))
        compressed = self.uplink.compress(update, gen)
        payloads = {g.key: wire.encode(c) for g, c in zip(self.uplink.groups, compressed, strict=True)}
        return LocalResult(
            payloads=payloads,
            num_examples=out.num_examples,
            train_loss=out.train_loss,
            compression_error=relative_error(update, self.uplink.decompress(compressed)),
            metrics=dict(out.metrics),
        )


@functools.lru_cache(maxsize=256)
def client_for(cfg: Config, partition_id: int) -> LocalClient:
    """The LocalClient of a partition, built once per process (a ClientApp is called once per message)."""
    return LocalClient(cfg, partition_id)
