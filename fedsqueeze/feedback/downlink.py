"""Compressed downlink (server -> clients) with its own feedback.

`ef21p`: EF21-P (Gruntkowska, Tyurin, Richtarik, "EF21-P and Friends: Improved Theoretical
Communication Complexity for Distributed Optimization with Bidirectional Compression", ICML 2023).
The server keeps w, the model the clients hold; each round it broadcasts c = C(x - w) and both sides
set w <- w + c. Clients compute their gradients (or start their local training) at w, the server
steps its own x <- x - gamma g. Since w chases x with a contractive C, w -> x -> x* and the
downlink error vanishes at the optimum.

`plain`: the server broadcasts C(x) and clients use it as it is (no memory): lossy for biased C.

Both sides start from the same w^0 = x^0 (the run's initial model, which client and server derive
from the run seed), so no first message is needed.

Partial participation: every client must apply every broadcast, in order, or its w drifts from the
server's. Each broadcast carries its step number and the client half checks it against the number of
broadcasts it has applied (FeedbackError if it missed one). The float64 reference (tests/reference)
delivers each broadcast to all clients (and counts the downlink bytes for every receiver). A server that sends only
to a cohort instead sends a client that missed broadcasts the server's w itself (`resync`), which
costs a dense message but needs no history of past broadcasts.

Memory: ef21p keeps one vector of d values on the server (w) and one per client (its copy of w,
the model it computes at, plus a step counter); plain keeps nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import STATE_PREFIX, Codec, FeedbackError, Payload, check_vector

MODEL = STATE_PREFIX + "w"
STEP = STATE_PREFIX + "w_step"

DOWNLINK_MECHANISMS = ("ef21p", "plain")


@dataclass(frozen=True, eq=False)
class Broadcast:
    """What the server sends to every client: the payload and the broadcast's step number (1, 2, ...)."""

    payload: Payload
    step: int


class Downlink:
    """A downlink mechanism around a codec: `server(x0)` is the server half, `receive` the client half."""

    def __init__(self, name: str, codec: Codec) -> None:
        if name not in DOWNLINK_MECHANISMS:
            raise FeedbackError(f"unknown downlink feedback {name!r}; valid names: {', '.join(DOWNLINK_MECHANISMS)}")
        self.name = name
        self.codec = codec

    def server(self, x0: torch.Tensor) -> DownlinkServer:
        return DownlinkServer(self, check_vector(x0))

    def receive(self, message: Broadcast, state: dict[str, torch.Tensor], initial: torch.Tensor) -> torch.Tensor:
        """The model this client computes at; `state` (ef21p: w and a step counter) is updated in place.

        `initial` is w^0 = x^0, used the first time.
        """
        decoded = self.codec.decompress(message.payload).reshape(-1)
        if self.name == "plain":
            return decoded.to(initial.dtype)
        w = state.get(MODEL)
        done = int(state[STEP]) if STEP in state else 0
        if message.step != done + 1:
            raise FeedbackError(
                f"downlink broadcast {message.step} arrived after broadcast {done}: the client missed "
                f"{message.step - done - 1} and its model copy is out of date"
            )
        if w is None:
            w = check_vector(initial).clone()
        w = w + decoded.to(w.dtype)
        state[MODEL] = w
        state[STEP] = torch.tensor(message.step, dtype=torch.int64)
        return w

    def resync(self, w: torch.Tensor, step: int, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """Replace the client's copy by the server's w after broadcast `step` (for a client that missed some)."""
        if self.name == "plain":
            raise FeedbackError("the plain downlink keeps no model copy to resynchronise")
        w = check_vector(w).clone()
        state[MODEL] = w
        state[STEP] = torch.tensor(step, dtype=torch.int64)
        return w

    def __repr__(self) -> str:
        return f"<downlink {self.name}>"


class DownlinkServer:
    """The server half: w (ef21p) and the broadcast counter."""

    def __init__(self, downlink: Downlink, x0: torch.Tensor) -> None:
        self.downlink = downlink
        self.w = x0.clone()
        self.step = 0

    def broadcast(self, x: torch.Tensor, generator: torch.Generator | None = None) -> Broadcast:
        """The message for this round; for ef21p also w <- w + C(x - w)."""
        x = check_vector(x)
        codec = self.downlink.codec
        self.step += 1
        if self.downlink.name == "plain":
            payload = codec.compress(x, generator)
            self.w = codec.decompress(payload).reshape(-1).to(x.dtype)
            return Broadcast(payload, self.step)
        payload = codec.compress(x - self.w, generator)
        self.w = self.w + codec.decompress(payload).reshape(-1).to(self.w.dtype)
        return Broadcast(payload, self.step)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"w": self.w.clone(), "step": torch.tensor(self.step, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.w = state["w"].clone()
        self.step = int(state["step"])


def build_downlink(name: str, compressor: str | Codec) -> Downlink:
    """A downlink mechanism ("ef21p" or "plain") around a compressor spec or codec."""
    if isinstance(compressor, str):
        from fedsqueeze.compressors import build

        compressor = build(compressor)
    return Downlink(name, compressor)
