"""Fuzzing campaign for `fedsqueeze.wire.decode`: millions of hostile inputs in one command.

    python benchmarks/fuzz_wire.py --inputs 1000000 [--seed 0] [--engine numpy|hypothesis]
                                   [--out benchmarks/results/fuzz_wire.json]
                                   [--failures benchmarks/results/fuzz_wire_failures]

Inputs are valid payloads of every operator (and of chains of them, over several sizes and input
dtypes) mutated by bit flips, byte overwrites with boundary values, truncations, insertions,
deletions, duplicated ranges, splices of two payloads and planted oversized varints, plus plain
random bytes; about one in seven is decoded against a wrong expected size. The contract checked for
each one (DESIGN.md, "Contracts"): decode raises PayloadError and nothing else, or returns a
Compressed of exactly the expected numel whose dense form has shape (numel,) and the payload's dtype
and which re-encodes to bytes that decode to the same bits.

Engines: `numpy` (default) draws each mutation from a seeded numpy generator (input i of seed s is
reproducible); `hypothesis` lets Hypothesis draw the same mutation programs (slower per input; its
byte-level choices are biased towards boundary values). A failing input is written to the failures
folder (`<index>-numel<n>.bin`, with the traceback in a `.txt` beside it) and the campaign goes on;
the exit status is 1 if anything failed. Progress and the final rate go to stderr, a summary to --out.
This is a campaign, not a test: the suite's tests/test_wire_fuzz.py runs a few hundred inputs per property.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedsqueeze.compressors import Compressed, build
from fedsqueeze.wire import PayloadError, decode, encode

#: every operator, chains of them, and argument choices that reach each payload kind and index coding
SPECS = [
    "identity",
    "fp16",
    "bf16",
    "topk(0.3)",
    "topk(0.05)",
    "randk(0.3)",
    "randk(0.2, scaled=false)",
    "bernoulli(0.3)",
    "qsgd(levels=1)",
    "qsgd(levels=16)",
    "qsgd(levels=256, norm=linf)",
    "natural",
    "sign",
    "scaled_sign",
    "powersgd(rank=1)",
    "powersgd(rank=2)",
    "topk(0.3) | qsgd(levels=16)",
    "topk(0.5) | randk(0.5)",
    "topk(0.3) | fp16",
    "randk(0.5) | natural",
    "topk(0.5) | sign",
]
SIZES = [1, 2, 3, 8, 17, 64, 257, 1000]
INPUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INTERESTING_BYTES = [0x00, 0x01, 0x02, 0x7F, 0x80, 0x81, 0xFE, 0xFF]
#: varints planted into payloads: lengths, counts and sizes at the edges of every integer width
BIG_VARINTS = [2**7, 2**14, 2**31 - 1, 2**31, 2**32, 2**32 + 1, 2**53, 2**63 - 1, 2**64 - 1]


def layout_for(n: int) -> list[tuple[int, ...]]:
    """A model-like layout of n coordinates for the matrix operators: one matrix and the rest a vector."""
    rows = max(1, int(n**0.5))
    cols = n // rows
    rest = n - rows * cols
    return [(rows, cols), (rest,)] if rest else [(rows, cols)]


def seed_corpus() -> list[tuple[bytes, int, str]]:
    """(payload bytes, numel, where from) for every spec, size and input dtype that compresses."""
    corpus = []
    for spec in SPECS:
        for n in SIZES:
            op = build(spec, layout=layout_for(n))
            for dtype in INPUT_DTYPES:
                gen = torch.Generator().manual_seed(n * 7919 + len(corpus))
                x = torch.randn(n, generator=gen)
                if n > 4:
                    x[:: max(2, n // 3)] = 0.0  # zeros: empty sign bits, skipped quantisation levels
                try:
                    c = op.compress(x.to(dtype), gen)
                except (ValueError, TypeError, RuntimeError):  # an operator that refuses this dtype or size
                    continue
                corpus.append((encode(c), n, f"{spec} n={n} {str(dtype).removeprefix('torch.')}"))
    return corpus


# ---- the randomness a mutation draws from (numpy, or Hypothesis) -------------------------------------


class NumpySource:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi]."""
        return int(self.rng.integers(lo, hi + 1))

    def bytes(self, n: int) -> bytes:
        return self.rng.bytes(n)


class HypothesisSource:
    def __init__(self, data) -> None:  # type: ignore[no-untyped-def]
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, hi))

    def bytes(self, n: int) -> bytes:
        return self.data.draw(self.st.binary(min_size=n, max_size=n))


# ---- mutations -------------------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def mutate(data: bytes, other: bytes, r: NumpySource | HypothesisSource) -> bytes:
    """One mutation of `data` (`other` is a second corpus entry, for splices)."""
    b = bytearray(data)
    kind = r.int(0, 8)
    if not b and kind not in (3, 8):
        kind = 3
    if kind == 0:  # flip one bit
        bit = r.int(0, 8 * len(b) - 1)
        b[bit >> 3] ^= 1 << (bit & 7)
    elif kind == 1:  # overwrite a byte with a random or a boundary value
        b[r.int(0, len(b) - 1)] = r.int(0, 255) if r.int(0, 1) else INTERESTING_BYTES[r.int(0, 7)]
    elif kind == 2:  # truncate
        del b[r.int(0, len(b) - 1) :]
    elif kind == 3:  # insert random bytes
        at = r.int(0, len(b))
        b[at:at] = r.bytes(r.int(1, 16))
    elif kind == 4:  # delete a range
        at = r.int(0, len(b) - 1)
        del b[at : at + r.int(1, 16)]
    elif kind == 5:  # duplicate a range in place
        at = r.int(0, len(b) - 1)
        b[at:at] = b[at : at + r.int(1, 32)]
    elif kind == 6:  # splice: a prefix of this payload and a suffix of another
        b = b[: r.int(0, len(b))] + bytearray(other[r.int(0, len(other)) :])
    elif kind == 7:  # plant an oversized varint (a length, count or size field) over some bytes
        at = r.int(0, len(b) - 1)
        v = _varint(BIG_VARINTS[r.int(0, len(BIG_VARINTS) - 1)])
        b[at : at + r.int(0, len(v))] = v
    else:  # append random bytes
        b += r.bytes(r.int(1, 32))
    return bytes(b)


def make_input(corpus: list[tuple[bytes, int, str]], r: NumpySource | HypothesisSource) -> tuple[bytes, int, str]:
    """(bytes, expected numel, how it was made) for one fuzz input."""
    if r.int(0, 9) == 0:
        numel = SIZES[r.int(0, len(SIZES) - 1)] if r.int(0, 3) else r.int(0, 3)
        return r.bytes(r.int(0, 300)), numel, "random bytes"
    data, numel, origin = corpus[r.int(0, len(corpus) - 1)]
    other = corpus[r.int(0, len(corpus) - 1)][0]
    steps = r.int(1, 4)
    for _ in range(steps):
        data = mutate(data, other, r)
    if r.int(0, 6) == 0:  # the expected layout disagrees with the payload
        numel = max(0, numel + r.int(-2, 2)) if r.int(0, 1) else SIZES[r.int(0, len(SIZES) - 1)]
    return data, numel, f"{origin}, {steps} mutation(s)"


# ---- the contract ----------------------------------------------------------------------------------


def check(data: bytes, numel: int) -> bool:
    """True if decode accepted the input, False if it refused it with PayloadError; AssertionError or any
    other exception is a failure of the contract."""
    try:
        c = decode(data, numel)
    except PayloadError:
        return False
    assert isinstance(c, Compressed), f"decode returned {type(c).__name__}"
    assert c.numel == numel, f"decode returned numel {c.numel} for an expected {numel}"
    x = c.to_dense()
    assert x.shape == (numel,) and x.dtype == c.dtype, f"dense form {tuple(x.shape)} {x.dtype}, payload {c.dtype}"
    again = decode(encode(c), numel).to_dense()
    assert again.dtype == x.dtype and torch.equal(again.view(torch.uint8), x.view(torch.uint8)), "re-encoding differs"
    return True


class Campaign:
    def __init__(self, failures_dir: Path, total: int) -> None:
        self.failures_dir = failures_dir
        self.total = total
        self.done = self.accepted = self.refused = 0
        self.failures: list[dict[str, object]] = []
        self.slowest = (0.0, "")
        self.start = time.perf_counter()
        self.last_report = self.start

    def run_one(self, data: bytes, numel: int, origin: str) -> None:
        t0 = time.perf_counter()
        try:
            if check(data, numel):
                self.accepted += 1
            else:
                self.refused += 1
        except Exception as exc:  # noqa: BLE001 - every other exception is what the campaign looks for
            self._save_failure(data, numel, origin, exc)
        took = time.perf_counter() - t0
        if took > self.slowest[0]:
            self.slowest = (took, f"{origin}, {len(data)} bytes, numel {numel}")
        self.done += 1
        now = time.perf_counter()
        if now - self.last_report > 10:
            self.last_report = now
            print(f"{self.done:>10,} / {self.total:,} inputs  {self.rate():,.0f}/s  failures {len(self.failures)}",
                  file=sys.stderr, flush=True)  # fmt: skip

    def rate(self) -> float:
        return self.done / max(time.perf_counter() - self.start, 1e-9)

    def _save_failure(self, data: bytes, numel: int, origin: str, exc: Exception) -> None:
        self.failures_dir.mkdir(parents=True, exist_ok=True)
        stem = self.failures_dir / f"{self.done}-numel{numel}"
        stem.with_suffix(".bin").write_bytes(data)
        stem.with_suffix(".txt").write_text(f"{origin}\nnumel {numel}\n\n{traceback.format_exc()}")
        self.failures.append({"index": self.done, "numel": numel, "origin": origin, "file": str(stem) + ".bin",
                              "error": f"{type(exc).__name__}: {exc}"})  # fmt: skip
        print(f"FAILURE at input {self.done} ({origin}): {type(exc).__name__}: {exc}; saved {stem}.bin",
              file=sys.stderr, flush=True)  # fmt: skip


def run_numpy(corpus: list[tuple[bytes, int, str]], campaign: Campaign, seed: int) -> None:
    source = NumpySource(np.random.default_rng(np.random.SeedSequence([seed, 0xF022])))
    for _ in range(campaign.total):
        campaign.run_one(*make_input(corpus, source))


def run_hypothesis(corpus: list[tuple[bytes, int, str]], campaign: Campaign, seed: int) -> None:
    from hypothesis import HealthCheck, Phase, given, settings, strategies as st  # noqa: I001
    from hypothesis import seed as hypothesis_seed

    @hypothesis_seed(seed)
    @settings(max_examples=campaign.total, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.data())
    def one(data) -> None:  # type: ignore[no-untyped-def]
        campaign.run_one(*make_input(corpus, HypothesisSource(data)))

    one()


ENGINES: dict[str, Callable[[list[tuple[bytes, int, str]], Campaign, int], None]] = {
    "numpy": run_numpy,
    "hypothesis": run_hypothesis,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=float, default=1e6, help="how many inputs to decode (default 1e6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", choices=sorted(ENGINES), default="numpy")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/fuzz_wire.json"))
    parser.add_argument("--failures", type=Path, default=Path("benchmarks/results/fuzz_wire_failures"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    corpus = seed_corpus()
    print(f"seed corpus: {len(corpus)} valid payloads of {len(SPECS)} specs; fuzzing {int(args.inputs):,} inputs "
          f"with the {args.engine} engine", file=sys.stderr)  # fmt: skip
    campaign = Campaign(args.failures, int(args.inputs))
    ENGINES[args.engine](corpus, campaign, args.seed)
    wall = time.perf_counter() - campaign.start
    summary = {
        "machine": platform.platform(),
        "torch": torch.__version__,
        "engine": args.engine,
        "seed": args.seed,
        "inputs": campaign.done,
        "accepted": campaign.accepted,
        "refused": campaign.refused,
        "failures": campaign.failures,
        "wall_s": wall,
        "inputs_per_s": campaign.done / wall,
        "slowest_input_s": campaign.slowest[0],
        "slowest_input": campaign.slowest[1],
        "corpus": len(corpus),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{campaign.done:,} inputs in {wall:.1f} s: {summary['inputs_per_s']:,.0f} inputs/s; "
          f"{campaign.accepted:,} decoded and valid, {campaign.refused:,} refused with PayloadError, "
          f"{len(campaign.failures)} failure(s); slowest input {campaign.slowest[0] * 1e3:.1f} ms; "
          f"summary in {args.out}",
          file=sys.stderr)  # fmt: skip
    return 1 if campaign.failures else 0


if __name__ == "__main__":
    sys.exit(main())
