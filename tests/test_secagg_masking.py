"""Secure aggregation, the pure layer: Shamir sharing, masks, quantisation and the four stages with
every client and the server in memory (fedsqueeze.secagg)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from fedsqueeze.secagg import masking, quantize, shamir
from fedsqueeze.secagg.session import ClientSession, RoundParams, SecAggAbort, SecAggError, ServerSession

STAGES = ("advertise", "share", "masked", "unmask")


def params(n: int, t: int, length: int, server_round: int = 1, word: int = 16, **changes) -> RoundParams:
    values = dict(
        run_uid="00ff", server_round=server_round, nonce=os.urandom(16), cohort=tuple(range(n)), threshold=t,
        bits=8, word=word, length=length, clip=1.0, round_seed=7,
    )  # fmt: skip
    values.update(changes)
    return RoundParams(**values)


def run_round(p: RoundParams, qs: dict[int, np.ndarray], drop: dict[str, set[int]] | None = None,
              clients: dict[int, ClientSession] | None = None) -> tuple[np.ndarray, list[int], dict]:  # fmt: skip
    """One round among in-memory sessions; `drop[stage]` clients do not answer that stage (nor later).
    Returns (the unmasked sum, U2, every message the server received)."""
    drop = drop or {}
    gone: set[int] = set()
    clients = clients if clients is not None else {i: ClientSession(i) for i in p.cohort}
    server = ServerSession(p)
    seen: dict[str, dict[int, object]] = {s: {} for s in STAGES}

    def alive(stage: str) -> list[int]:
        gone.update(drop.get(stage, set()))
        return [i for i in p.cohort if i not in gone]

    replies = {i: clients[i].advertise(p) for i in alive("advertise")}
    seen["advertise"] = dict(replies)
    keys = server.advertised(replies)
    replies = {i: clients[i].share(p, keys) for i in alive("share") if i in keys}
    seen["share"] = dict(replies)
    routed = server.shared(replies)
    ys = {}
    for i in alive("masked"):
        if i in routed:
            clients[i].receive(p, server.u1, routed[i])
            ys[i] = clients[i].mask(p, qs[i])
    seen["masked"] = dict(ys)
    survivors, dropped = server.masked(ys)
    replies = {i: clients[i].unmask(p, survivors, dropped) for i in alive("unmask") if i in survivors}
    seen["unmask"] = dict(replies)
    return server.unmasked(replies), survivors, seen


def encoded(n: int, length: int, seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.integers(0, 256, length).astype(np.uint16) for i in range(n)}


def plain_sum(qs: dict[int, np.ndarray], who: list[int]) -> np.ndarray:
    return sum((qs[i].astype(np.int64) for i in who), np.zeros_like(qs[who[0]], dtype=np.int64))


# ---- Shamir -----------------------------------------------------------------------------------


def test_the_prime_is_prime_and_above_every_secret():
    assert shamir.PRIME > 2**256
    # Miller-Rabin with the first 20 prime bases (no composite below 3.3e24 passes them; a random
    # 257-bit composite passes one base with probability below 1/4)
    n, d, s = shamir.PRIME, shamir.PRIME - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for a in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67, 71):
        x = pow(a, d, n)
        assert x in (1, n - 1) or any(pow(x, 2**r, n) == n - 1 for r in range(1, s))


def test_any_threshold_of_shares_gives_the_secret_and_fewer_are_refused():
    secret = os.urandom(32)
    shares = shamir.split(secret, 4, range(1, 8))
    rng = np.random.default_rng(1)
    for _ in range(10):
        pick = rng.choice(np.arange(1, 8), size=int(rng.integers(4, 8)), replace=False)
        assert shamir.combine({int(x): shares[int(x)] for x in pick}, 4) == secret
    with pytest.raises(shamir.ShamirError, match="fewer than the threshold"):
        shamir.combine({x: shares[x] for x in (1, 2, 3)}, 4)
    # t - 1 shares are consistent with every secret: the 0-share polynomial through them and any s exists,
    # so a wrong share makes the result a different secret, never an error-free right one
    tampered = dict(shares)
    tampered[2] = ((int.from_bytes(shares[2], "big") + 1) % shamir.PRIME).to_bytes(33, "big")
    assert shamir.combine({x: tampered[x] for x in (1, 2, 3, 4)}, 4) != secret


# ---- the masks ----------------------------------------------------------------------------------


def test_modulus_holds_the_largest_sum():
    for n, b, m in [(10, 8, 12), (100, 8, 15), (50, 4, 10), (1000, 1, 10), (100, 16, 23)]:
        assert masking.modulus_bits(n, b) == m  # the table of the design note
        assert n * (2**b - 1) < 2**m and n * (2**b - 1) >= 2 ** (m - 1)
    assert masking.word_bits(257, 8) == 16 and masking.word_bits(258, 8) == 32


def test_the_unmasked_sum_is_the_plaintext_sum_exactly():
    p = params(7, 4, 1000)
    qs = encoded(7, 1000)
    total, survivors, _ = run_round(p, qs)
    assert survivors == list(range(7))
    np.testing.assert_array_equal(total.astype(np.int64), plain_sum(qs, survivors))


@pytest.mark.parametrize("stage", STAGES)
def test_dropouts_at_every_stage_above_the_threshold(stage):
    p = params(7, 4, 300)
    qs = encoded(7, 300, seed=3)
    total, survivors, _ = run_round(p, qs, drop={stage: {1, 5}})
    expected = [i for i in range(7) if stage == "unmask" or i not in (1, 5)]
    assert survivors == expected
    np.testing.assert_array_equal(total.astype(np.int64), plain_sum(qs, survivors))


@pytest.mark.parametrize("stage", STAGES)
def test_below_the_threshold_the_round_is_refused(stage):
    p = params(7, 5, 50)
    with pytest.raises(SecAggAbort, match="fewer than the threshold"):
        run_round(p, encoded(7, 50), drop={stage: {0, 3, 6}})


def test_the_servers_view_of_each_client_is_uniform_mod_2_16():
    """Every y_i the server receives, for an input of all zeros (so nothing but the masks could make it
    uniform): chi-square over all 2^16 values, 2^20 coordinates per client (16 expected per value); the
    statistic is about N(65535, 362^2), so 5 sigma bounds it for a uniform y."""
    length, bins = 1 << 20, 1 << 16
    p = params(3, 2, length)
    qs = {i: np.zeros(length, dtype=np.uint16) for i in range(3)}
    total, _, seen = run_round(p, qs)
    assert not total.any()
    limit = (bins - 1) + 5 * math.sqrt(2 * (bins - 1))
    for i, y in seen["masked"].items():
        counts = np.bincount(y, minlength=bins)
        chi2 = float(((counts - length / bins) ** 2).sum() / (length / bins))
        assert chi2 < limit, (i, chi2)
    # and the statistic sees a mask that is not uniform: one a bit short (15 bits) leaves 2^15 values unused
    biased = seen["masked"][0] & np.uint16(0x7FFF)
    counts = np.bincount(biased, minlength=bins)
    assert float(((counts - length / bins) ** 2).sum() / (length / bins)) > limit


def test_quantisation_is_unbiased_within_the_clip():
    """E[D q - c] = v for |v| <= c: the mean over R draws is within 4.5 standard errors (D / (2 sqrt R)
    bounds the rounding's standard deviation) at every one of 200 coordinates."""
    rng = np.random.default_rng(5)
    v = rng.uniform(-0.5, 0.5, 200)
    reps, clip, bits = 4000, 0.5, 4
    draws = np.stack([quantize.encode(v, clip, bits, 16, rng)[0] for _ in range(reps)])
    decoded = quantize.decode_sum(draws.sum(axis=0), reps, clip, bits) / reps
    step = 2 * clip / quantize.levels(bits)
    assert np.max(np.abs(decoded - v)) < 4.5 * step / (2 * math.sqrt(reps))
    _, clipped = quantize.encode(np.array([0.7, -0.2, -0.9]), clip, bits, 16, rng)
    assert clipped == 2


# ---- the client's refusals ------------------------------------------------------------------------


def _advertised(n: int = 5, t: int = 3):
    p = params(n, t, 20)
    clients = {i: ClientSession(i) for i in range(n)}
    server = ServerSession(p)
    keys = server.advertised({i: c.advertise(p) for i, c in clients.items()})
    return p, clients, server, keys


def test_a_message_of_another_round_or_a_replay_is_refused():
    p, clients, server, keys = _advertised()
    other = params(5, 3, 20, server_round=2)
    with pytest.raises(SecAggError, match="matches no session"):
        clients[0].share(other, keys)
    routed = server.shared({i: c.share(p, keys) for i, c in clients.items()})
    with pytest.raises(SecAggError, match="out of order"):
        clients[0].share(p, keys)  # the share stage again
    # an older round's advertise, and the same nonce again, are replays
    clients[1].receive(p, server.u1, routed[1])
    with pytest.raises(SecAggError, match="older than round"):
        ClientSession(1, {"last-round": 3}).advertise(p)
    fresh = ClientSession(1)
    fresh.advertise(p)
    with pytest.raises(SecAggError, match="nonce was already used"):
        fresh.advertise(p)


def test_a_share_of_another_round_does_not_decrypt():
    p, clients, server, keys = _advertised()
    routed = server.shared({i: c.share(p, keys) for i, c in clients.items()})
    q, others, oserver, okeys = _advertised()
    orouted = oserver.shared({i: c.share(q, okeys) for i, c in others.items()})
    forged = dict(routed[0])
    forged[1] = orouted[0][1]  # a ciphertext for client 0 from another round
    with pytest.raises(SecAggError, match="does not decrypt"):
        clients[0].receive(p, server.u1, forged)
    swapped = dict(routed[0])
    swapped[1], swapped[2] = routed[0][2], routed[0][1]  # right round, wrong sender
    with pytest.raises(SecAggError, match="does not decrypt"):
        clients[0].receive(p, server.u1, swapped)


def test_the_client_refuses_to_reveal_both_the_seed_and_the_key_of_one_client():
    p, clients, server, keys = _advertised()
    routed = server.shared({i: c.share(p, keys) for i, c in clients.items()})
    for i, c in clients.items():
        c.receive(p, server.u1, routed[i])
        c.mask(p, np.zeros(20, dtype=np.uint16))
    with pytest.raises(SecAggError, match="both the self-mask seed and the mask key of \\[2\\]"):
        clients[0].unmask(p, [0, 1, 2, 3, 4], [2])
    with pytest.raises(SecAggError, match="exactly U1"):
        clients[0].unmask(p, [0, 1, 2], [])
    clients[0].unmask(p, [0, 1, 2, 3], [4])
    # answered once: asking again (now for 4's seed, which with the key above would unmask it) is refused
    with pytest.raises(SecAggError, match="matches no session"):
        clients[0].unmask(p, [0, 1, 2, 3, 4], [])
    assert set(clients[0].record) == {"last-round", "nonces"}  # the round's secrets are gone


def test_a_key_list_without_the_clients_own_keys_is_refused():
    p, clients, _, keys = _advertised()
    forged = dict(keys)
    forged[0] = keys[1][::-1]
    with pytest.raises(SecAggError, match="own keys"):
        clients[0].share(p, forged)
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        clients[1].share(p, {j: keys[j] for j in (0, 1)})
