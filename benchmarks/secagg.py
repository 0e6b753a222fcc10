"""Secure aggregation benchmark: per-client upload bytes and client/server time of one round, against
the plaintext compressed round and dense float32, for n clients and d parameters.

    python benchmarks/secagg.py                           # n = 10, 50, 100; d = 1e5, 1e6
    python benchmarks/secagg.py --clients 10 --dims 100000 --out FILE.json

One round of the protocol in this process, no training and no transport (the bytes are those the
transport would carry: keys, ciphertexts, y, shares): every client's update is a random d-vector,
compressed with shared-seed rand-k (k = ratio d, ratio 0.1) and, with secagg, rounded to b = 8 bits
on [-c, c] and masked in 16-bit words (32 bits above 257 clients), threshold t = n // 2 + 1, no dropout.
Timed, single process (so per-client times are what one client spends, the server's what the server spends):
  plain   client: compress + encode; server: decode + add, over all clients
  secagg  client: its four stages (keys, Shamir shares and encryption, support values, rounding,
          masks, its unmask reply); server: its four stages, the unmasking and the decoding
Columns: up KB/client (all four stages for secagg; the payload for plain and dense), client ms (per
client), server ms (per round). Results go to --out (benchmarks/results/secagg.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from fedsqueeze import wire
from fedsqueeze.engine import secure
from fedsqueeze.engine.payloads import UpdatePlan
from fedsqueeze.engine.shared import SharedSeed
from fedsqueeze.secagg import masking, quantize
from fedsqueeze.secagg.session import ClientSession, RoundParams, ServerSession

HERE = Path(__file__).resolve().parent
RATIO, BITS, CLIP = 0.1, 8, 0.05


def plain_round(plan: UpdatePlan, updates: list[torch.Tensor], seed: SharedSeed) -> dict[str, float]:
    t0 = time.perf_counter()
    payloads = [plan.encode(plan.compress(u, seed.uplink(plan.keys()))) for u in updates]
    t1 = time.perf_counter()
    total = torch.zeros(plan.numel)
    for p in payloads:
        c = [wire.decode(p[g.key], g.numel) for g in plan.groups]
        idx, values = plan.decompress_sparse(c)
        total.index_add_(0, idx, values)
    t2 = time.perf_counter()
    n = len(updates)
    return {"up_bytes": sum(len(b) for p in payloads for b in p.values()) / n,
            "client_ms": 1e3 * (t1 - t0) / n, "server_ms": 1e3 * (t2 - t1)}  # fmt: skip


def secure_round(plan: UpdatePlan, updates: list[torch.Tensor], seed: SharedSeed) -> dict[str, float]:
    n = len(updates)
    client_s, server_s = 0.0, 0.0
    up = 0

    def timed_server(fn, *args):
        nonlocal server_s
        t = time.perf_counter()
        out = fn(*args)
        server_s += time.perf_counter() - t
        return out

    def clients(fn):
        nonlocal client_s, up
        replies = {}
        for i in range(n):
            t = time.perf_counter()
            replies[i] = fn(i)
            client_s += time.perf_counter() - t
            up += sum(len(v) for v in replies[i].values()) if isinstance(replies[i], dict) else replies[i].nbytes
        return replies

    layout = timed_server(secure.supports, plan, seed)
    length = sum(s.size(g.numel) for g, s in zip(plan.groups, layout, strict=True))
    p = RoundParams("bench", 1, os.urandom(16), tuple(range(n)), n // 2 + 1, BITS, masking.word_bits(n, BITS),
                    length, CLIP, seed.value)  # fmt: skip
    server = ServerSession(p)
    sessions = {i: ClientSession(i) for i in range(n)}
    keys = timed_server(server.advertised, clients(lambda i: sessions[i].advertise(p)))
    routed = timed_server(server.shared, clients(lambda i: sessions[i].share(p, keys)))
    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "big"))

    def masked(i: int) -> np.ndarray:
        sessions[i].receive(p, server.u1, routed[i])
        payloads = plan.encode(plan.compress(updates[i], seed.uplink(plan.keys())))
        values = secure.support_values(plan, payloads, secure.supports(plan, seed))
        return sessions[i].mask(p, quantize.encode(values, CLIP, BITS, p.word, rng)[0])

    survivors, dropped = timed_server(server.masked, clients(masked))
    total = timed_server(server.unmasked, clients(lambda i: sessions[i].unmask(p, survivors, dropped)))
    timed_server(lambda: secure.decode_sum(plan, layout, quantize.decode_sum(total, n, CLIP, BITS)))
    return {"up_bytes": up / n, "client_ms": 1e3 * client_s / n, "server_ms": 1e3 * server_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="10,50,100")
    parser.add_argument("--dims", default="100000,1000000")
    parser.add_argument("--out", default=str(HERE / "results" / "secagg.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = []
    print(f"{'n':>4} {'d':>8} {'k':>7} | {'dense KB':>9} | {'plain KB':>9} {'client ms':>9} {'server ms':>9} | "
          f"{'secagg KB':>9} {'client ms':>9} {'server ms':>9} | {'x plain':>7}")  # fmt: skip
    for d in (int(v) for v in args.dims.split(",")):
        plan = UpdatePlan([("w", (d,))], lambda name, numel: (f"randk(ratio={RATIO})", "default"))
        for n in (int(v) for v in args.clients.split(",")):
            gen = torch.Generator().manual_seed(n)
            updates = [torch.randn(d, generator=gen) * (CLIP / 4) for _ in range(n)]
            seed = SharedSeed(12345)
            plain = plain_round(plan, updates, seed)
            sec = secure_round(plan, updates, seed)
            dense = len(
                wire.encode(UpdatePlan([("w", (d,))], lambda a, b: ("identity", "default")).compress(updates[0])[0])
            )
            row = {"n": n, "d": d, "k": round(RATIO * d), "dense_bytes": dense, "plain": plain, "secagg": sec}
            results.append(row)
            print(f"{n:>4} {d:>8} {row['k']:>7} | {dense / 1e3:>9.1f} | {plain['up_bytes'] / 1e3:>9.1f} "
                  f"{plain['client_ms']:>9.1f} {plain['server_ms']:>9.1f} | {sec['up_bytes'] / 1e3:>9.1f} "
                  f"{sec['client_ms']:>9.1f} {sec['server_ms']:>9.1f} | {sec['up_bytes'] / plain['up_bytes']:>7.2f}",
                  flush=True)  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"ratio": RATIO, "bits": BITS, "clip": CLIP, "rows": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
