"""Codec benchmark: throughput and bytes of every operator against same-run baselines.

    python benchmarks/codec.py [--sizes 1e6 1e7] [--repeats 5] [--out benchmarks/results/codec.json]
                               [--keep-freed-memory]

For each dense float32 vector size and operator it measures compress+encode and decode+decompress
throughput (MB/s of dense input, median of the repeats), the bytes on the wire, the
information-theoretic floor where one is defined, bytes/floor, and the compression factor
against dense float32. Baselines measured in the same run: torch.topk on |x| (k = 1 % of d),
a plain memory read (x.sum()), a copy (x.clone()) and a cast (x.half()); the copy and the cast are
what a dense codec has to do at least. Ratios against them are what to compare across machines.
`--keep-freed-memory` measures under the allocator setting of the in-process simulation
(fedsqueeze.simulation.allocator: freed large buffers are reused, so outputs no longer take fresh
pages; the baselines then run under it too).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from functools import partial
from pathlib import Path

import torch

from fedsqueeze import wire
from fedsqueeze.compressors import Compressed, Dense, Natural, Quantized, Sign, Sparse, build

OPERATORS = [
    "identity",
    "fp16",
    "bf16",
    "topk(0.01)",
    "topk(0.001)",
    "randk(0.01)",
    "randk(0.01, scaled=false)",
    "bernoulli(0.01)",
    "qsgd(levels=16)",
    "qsgd(levels=256, norm=linf)",
    "natural",
    "sign",
    "scaled_sign",
    "topk(0.01) | qsgd(levels=16)",
    "topk(0.02) | randk(0.5)",
    "topk(0.01) | fp16",
    "powersgd(rank=4)",
]

VALUE_BITS = {torch.float32: 32, torch.float16: 16, torch.bfloat16: 16}


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls after one warm-up, and the last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def compress_encode(op, x: torch.Tensor, gen: torch.Generator) -> bytes:
    return wire.encode(op.compress(x, gen))


def decode_decompress(op, data: bytes, d: int) -> torch.Tensor:
    return op.decompress(wire.decode(data, d))


def log2_binomial(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


def entropy_bits(symbols: torch.Tensor) -> float:
    """numel times the empirical entropy (bits) of the symbols."""
    _, counts = torch.unique(symbols, return_counts=True)
    p = counts.double() / symbols.numel()
    return float(-(counts.double() * torch.log2(p)).sum())


def value_floor(c: Compressed) -> tuple[float, str] | None:
    """Bits that the values of a payload need at least, and what the floor counts."""
    if isinstance(c, Dense):
        return c.numel * VALUE_BITS[c.values.dtype] + (32 if c.scale != 1.0 else 0), "values"
    if isinstance(c, Quantized):
        signed = torch.where(c.negative, -c.magnitudes.to(torch.int32), c.magnitudes.to(torch.int32))
        return entropy_bits(signed) + 32, "entropy of levels + scale"
    if isinstance(c, Natural):
        signed = torch.where(c.negative, -c.codes.to(torch.int32), c.codes.to(torch.int32))
        return entropy_bits(signed), "entropy of signed exponents"
    return None


def floor_bits(c: Compressed) -> tuple[float, str] | None:
    """The information-theoretic floor of a payload, where one is defined."""
    if isinstance(c, Sign):
        return c.numel + 32, "d sign bits + scale"
    if isinstance(c, Sparse):
        inner = value_floor(c.values)
        if inner is None:
            return None
        k = c.indices.numel()
        if c.seed is not None:
            return 64 + inner[0], f"seed + {inner[1]}"
        return log2_binomial(c.numel, k) + inner[0], f"log2 C(d,k) + {inner[1]}"
    return value_floor(c)


def layout_for(d: int) -> list[tuple[int, ...]]:
    """A model-like layout of d coordinates: square-ish matrices plus a bias vector."""
    rows = 1000
    cols = (d - rows) // rows
    return [(rows, cols), (d - rows * cols,)]


def run(sizes: list[int], repeats: int) -> dict:
    results = {"machine": platform.platform(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    rows = []
    for d in sizes:
        x = torch.randn(d, generator=torch.Generator().manual_seed(0))
        dense_mb = d * 4 / 1e6
        reps = repeats * max(1, min(50, round(1e7 / d)))  # short calls: more of them, for a stable median
        torch_topk = partial(torch.topk, x.abs(), max(1, d // 100))
        t_sum, _ = timed(x.sum, reps)
        t_topk, _ = timed(torch_topk, reps)
        t_clone, _ = timed(x.clone, reps)
        t_half, _ = timed(x.half, reps)
        baselines = {
            "memory_read_mb_s": dense_mb / t_sum,
            "torch_topk_1pct_mb_s": dense_mb / t_topk,
            "clone_mb_s": dense_mb / t_clone,
            "half_mb_s": dense_mb / t_half,
        }
        results[f"baselines_d{d}"] = baselines
        for spec in OPERATORS:
            op = build(spec, layout=layout_for(d))
            gen = torch.Generator().manual_seed(1)
            t_topk, _ = timed(torch_topk, reps)  # the baselines again, next to the operator: machines drift
            t_clone, _ = timed(x.clone, reps)
            t_enc, data = timed(partial(compress_encode, op, x, gen), reps)
            t_dec, _ = timed(partial(decode_decompress, op, data, d), reps)
            floor = floor_bits(wire.decode(data, d))  # the floor of the very payload that was measured
            nbytes = len(data)
            rows.append(
                {
                    "d": d,
                    "operator": spec,
                    "encode_mb_s": dense_mb / t_enc,
                    "decode_mb_s": dense_mb / t_dec,
                    "encode_vs_torch_topk": t_topk / t_enc,
                    "encode_vs_memory_read": t_sum / t_enc,
                    "encode_vs_clone": t_clone / t_enc,
                    "decode_vs_clone": t_clone / t_dec,
                    "bytes": nbytes,
                    "floor_bytes": None if floor is None else floor[0] / 8,
                    "floor": None if floor is None else floor[1],
                    "bytes_over_floor": None if floor is None else nbytes / (floor[0] / 8),
                    "compression_factor": d * 4 / nbytes,
                }
            )
            print(_row_line(rows[-1]), flush=True)
    results["rows"] = rows
    return results


def _row_line(r: dict) -> str:
    ratio = "-" if r["bytes_over_floor"] is None else f"{r['bytes_over_floor']:.3f}"
    return (
        f"d={r['d']:>9,} {r['operator']:<30} enc {r['encode_mb_s']:9.0f} MB/s ({r['encode_vs_torch_topk']:6.2f}x topk)"
        f" {r['encode_vs_clone']:5.2f}x clone  dec {r['decode_mb_s']:9.0f} MB/s {r['decode_vs_clone']:5.2f}x clone"
        f"  {r['bytes']:>11,} B  /floor {ratio:>6}  x{r['compression_factor']:.1f}"
    )


def markdown(results: dict) -> str:
    lines = []
    for key, b in results.items():
        if key.startswith("baselines_d"):
            lines.append(
                f"- d = {int(key.removeprefix('baselines_d')):,}: memory read {b['memory_read_mb_s']:,.0f} MB/s, "
                f"torch.topk(1 %) {b['torch_topk_1pct_mb_s']:,.0f} MB/s, clone() {b['clone_mb_s']:,.0f} MB/s, "
                f"half() {b['half_mb_s']:,.0f} MB/s"
            )
    lines += [
        "",
        "| d | operator | compress+encode MB/s | vs torch.topk | vs clone() | decode+decompress MB/s "
        "| vs clone() | bytes | bytes/floor | factor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        ratio = "n/a" if r["bytes_over_floor"] is None else f"{r['bytes_over_floor']:.3f}"
        lines.append(
            f"| {r['d']:.0e} | `{r['operator']}` | {r['encode_mb_s']:,.0f} | {r['encode_vs_torch_topk']:.1f}x "
            f"| {r['encode_vs_clone']:.2f}x | {r['decode_mb_s']:,.0f} | {r['decode_vs_clone']:.2f}x "
            f"| {r['bytes']:,} | {ratio} | {r['compression_factor']:,.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/codec.json"))
    parser.add_argument("--keep-freed-memory", action="store_true", help="the in-process simulation's allocator")
    args = parser.parse_args()
    if args.keep_freed_memory:
        from fedsqueeze.simulation.allocator import keep_freed_memory

        print("keep_freed_memory:", keep_freed_memory())
    results = run([int(s) for s in args.sizes], args.repeats)
    results["keep_freed_memory"] = bool(args.keep_freed_memory)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print()
    print(markdown(results))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
