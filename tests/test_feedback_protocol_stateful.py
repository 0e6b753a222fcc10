"""Stateful property test of the feedback protocol: arbitrary participation, lost and late replies.

A Hypothesis state machine drives the engine's `Server` and its client half (`ClientHalf`) directly,
as a transport would, choosing every round which clients take part and what happens to each one's
message: its reply arrives in time, is lost, or comes too late. A late reply is what Flower's
transport (`fedsqueeze.server.app`) sees when a node answers after the round timeout: the server has
closed the round; here the reply still reaches it in a later round, where `take` must refuse it (it
carries the round it answers), and the client, which processes its messages in order, computed it
before it reads its next message. Rounds may
also close without a step (too few replies), where the running quantities still take the replies in.

After every step the two halves must agree, for EF21, EF-BV, DIANA, each with an EF21-P downlink:
- the server's running mean (EF21's g, EF-BV's and DIANA's h) is the share-weighted mean of every
  client's memory as it stands once the client settles its pending update against the server's
  acknowledgement (the next message tells it which of its replies counted);
- the EF-BV/DIANA server's "seen" bit of each client says whether that client holds memory;
- every client the server counts as holding the downlink model at the current step holds exactly
  the server's w (ef21p), so the next broadcast C(x - w) lands on the same w at both ends.
"""

from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from fedsqueeze.config import resolve
from fedsqueeze.engine import InvalidReply, Server
from fedsqueeze.engine.client import client_half
from fedsqueeze.feedback import FeedbackError
from fedsqueeze.wire import PayloadError

N = 4
TASK = [
    "task=synthetic-logreg(num_features=10, num_classes=2, reg=1.0)",
    "partition=natural",
    f"num-clients={N}",
    "mode=gradient",
    "batch-size=0",
    "lr=0.05",
]
DOWN = ["downlink=topk(k=4)", "downlink-feedback=ef21p"]
#: mechanism -> (config overrides, the client's memory key, the server's running-mean key)
MECHANISMS = {
    "ef21": (["feedback=ef21", "compressor=topk(k=2)", *DOWN], "feedback.g", "g"),
    "efbv": (["feedback=efbv(lam=0.5, nu=1.0)", "compressor=randk(k=3)", *DOWN], "feedback.h", "h"),
    "diana": (["feedback=diana", "compressor=randk(k=3)", *DOWN], "feedback.h", "h"),
    "ef21-plain-down": (["feedback=ef21", "compressor=topk(k=2)"], "feedback.g", "g"),
}
FATES = ("ok", "lost", "late")


class FeedbackProtocol(RuleBasedStateMachine):
    @initialize(name=st.sampled_from(sorted(MECHANISMS)))
    def start(self, name: str) -> None:
        overrides, self.client_key, self.server_key = MECHANISMS[name]
        self.cfg = resolve(overrides=[*TASK, *overrides])
        self.server = Server(self.cfg)
        self.client = client_half(self.cfg)
        self.states: dict[int, dict[str, torch.Tensor]] = {pid: {} for pid in range(N)}
        #: messages whose replies will come too late: the client reads them before its next message
        self.late: list[tuple[int, dict[str, bytes], dict[str, object]]] = []
        #: the replies to those messages, which reach the server in a later round
        self.stale: list[tuple[int, object]] = []
        self.round = 0
        shares = torch.tensor(self.server.algorithm.shares(self.server.task), dtype=torch.float64)
        self.shares = shares / shares.sum()

    def _process_late(self) -> None:
        for pid, payloads, config in self.late:
            try:
                self.stale.append((pid, self.client.train(pid, payloads, config, self.states[pid])))
            except (FeedbackError, PayloadError, ValueError):
                pass  # an error reply, which the server ignores
        self.late = []

    @rule(
        chosen=st.sets(st.integers(0, N - 1), min_size=1),
        fates=st.lists(st.sampled_from(FATES), min_size=N, max_size=N),
        applied=st.booleans(),
    )
    def round_(self, chosen: set[int], fates: list[str], applied: bool) -> None:
        self.round += 1
        self._process_late()
        ids = sorted(chosen)
        outbox = self.server.broadcast(self.round, ids)
        replies = []
        for pid in ids:
            fate = fates[pid]
            if fate == "late":
                self.late.append((pid, outbox.payloads[pid], outbox.config[pid]))
                continue
            result = self.client.train(pid, outbox.payloads[pid], outbox.config[pid], self.states[pid])
            if fate == "ok":
                replies.append((pid, result))
        self.server.begin(self.round)
        for pid, result in self.stale:  # a reply to an earlier round's message is refused
            try:
                self.server.take(result.payloads, result.report(pid), pid, pid)
            except InvalidReply:
                continue
            raise AssertionError(
                f"the server took client {pid}'s reply to round {result.server_round} in round {self.round}"
            )
        self.stale = []
        for pid, result in replies:  # in partition order, as the round loop takes them
            self.server.take(result.payloads, result.report(pid), pid, pid)
        self.server.finish(self.round, step=applied)

    @rule()
    def late_replies_arrive(self) -> None:
        """Clients read their late messages while the server waits between rounds."""
        self._process_late()

    # ---- what both halves must agree on ---------------------------------------------------------

    def _settled(self, pid: int) -> dict[str, torch.Tensor]:
        """Client pid's memory once it settles its pending update against the server's acknowledgement."""
        state = copy.deepcopy(self.states[pid])
        self.client.settle(state, self.server.accepted.get(pid, 0))
        return state

    @invariant()
    def running_mean_is_the_mean_of_client_memory(self) -> None:
        if not hasattr(self, "server"):
            return
        settled = [self._settled(pid) for pid in range(N)]
        running = self.server.aggregator.state.get(self.server_key)
        memory = [s.get(self.client_key) for s in settled]
        if running is None:
            assert all(m is None for m in memory), "clients hold memory the server never took in"
            return
        mean = sum(self.shares[pid] * m.to(torch.float64) for pid, m in enumerate(memory) if m is not None)
        torch.testing.assert_close(running.to(torch.float64), torch.as_tensor(mean, dtype=torch.float64).expand_as(
            running), rtol=1e-5, atol=1e-6)  # fmt: skip
        seen = self.server.aggregator.state.get("seen")
        if seen is not None:
            assert seen.tolist() == [m is not None for m in memory]

    @invariant()
    def synced_clients_hold_the_servers_downlink_model(self) -> None:
        down = getattr(getattr(self, "server", None), "downlink_server", None)
        if down is None:
            return
        for pid, step in self.server.synced.items():
            if step == down.step:
                state = self.states[pid]
                assert int(state["feedback.w_step"]) == step
                assert torch.equal(state["feedback.w"], down.w), f"client {pid}'s w differs from the server's"


FeedbackProtocol.TestCase.settings = settings(
    max_examples=60, stateful_step_count=12, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_feedback_protocol = FeedbackProtocol.TestCase
