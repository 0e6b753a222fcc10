"""The four stages of a secure round, as the client's and the server's state machines (Bonawitz et
al., CCS 2017, figure 4, with the checks of Bell et al., CCS 2020); plain data in and out, no transport.

    advertise  server -> i: the round's parameters            i -> server: c_pk_i, s_pk_i
    share      server -> i: every advertised (c_pk_j, s_pk_j) i -> server: for each j, AEAD_{c_ij}(
                                                                shares of b_i and of s_sk_i for j),
                                                                and a commitment H(ctx, b_i)
    masked     server -> i: U1 (who shared) and the shares     i -> server: y_i = q_i + masks over U1
               addressed to i; i trains and encodes q_i
    unmask     server -> i: U2 (who sent y) and D = U1 - U2    i -> server: shares of b_j, j in U2,
                                                                and of s_sk_j, j in D

The server learns sum_{i in U2} q_i and nothing else about the q_i as long as fewer than t clients
collude with it: it can reconstruct, for any client, either its self-mask seed b_i (if the client
sent y) or its mask key s_sk_i (if it did not), never both, because an honest client answers the
unmask stage once per round and refuses a request that names one client in both U2 and D; with
t > |U1| / 2 no two disjoint groups of clients can each reach the threshold. Messages are bound to
the round's context ctx = H(run, round, server nonce, parameters): a message of another round,
another run or a replayed stage is refused, and shares of another round do not decrypt. Every
secret (both key pairs, b_i) is fresh for each round and comes from the operating system; it lives
in the client's session record, which the client keeps and wipes after the unmask stage.
Dropouts: a client absent in advertise or share is left out of U1 (nobody masks with it); one absent
in masked is recovered from its s_sk shares; fewer than t at any stage abort the round
(`SecAggAbort`): it is skipped, never decoded from an incomplete set.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from . import masking, shamir

#: nonce bytes of a round (the server's fresh randomness bound into ctx)
NONCE_BYTES = 16
_CHANNEL = b"fedsqueeze/secagg/channel"
_AEAD_NONCE = 12
_COMMIT = b"fedsqueeze/secagg/commit"
# client session stages, in order
ADVERTISED, SHARED, MASKED = 1, 2, 3


class SecAggError(ValueError):
    """A stage message that a client refuses (wrong round, replay, out of order, a request that
    would reveal a client's input); the message says why."""


class SecAggAbort(RuntimeError):
    """A round that cannot be decoded (too few clients or shares at some stage): it is skipped."""


@dataclass(frozen=True)
class RoundParams:
    """What the server announces for a round; every stage message carries it again."""

    run_uid: str
    server_round: int
    nonce: bytes
    #: the sampled cohort (partition ids), sorted
    cohort: tuple[int, ...]
    threshold: int
    bits: int
    word: int
    #: coordinates of the masked vector
    length: int
    clip: float
    #: the round's shared seed (the support every client sends), bound into ctx
    round_seed: int = 0

    def context(self) -> bytes:
        text = "|".join(
            str(v) for v in (
                "fedsqueeze/secagg/v1", self.run_uid, self.server_round, self.nonce.hex(),
                ",".join(map(str, self.cohort)), self.threshold, self.bits, self.word, self.length,
                repr(float(self.clip)), self.round_seed,
            )
        )  # fmt: skip
        return hashlib.sha256(text.encode()).digest()

    def to_record(self) -> dict[str, int | float | str | bytes]:
        return {
            "run-uid": self.run_uid, "server-round": self.server_round, "nonce": self.nonce,
            "cohort": ",".join(map(str, self.cohort)), "threshold": self.threshold, "bits": self.bits,
            "word": self.word, "length": self.length, "clip": float(self.clip), "round-seed": self.round_seed,
        }  # fmt: skip

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> RoundParams:
        try:
            cohort = tuple(int(p) for p in str(record["cohort"]).split(",") if p)
            params = cls(
                run_uid=str(record["run-uid"]),
                server_round=int(record["server-round"]),  # type: ignore[call-overload]
                nonce=bytes(record["nonce"]),
                cohort=cohort,
                threshold=int(record["threshold"]),  # type: ignore[call-overload]
                bits=int(record["bits"]),  # type: ignore[call-overload]
                word=int(record["word"]),  # type: ignore[call-overload]
                length=int(record["length"]),  # type: ignore[call-overload]
                clip=float(record["clip"]),
                round_seed=int(record["round-seed"]),  # type: ignore[call-overload]
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SecAggError(f"unreadable round parameters: {exc!r}") from None
        if len(params.nonce) != NONCE_BYTES or params.word not in masking.WORDS or params.length < 0:
            raise SecAggError("round parameters out of range (nonce, word or length)")
        return params


def _channel_ad(ctx: bytes, src: int, dst: int) -> bytes:
    return ctx + src.to_bytes(8, "big") + dst.to_bytes(8, "big")


def commitment(ctx: bytes, seed: bytes) -> bytes:
    return hashlib.sha256(_COMMIT + ctx + seed).digest()


def _ids(values: Sequence[int]) -> list[int]:
    ids = [int(v) for v in values]
    if len(set(ids)) != len(ids):
        raise SecAggError(f"a client is listed twice in {ids}")
    return ids


class ClientSession:
    """One client's side of a round; `record` is what it keeps between stages (bytes, ints and
    strings only, so that Flower's ConfigRecord or any key-value store can hold it)."""

    def __init__(self, own: int, record: Mapping[str, object] | None = None) -> None:
        self.own = own
        self.record: dict[str, object] = dict(record or {})

    def _bytes(self, key: str) -> bytes:
        return bytes(self.record[key])

    # ---- checks common to every stage
    def _expect(self, params: RoundParams, stage: int) -> bytes:
        ctx = params.context()
        if self.record.get("ctx") != ctx:
            raise SecAggError(
                f"a stage message for round {params.server_round} that matches no session of this client "
                "(another round or run, a changed parameter, or a session already closed)"
            )
        if self.record.get("stage") != stage:
            raise SecAggError(f"stage out of order: the session is at stage {self.record.get('stage')}, "
                              f"this message needs stage {stage} (a replay or a skipped stage)")  # fmt: skip
        return ctx

    def advertise(self, params: RoundParams) -> dict[str, bytes]:
        """Fresh key pairs for the round; the reply is the two public keys."""
        last_round = int(self.record.get("last-round", 0))  # type: ignore[call-overload]
        if params.server_round < last_round:
            raise SecAggError(f"round {params.server_round} is older than round {last_round}, which this client "
                              "has already taken part in (a replay)")  # fmt: skip
        if params.nonce in bytes(self.record.get("nonces", b"")):
            raise SecAggError("this round's nonce was already used (a replayed advertise message)")
        if self.own not in params.cohort:
            raise SecAggError(f"client {self.own} is not in the announced cohort {list(params.cohort)}")
        if not len(params.cohort) / 2 < params.threshold <= len(params.cohort):
            raise SecAggError(f"threshold {params.threshold} must be above half the cohort of {len(params.cohort)}")
        c_sk, c_pk = masking.new_keypair()
        s_sk, s_pk = masking.new_keypair()
        # nonces of this round so far (a resumed server may run a round again, with a fresh nonce)
        nonces = bytes(self.record.get("nonces", b"")) if last_round == params.server_round else b""
        self.record = {
            "last-round": params.server_round, "nonces": nonces + params.nonce,
            "ctx": params.context(), "stage": ADVERTISED, "c-sk": c_sk, "s-sk": s_sk,
        }  # fmt: skip
        return {"c-pk": c_pk, "s-pk": s_pk}

    def share(self, params: RoundParams, keys: Mapping[int, tuple[bytes, bytes]]) -> dict[str, bytes]:
        """Check the advertised keys; Shamir-share b_i and s_sk_i over them; encrypt each share for its holder."""
        ctx = self._expect(params, ADVERTISED)
        c_sk, s_sk = self._bytes("c-sk"), self._bytes("s-sk")
        ids = _ids(list(keys))
        if keys.get(self.own) != (masking.public_of(c_sk), masking.public_of(s_sk)):
            raise SecAggError("the key list does not hold this client's own keys as it advertised them")
        if not set(ids) <= set(params.cohort):
            raise SecAggError(f"keys of clients {sorted(set(ids) - set(params.cohort))} outside the cohort")
        if len(ids) < params.threshold:
            raise SecAggError(f"{len(ids)} clients advertised keys, fewer than the threshold {params.threshold}")
        flat = [k for pair in keys.values() for k in pair]
        if len(set(flat)) != len(flat) or any(len(k) != masking.KEY_BYTES for k in flat):
            raise SecAggError("the advertised keys are not distinct 32-byte keys")
        seed = _random_seed()
        xs = [j + 1 for j in ids]
        seed_shares = shamir.split(seed, params.threshold, xs)
        key_shares = shamir.split(s_sk, params.threshold, xs)
        reply: dict[str, bytes] = {"commit": commitment(ctx, seed)}
        for j in ids:
            plain = seed_shares[j + 1] + key_shares[j + 1]
            if j == self.own:
                self.record[f"held.{j}"] = plain
                continue
            key = masking.agree(c_sk, keys[j][0], ctx, _CHANNEL, self.own, j)
            nonce = _random_seed()[:_AEAD_NONCE]
            reply[f"to.{j}"] = nonce + ChaCha20Poly1305(key).encrypt(nonce, plain, _channel_ad(ctx, self.own, j))
        self.record.update({f"c-pk.{j}": keys[j][0] for j in ids})
        self.record.update({f"s-pk.{j}": keys[j][1] for j in ids})
        self.record.update({"seed": seed, "stage": SHARED, "u0": ",".join(map(str, ids))})
        return reply

    def receive(self, params: RoundParams, u1: Sequence[int], ciphertexts: Mapping[int, bytes]) -> None:
        """Check U1 and decrypt the shares the other members of U1 sent this client."""
        ctx = self._expect(params, SHARED)
        members = _ids(u1)
        u0 = {int(p) for p in str(self.record["u0"]).split(",")}
        if self.own not in members or not set(members) <= u0:
            raise SecAggError(f"U1 {members} must hold this client and only clients that advertised keys")
        if len(members) < params.threshold:
            raise SecAggError(f"{len(members)} clients shared, fewer than the threshold {params.threshold}")
        if set(ciphertexts) != set(members) - {self.own}:
            raise SecAggError("the shares sent to this client are not exactly those of the other members of U1")
        c_sk = self._bytes("c-sk")
        for j, blob in ciphertexts.items():
            key = masking.agree(c_sk, self._bytes(f"c-pk.{j}"), ctx, _CHANNEL, self.own, j)
            try:
                aad = _channel_ad(ctx, j, self.own)
                plain = ChaCha20Poly1305(key).decrypt(blob[:_AEAD_NONCE], blob[_AEAD_NONCE:], aad)
            except InvalidTag:
                raise SecAggError(f"the share from client {j} does not decrypt for this round and pair") from None
            self.record[f"held.{j}"] = plain
        self.record["u1"] = ",".join(map(str, members))

    def mask(self, params: RoundParams, q: np.ndarray) -> np.ndarray:
        """y_i: the encoded vector under the self mask and the pairwise masks with every other member of U1."""
        ctx = self._expect(params, SHARED)
        if "u1" not in self.record:
            raise SecAggError("no U1 received this round: the shares must come before the masked upload")
        if q.size != params.length:
            raise SecAggError(f"the encoded vector has {q.size} coordinates, the round masks {params.length}")
        members = [int(p) for p in str(self.record["u1"]).split(",")]
        s_sk = self._bytes("s-sk")
        pair_keys = {
            j: masking.agree(s_sk, self._bytes(f"s-pk.{j}"), ctx, masking.PAIR, self.own, j)
            for j in members
            if j != self.own
        }
        y = masking.mask(q, self.own, self._bytes("seed"), pair_keys, ctx, params.word)
        self.record["stage"] = MASKED
        return y

    def unmask(self, params: RoundParams, survivors: Sequence[int], dropped: Sequence[int]) -> dict[str, bytes]:
        """The shares the server needs: of b_j for j that sent y, of s_sk_j for j that did not. Answered
        once; a request naming a client in both lists (both its seed and its key) is refused."""
        self._expect(params, MASKED)
        sent, lost = _ids(survivors), _ids(dropped)
        both = set(sent) & set(lost)
        if both:
            raise SecAggError(f"the server asks for both the self-mask seed and the mask key of {sorted(both)}: "
                              "that would reveal their inputs")  # fmt: skip
        members = {int(p) for p in str(self.record["u1"]).split(",")}
        if set(sent) | set(lost) != members:
            raise SecAggError("U2 and D must together be exactly U1")
        if len(sent) < params.threshold:
            raise SecAggError(f"{len(sent)} clients sent y, fewer than the threshold {params.threshold}")
        half = shamir.SHARE_BYTES
        reply = {}
        for j in sent:
            reply[f"seed.{j}"] = self._bytes(f"held.{j}")[:half]
        for j in lost:
            reply[f"key.{j}"] = self._bytes(f"held.{j}")[half:]
        self.close()
        return reply

    def close(self) -> None:
        """Wipe the round's secrets; keep what refuses replays."""
        self.record = {k: self.record[k] for k in ("last-round", "nonces") if k in self.record}


def _random_seed() -> bytes:
    return os.urandom(masking.KEY_BYTES)


class ServerSession:
    """The server's side of a round: who is in each stage, what to route, and the unmasked sum."""

    def __init__(self, params: RoundParams) -> None:
        self.params = params
        self.ctx = params.context()
        self.keys: dict[int, tuple[bytes, bytes]] = {}
        self.u1: list[int] = []
        self.commits: dict[int, bytes] = {}
        self.sealed: dict[int, dict[int, bytes]] = {}
        self.y: dict[int, np.ndarray] = {}

    def _enough(self, count: int, stage: str) -> None:
        if count < self.params.threshold:
            raise SecAggAbort(f"{count} clients in the {stage} stage, fewer than the threshold {self.params.threshold}")

    def advertised(self, replies: Mapping[int, Mapping[str, bytes]]) -> dict[int, tuple[bytes, bytes]]:
        """U0 and the key list every member gets."""
        for pid in sorted(replies):
            r = replies[pid]
            pair = (bytes(r.get("c-pk", b"")), bytes(r.get("s-pk", b"")))
            if pid in self.params.cohort and all(len(k) == masking.KEY_BYTES for k in pair):
                self.keys[pid] = pair
        flat = [k for pair in self.keys.values() for k in pair]
        if len(set(flat)) != len(flat):
            raise SecAggAbort("two clients advertised the same key")
        self._enough(len(self.keys), "advertise")
        return dict(self.keys)

    def shared(self, replies: Mapping[int, Mapping[str, bytes]]) -> dict[int, dict[int, bytes]]:
        """U1 (members of U0 whose shares reach every other member) and the shares addressed to each."""
        u0 = set(self.keys)
        for pid in sorted(replies):
            r = replies[pid]
            targets = {int(k[3:]) for k in r if k.startswith("to.")}
            if pid in u0 and targets == u0 - {pid} and len(r.get("commit", b"")) == 32:
                self.sealed[pid] = {j: bytes(r[f"to.{j}"]) for j in targets}
                self.commits[pid] = bytes(r["commit"])
        self.u1 = sorted(self.sealed)
        self._enough(len(self.u1), "share")
        return {j: {i: self.sealed[i][j] for i in self.u1 if i != j} for j in self.u1}

    def masked(self, replies: Mapping[int, np.ndarray]) -> tuple[list[int], list[int]]:
        """(U2, D): who sent a well-formed y, and the members of U1 who did not."""
        dtype = masking.WORDS[self.params.word]
        for pid in sorted(replies):
            y = replies[pid]
            if pid in self.u1 and y.dtype == dtype and y.shape == (self.params.length,):
                self.y[pid] = y
        survivors = sorted(self.y)
        self._enough(len(survivors), "masked")
        return survivors, [p for p in self.u1 if p not in self.y]

    def unmasked(self, replies: Mapping[int, Mapping[str, bytes]]) -> np.ndarray:
        """sum_{i in U2} q_i (mod 2^word) from the masked vectors and the shares the survivors revealed."""
        p = self.params
        survivors = sorted(self.y)
        dropped = [j for j in self.u1 if j not in self.y]
        answered = {i: r for i, r in replies.items() if i in self.y}
        self._enough(len(answered), "unmask")
        out = masking.total((self.y[i] for i in survivors), p.length, p.word)
        for j in survivors:
            seed = self._reconstruct(answered, f"seed.{j}", j)
            if commitment(self.ctx, seed) != self.commits[j]:
                raise SecAggAbort(f"the shares of client {j}'s seed do not open its commitment")
            out -= masking.self_mask(seed, self.ctx, p.length, p.word)
        for j in dropped:
            s_sk = self._reconstruct(answered, f"key.{j}", j)
            if masking.public_of(s_sk) != self.keys[j][1]:
                raise SecAggAbort(f"the shares of client {j}'s mask key do not give its advertised key")
            for i in survivors:  # undo i's pairwise term with j, which no y of j cancels
                key = masking.agree(s_sk, self.keys[i][1], self.ctx, masking.PAIR, i, j)
                masking.apply_pairs(out, i, {j: key}, p.word, sign=-1)
        return out

    def _reconstruct(self, answered: Mapping[int, Mapping[str, bytes]], name: str, owner: int) -> bytes:
        shares = {i + 1: bytes(r[name]) for i, r in answered.items() if name in r}
        try:
            return shamir.combine(shares, self.params.threshold)
        except shamir.ShamirError as exc:
            raise SecAggAbort(f"client {owner}: {exc}") from None
