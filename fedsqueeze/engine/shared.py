"""Randomness that a round's cohort shares: one seed per round, chosen by the server and sent to every
client in its config (`protocol.ROUND_SEED`).

With `randomness = "shared"` every client of a round compresses with generators drawn from that seed,
one per payload group (so a group's draws never depend on what another group consumed), instead of
from its own (seed, round, client) seed. Randomised operators then draw the same on every client:
`randk` keeps one support for the whole cohort (the sum of the cohort's payloads is a rand-k payload
on that support), `bernoulli` the same coins, `qsgd` and `natural` the same dithers; deterministic
operators (top-k, sign) are unchanged. The variance of the cohort's average is then bounded by omega,
not omega / n: the theory defaults use omega_av = omega (`fedsqueeze.feedback.theory.omega_average`).

The seed is public (the server and every client of the round know it), never a secret. Each use
draws its own stream, separated by its purpose through `derive_seed`, so later protocols of a round
(for example secure aggregation, which needs a support common to the cohort) take theirs with
`SharedSeed.generator("their purpose", ...)` without disturbing the compressors' draws.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedsqueeze.seeding import derive_seed, generator

from . import protocol

#: the purpose of the compressors' streams (one per payload group key)
UPLINK_PURPOSE = "uplink"


def round_seed(run_seed: int, server_round: int) -> int:
    """The shared seed of a round: the same for every client, a function of the run seed and the round."""
    return derive_seed(run_seed, server_round, "round-seed")


@dataclass(frozen=True)
class SharedSeed:
    """A round's shared seed and the streams drawn from it."""

    value: int

    def generator(self, *purpose: object) -> torch.Generator:
        """A generator every client of the round builds the same for the same purpose."""
        return generator(self.value, *purpose)

    def uplink(self, group_keys: Sequence[str]) -> list[torch.Generator]:
        """One generator per payload group, for `UpdatePlan.compress`."""
        return [self.generator(UPLINK_PURPOSE, key) for key in group_keys]


def shared_seed_of(config: Mapping[str, object]) -> SharedSeed:
    """The round seed a server put into a client's config (ValueError if it is missing or not an integer)."""
    value = config.get(protocol.ROUND_SEED)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(
            f"shared randomness needs a non-negative integer {protocol.ROUND_SEED!r} in the config, got {value!r}"
        )
    return SharedSeed(value)
