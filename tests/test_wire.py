"""The wire format: exact round trips, sizes against the information-theoretic floors, the
.proto as the contract, and validation of bad payloads."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsqueeze.compressors.compressed import (
    NATURAL_MAX_CODE,
    Compressed,
    Dense,
    LowRank,
    LowRankBlock,
    Natural,
    Quantized,
    Sign,
    Sparse,
    shared_indices,
)
from fedsqueeze.protos.fedsqueeze.v1 import payload_pb2 as pb
from fedsqueeze.wire import WIRE_VERSION, PayloadError, bits, decode, encode, indices, ints, rice

ROOT = Path(__file__).resolve().parents[1]
FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
INT_VIEW = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


# ---------------------------------------------------------------------------------------------
# payload builders (shared with test_wire_fuzz.py)


def values(n: int, dtype: torch.dtype, gen: torch.Generator, extremes: bool = True) -> torch.Tensor:
    """Finite values of `dtype`, with the extremes of its range mixed in."""
    x = torch.randn(n, generator=gen) * 10.0 ** torch.randint(-3, 4, (n,), generator=gen)
    x = x.to(dtype)
    if extremes and n >= 4:
        info = torch.finfo(dtype)
        x[:4] = torch.tensor([info.max, -info.tiny, info.smallest_normal / 4, -0.0]).to(dtype)
        x = x[torch.randperm(n, generator=gen)]
    return x


def make_dense(n, gen, precision=torch.float32, dtype=torch.float32, scale=1.0) -> Dense:
    return Dense(n, dtype, values(n, precision, gen), scale)


def make_quantized(n, gen, levels=16, density=0.1, dtype=torch.float32) -> Quantized:
    mags = torch.randint(1, levels + 1, (n,), generator=gen).int()
    mags[torch.rand(n, generator=gen) >= density] = 0
    negative = (torch.rand(n, generator=gen) < 0.5) & (mags != 0)
    return Quantized(n, dtype, float(torch.rand(1, generator=gen)) * 10, levels, negative, mags)


def make_natural(n, gen, zeros=0.1, dtype=torch.float32) -> Natural:
    codes = (torch.randn(n, generator=gen) * 4 + 140).round().clamp(1, NATURAL_MAX_CODE).to(torch.int16)
    codes[torch.rand(n, generator=gen) < zeros] = 0
    negative = (torch.rand(n, generator=gen) < 0.5) & (codes != 0)
    return Natural(n, dtype, negative, codes)


def make_sign(n, gen, dtype=torch.float32) -> Sign:
    return Sign(n, dtype, float(torch.rand(1, generator=gen)), torch.rand(n, generator=gen) < 0.5)


def make_sparse(n, k, gen, inner=None, dtype=torch.float32, seed=None) -> Sparse:
    if seed is not None:
        idx = shared_indices(seed, n, k)
    else:
        idx = torch.randperm(n, generator=gen)[:k].sort().values
    inner = inner if inner is not None else make_dense(k, gen)
    return Sparse(n, dtype, idx, inner, seed)


def make_low_rank(shapes, extra, gen, dtype=torch.float32, rest=None) -> LowRank:
    """Blocks of the given (rows, cols, rank) laid out with `extra` loose coordinates between them."""
    blocks, offset, gaps = [], 0, 0
    for rows, cols, rank in shapes:
        offset += 1 if gaps < extra else 0
        gaps += 1 if gaps < extra else 0
        p = torch.randn(rows, rank, generator=gen)
        q = torch.randn(cols, rank, generator=gen)
        blocks.append(LowRankBlock(offset, rows, cols, p, q))
        offset += rows * cols
    n = offset + (extra - gaps)
    rest = rest if rest is not None else make_dense(extra, gen)
    return LowRank(n, dtype, tuple(reversed(blocks)), rest)


def random_payload(rng: np.random.Generator, n: int, depth: int = 1) -> Compressed:
    """A random payload of any kind over n coordinates (n >= 0), nested at most 4 deep."""
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    dtype = FLOATS[rng.integers(len(FLOATS))]
    kinds = ["dense", "quantized", "natural", "sign"] + (["sparse", "low_rank"] if depth < 4 else [])
    kind = kinds[rng.integers(len(kinds))]
    if kind == "dense":
        return make_dense(n, gen, FLOATS[rng.integers(3)], dtype, float(rng.choice([1.0, 0.5, 3e-5])))
    if kind == "quantized":
        levels = int(rng.choice([1, 2, 7, 16, 256, 2**31 - 1]))
        return make_quantized(n, gen, levels, float(rng.random()), dtype)
    if kind == "natural":
        return make_natural(n, gen, float(rng.random()), dtype)
    if kind == "sign":
        return make_sign(n, gen, dtype)
    if kind == "sparse":
        k = int(rng.integers(n + 1))
        seed = int(rng.integers(2**63)) if rng.random() < 0.3 else None
        return make_sparse(n, k, gen, random_payload(rng, k, depth + 1), dtype, seed)
    # low rank: blocks inside n, the rest nested
    shapes, used = [], 0
    while rng.random() < 0.7:
        rows, cols = int(rng.integers(1, 5)), int(rng.integers(1, 5))
        if used + rows * cols > n:
            break
        shapes.append((rows, cols, int(rng.integers(0, min(rows, cols) + 1))))
        used += rows * cols
    extra = n - used
    return make_low_rank(shapes, extra, gen, dtype, random_payload(rng, extra, depth + 1))


# ---------------------------------------------------------------------------------------------
# round trips


def bits_of(x: torch.Tensor) -> torch.Tensor:
    return x.view(INT_VIEW[x.dtype])


def assert_round_trip(c: Compressed) -> tuple[Compressed, bytes]:
    data = encode(c)
    d = decode(data, c.numel)
    assert type(d) is type(c) and d.numel == c.numel and d.dtype == c.dtype
    x, y = c.to_dense(), d.to_dense()
    assert y.dtype == x.dtype and y.shape == (c.numel,)
    assert torch.equal(bits_of(x), bits_of(y)), "dense reconstruction differs"
    assert_same_fields(c, d)
    assert encode(d) == data, "re-encoding the decoded payload gives other bytes"
    return d, data


def assert_same_fields(c: Compressed, d: Compressed) -> None:
    """The decoded payload holds the same information, with the documented CPU dtypes."""
    assert d.dtype == c.dtype and d.numel == c.numel
    if isinstance(c, Dense):
        assert d.values.dtype == c.values.dtype and d.values.device.type == "cpu"
        assert torch.equal(bits_of(d.values), bits_of(c.values.cpu()))
        assert d.scale == float(np.float32(c.scale))
    elif isinstance(c, Sparse):
        assert d.indices.dtype == torch.int64 and torch.equal(d.indices, c.indices.cpu().long())
        assert d.seed == c.seed
        assert_same_fields(c.values, d.values)
    elif isinstance(c, Quantized):
        assert d.magnitudes.dtype == torch.int32 and d.negative.dtype == torch.bool
        assert torch.equal(d.magnitudes, c.magnitudes.cpu().int()) and d.levels == c.levels
        assert torch.equal(d.negative, c.negative.cpu() & (c.magnitudes.cpu() != 0))
        assert d.scale == float(np.float32(c.scale))
    elif isinstance(c, Natural):
        assert d.codes.dtype == torch.int16 and d.negative.dtype == torch.bool
        assert torch.equal(d.codes, c.codes.cpu().to(torch.int16))
        assert torch.equal(d.negative, c.negative.cpu() & (c.codes.cpu() != 0))
    elif isinstance(c, Sign):
        assert d.negative.dtype == torch.bool and torch.equal(d.negative, c.negative.cpu())
        assert d.scale == float(np.float32(c.scale))
    elif isinstance(c, LowRank):
        assert len(d.blocks) == len(c.blocks)
        for a, b in zip(c.blocks, d.blocks, strict=True):
            assert (a.offset, a.rows, a.cols) == (b.offset, b.rows, b.cols)
            assert b.p.dtype == torch.float32 and torch.equal(a.p, b.p) and torch.equal(a.q, b.q)
        assert_same_fields(c.rest, d.rest)


def parse(data: bytes) -> pb.Payload:
    return pb.Payload.FromString(data)


SIZES = [1, 2, 7, 8, 9, 63, 64, 65, 1000]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("precision", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dtype", FLOATS)
def test_dense_round_trip_is_bit_exact(n, precision, dtype):
    gen = torch.Generator().manual_seed(n)
    assert_round_trip(make_dense(n, gen, precision, dtype))
    assert_round_trip(make_dense(n, gen, precision, dtype, scale=2.0**-70))


def test_dense_sends_values_raw_in_their_precision():
    c = Dense(3, torch.float64, torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16))
    body = parse(encode(c)).dense
    assert body.precision == pb.DTYPE_BFLOAT16 and not body.HasField("scale")
    assert body.values == torch.tensor([1.0, -2.0, 0.5], dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    assert parse(encode(Dense(3, torch.float32, c.values, 0.5))).dense.scale == 0.5


@pytest.mark.parametrize("n", SIZES)
def test_sparse_round_trip_for_every_support_size(n):
    gen = torch.Generator().manual_seed(n)
    for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
        if 0 <= k <= n:
            assert_round_trip(make_sparse(n, k, gen))
    assert_round_trip(make_sparse(n, n // 2, gen, make_dense(n // 2, gen, torch.float16)))


def test_sparse_contiguous_and_edge_supports():
    gen = torch.Generator().manual_seed(0)
    n = 5000
    for idx in (torch.arange(100, 200), torch.tensor([0]), torch.tensor([n - 1]), torch.tensor([0, n - 1])):
        assert_round_trip(Sparse(n, torch.float32, idx, make_dense(idx.numel(), gen)))


def test_shared_seed_sparse_sends_the_seed_not_the_indices():
    gen = torch.Generator().manual_seed(0)
    n, k = 100_000, 1000
    for seed in (0, 1, 2**64 - 1, 123456789):
        c = make_sparse(n, k, gen, seed=seed)
        _, data = assert_round_trip(c)
        body = parse(data).sparse
        assert body.WhichOneof("support") == "seed" and body.seed == seed and body.count == k
        assert len(data) <= 1.10 * (8 + 4 * k)


def test_nested_sparse_values():
    gen = torch.Generator().manual_seed(0)
    n, k = 10_000, 300
    for inner in (
        make_quantized(k, gen, 16, 0.5),
        make_dense(k, gen, torch.float16, scale=1e-3),
        make_natural(k, gen),
        make_sign(k, gen),
        make_sparse(k, 30, gen, make_sparse(30, 3, gen, make_quantized(3, gen))),  # depth 4
    ):
        assert_round_trip(make_sparse(n, k, gen, inner))


def test_nested_dtype_is_sent_only_when_it_differs():
    gen = torch.Generator().manual_seed(0)
    same = make_sparse(100, 10, gen, make_dense(10, gen))
    other = make_sparse(100, 10, gen, make_dense(10, gen, dtype=torch.float16))
    assert parse(encode(same)).sparse.values.dtype == pb.DTYPE_UNSPECIFIED
    assert parse(encode(other)).sparse.values.dtype == pb.DTYPE_FLOAT16
    assert decode(encode(other), 100).values.dtype == torch.float16


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("levels", [1, 2, 3, 16, 255, 256, 2**31 - 1])
def test_quantized_round_trip(n, levels):
    gen = torch.Generator().manual_seed(n + levels)
    for density in (0.0, 0.01, 0.3, 1.0):
        assert_round_trip(make_quantized(n, gen, levels, density))


def test_quantized_extremes():
    n = 100
    top = torch.full((n,), 2**31 - 1, dtype=torch.int32)
    assert_round_trip(Quantized(n, torch.float32, 3.0e38, 2**31 - 1, torch.rand(n) < 0.5, top))
    zeros = torch.zeros(n, dtype=torch.int32)
    _, data = assert_round_trip(Quantized(n, torch.float16, 1e-45, 4, torch.zeros(n, dtype=torch.bool), zeros))
    assert len(data) < 20
    # other integer dtypes for the magnitudes are accepted
    assert_round_trip(Quantized(n, torch.float32, 1.0, 16, torch.zeros(n, dtype=torch.bool), top.clamp(max=16).long()))


def test_quantized_zero_signs_are_not_sent():
    mags = torch.tensor([0, 1, 0, 2], dtype=torch.int32)
    negative = torch.tensor([True, True, True, False])
    d = decode(encode(Quantized(4, torch.float32, 1.0, 2, negative, mags)), 4)
    assert d.negative.tolist() == [False, True, False, False]
    assert torch.equal(d.to_dense(), Quantized(4, torch.float32, 1.0, 2, negative, mags).to_dense())


@pytest.mark.parametrize(
    ("density", "levels", "form"),
    [(0.001, 16, "sparse"), (1.0, 15, "fixed"), (0.0, 16, "fixed")],
)
def test_quantized_form_follows_the_data(density, levels, form):
    gen = torch.Generator().manual_seed(0)
    c = make_quantized(20_000, gen, levels, density)  # uniform magnitudes: fixed width is best
    assert parse(encode(c)).quantized.magnitudes.WhichOneof("form") == form


def test_quantized_geometric_magnitudes_use_rice():
    n = 20_000
    mags = torch.from_numpy(np.random.default_rng(0).geometric(0.05, n).clip(max=1000) - 1).int()
    c = Quantized(n, torch.float32, 1.0, 1000, mags > 10, mags)
    _, data = assert_round_trip(c)
    assert parse(data).quantized.magnitudes.WhichOneof("form") == "rice"


def test_qsgd_levels_cost_about_their_entropy():
    """Mostly-zero QSGD levels: nested sparse forms get within a few % of the empirical entropy."""
    gen = torch.Generator().manual_seed(0)
    n, s = 200_000, 16
    x = torch.randn(n, generator=gen)
    r = x.abs() / x.norm() * s
    mags = (r.floor() + (torch.rand(n, generator=gen) < r - r.floor())).int()
    c = Quantized(n, torch.float32, float(x.norm()), s, (x < 0) & (mags != 0), mags)
    _, data = assert_round_trip(c)
    signed = torch.where(c.negative, -mags, mags)
    _, counts = torch.unique(signed, return_counts=True)
    entropy = float(-(counts * torch.log2(counts / n)).sum()) + 32
    assert len(data) <= 1.10 * entropy / 8


@pytest.mark.parametrize("n", SIZES)
def test_natural_round_trip(n):
    gen = torch.Generator().manual_seed(n)
    for zeros in (0.0, 0.2, 0.9, 1.0):
        assert_round_trip(make_natural(n, gen, zeros))
    extremes = torch.tensor([1, NATURAL_MAX_CODE, 0] * (n // 3 + 1), dtype=torch.int16)[:n]
    assert_round_trip(Natural(n, torch.bfloat16, (extremes % 2 == 1), extremes))


@pytest.mark.parametrize("n", SIZES)
def test_sign_round_trip(n):
    gen = torch.Generator().manual_seed(n)
    assert_round_trip(make_sign(n, gen))
    assert_round_trip(Sign(n, torch.float64, 0.0, torch.ones(n, dtype=torch.bool)))


def test_low_rank_round_trip():
    gen = torch.Generator().manual_seed(0)
    assert_round_trip(make_low_rank([(3, 4, 2), (5, 5, 5), (1, 7, 1), (2, 2, 0)], 11, gen))
    assert_round_trip(make_low_rank([(30, 20, 4)], 25, gen, rest=make_quantized(25, gen)))
    assert_round_trip(make_low_rank([(3, 3, 1)], 5, gen, dtype=torch.float16, rest=make_sparse(5, 2, gen)))
    assert_round_trip(make_low_rank([(4, 4, 2), (2, 3, 1)], 0, gen))  # blocks cover everything


def test_payloads_on_other_devices_and_layouts_are_encoded_from_cpu_copies():
    gen = torch.Generator().manual_seed(0)
    x = values(64, torch.float32, gen)[::2]  # a non-contiguous view
    assert_round_trip(Dense(32, torch.float32, x))
    if torch.cuda.is_available():
        c = make_sparse(1000, 100, gen, make_quantized(100, gen))
        cuda = Sparse(1000, c.dtype, c.indices.cuda(), Quantized(100, c.dtype, c.values.scale, c.values.levels,
                      c.values.negative.cuda(), c.values.magnitudes.cuda()))  # fmt: skip
        assert encode(cuda) == encode(c)


@pytest.mark.parametrize("seed", range(40))
def test_random_payloads_round_trip(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.choice([0, 1, 2, 3, 17, 100, 1000]))
    assert_round_trip(random_payload(rng, n))


# ---------------------------------------------------------------------------------------------
# sizes against the information-theoretic floors


def log2_binomial(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2)


@pytest.mark.parametrize(("d", "k"), [(100_000, 1000), (100_000, 100), (1_000_000, 10_000), (100_000, 20_000)])
def test_sparse_within_ten_percent_of_the_floor(d, k):
    gen = torch.Generator().manual_seed(0)
    c = make_sparse(d, k, gen)
    data = encode(c)
    floor = (log2_binomial(d, k) + 32 * k) / 8
    assert len(data) <= 1.10 * floor, (len(data), floor)
    assert len(data) - (log2_binomial(d, k) / 8 + 4 * k) < 0.05 * log2_binomial(d, k) / 8 + 40


def test_index_coding_switches_between_gaps_bitmap_and_complement():
    gen = torch.Generator().manual_seed(0)
    d = 100_000
    coding = {}
    for k in (10, 1000, 40_000, 50_000, 99_000, d):
        c = make_sparse(d, k, gen, make_sign(k, gen))
        _, data = assert_round_trip(c)
        coding[k] = parse(data).sparse.indices.WhichOneof("coding")
        index_bytes = parse(data).sparse.indices.ByteSize()
        assert index_bytes <= max(1.06 * log2_binomial(d, k) / 8, 0) + 16
    assert coding[10] == coding[1000] == "gaps"
    assert coding[50_000] == "bitmap"
    assert coding[99_000] == coding[d] == "complement_gaps"


def test_sign_within_ten_percent_of_d_bits():
    gen = torch.Generator().manual_seed(0)
    for d in (100_000, 1_000_003):
        data = encode(make_sign(d, gen))
        assert len(data) <= 1.10 * (d / 8 + 4)
        assert len(data) - (math.ceil(d / 8) + 4) <= 20  # envelope and field headers


def test_natural_is_more_compact_than_fixed_width_codes():
    gen = torch.Generator().manual_seed(0)
    n = 100_000
    x = torch.randn(n, generator=gen)
    codes = (torch.floor(torch.log2(x.abs())) + 150).to(torch.int16)
    c = Natural(n, torch.float32, x < 0, codes)
    _, data = assert_round_trip(c)
    signed = torch.where(c.negative, -codes.int(), codes.int())
    _, counts = torch.unique(signed, return_counts=True)
    entropy = float(-(counts * torch.log2(counts / n)).sum())
    assert len(data) <= 1.2 * entropy / 8
    assert len(data) < n * (1 + 5) / 8  # sign + a 5-bit fixed width range


# ---------------------------------------------------------------------------------------------
# the .proto is the contract


def test_payload_parses_with_code_compiled_from_the_proto_alone(tmp_path):
    pytest.importorskip("grpc_tools")
    done = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"--proto_path={ROOT / 'protos'}", f"--python_out={tmp_path}",
         "fedsqueeze/v1/payload.proto"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    spec = importlib.util.spec_from_file_location("fresh_payload_pb2", tmp_path / "fedsqueeze/v1/payload_pb2.py")
    fresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fresh)

    gen = torch.Generator().manual_seed(0)
    c = make_sparse(100_000, 1000, gen, make_dense(1000, gen, torch.float16))
    msg = fresh.Payload.FromString(encode(c))
    assert msg.version == WIRE_VERSION and msg.numel == 100_000 and msg.dtype == fresh.DTYPE_FLOAT32
    assert msg.WhichOneof("body") == "sparse" and msg.sparse.count == 1000
    assert msg.sparse.values.WhichOneof("body") == "dense"
    assert msg.sparse.values.dense.precision == fresh.DTYPE_FLOAT16
    raw = np.frombuffer(msg.sparse.values.dense.values, dtype="<f2")
    assert np.array_equal(raw, c.values.values.numpy())
    # decode the gaps by the documented layout, independently of fedsqueeze.wire
    gaps = msg.sparse.indices.gaps
    unary = np.unpackbits(np.frombuffer(gaps.unary, np.uint8), bitorder="little")
    ones = np.flatnonzero(unary)
    q = np.diff(ones, prepend=-1) - 1
    r_bits = np.unpackbits(np.frombuffer(gaps.remainders, np.uint8), bitorder="little")[: 1000 * gaps.k]
    r = (r_bits.reshape(1000, gaps.k) << np.arange(gaps.k)).sum(axis=1)
    idx = np.cumsum((q << gaps.k) + r + 1) - 1
    assert np.array_equal(idx, c.indices.numpy())

    sign = fresh.Payload.FromString(encode(make_sign(13, gen)))
    assert sign.WhichOneof("body") == "sign" and len(sign.sign.negative) == 2


def test_committed_generated_code_is_up_to_date():
    pytest.importorskip("grpc_tools")
    from fedsqueeze.wire import protogen

    assert protogen.check() == []


# ---------------------------------------------------------------------------------------------
# validation


def envelope(body: str, numel: int = 10, **fields) -> pb.Payload:
    msg = pb.Payload(version=WIRE_VERSION, numel=numel, dtype=pb.DTYPE_FLOAT32, **fields)
    if body:
        getattr(msg, body).SetInParent()
    return msg


def test_envelope_is_checked():
    gen = torch.Generator().manual_seed(0)
    good = parse(encode(make_dense(10, gen)))
    for change, message in (
        (lambda m: setattr(m, "version", 2), "version"),
        (lambda m: setattr(m, "numel", 11), "coordinates"),
        (lambda m: setattr(m, "dtype", 0), "dtype"),
        (lambda m: setattr(m, "dtype", 9), "dtype"),
        (lambda m: m.ClearField("dense"), "no body"),
        (lambda m: setattr(m.dense, "precision", pb.DTYPE_FLOAT64), "precision"),
        (lambda m: setattr(m.dense, "values", m.dense.values[:-1]), "bytes"),
        (lambda m: setattr(m.dense, "scale", float("inf")), "finite"),
    ):
        bad = pb.Payload()
        bad.CopyFrom(good)
        change(bad)
        with pytest.raises(PayloadError, match=message):
            decode(bad.SerializeToString(), 10)
    with pytest.raises(PayloadError, match="numel"):
        decode(encode(make_dense(10, gen)), -1)
    with pytest.raises(PayloadError, match="bytes"):
        decode("not bytes", 10)
    with pytest.raises(PayloadError, match="protobuf"):
        decode(b"\xff\xff\xff", 10)


def test_non_finite_values_are_rejected_both_ways():
    nan = Dense(3, torch.float32, torch.tensor([1.0, float("nan"), 2.0]))
    with pytest.raises(PayloadError, match="non-finite"):
        encode(nan)
    msg = parse(encode(Dense(3, torch.float32, torch.tensor([1.0, 3.0, 2.0]))))
    msg.dense.values = torch.tensor([1.0, float("inf"), 2.0]).numpy().tobytes()
    with pytest.raises(PayloadError, match="non-finite"):
        decode(msg.SerializeToString(), 3)
    with pytest.raises(PayloadError, match="finite"):
        encode(Sign(3, torch.float32, float("nan"), torch.zeros(3, dtype=torch.bool)))
    with pytest.raises(PayloadError, match="finite"):
        encode(Sign(3, torch.float32, 1e39, torch.zeros(3, dtype=torch.bool)))  # overflows float32


@pytest.mark.parametrize("precision", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_of_every_precision_are_refused(precision, bad):
    x = torch.tensor([1.0, bad, -2.0]).to(precision)
    with pytest.raises(PayloadError, match="non-finite"):
        encode(Dense(3, torch.float32, x))
    msg = parse(encode(Dense(3, torch.float32, torch.ones(3, dtype=precision))))
    msg.dense.values = x.view(INT_VIEW[precision]).numpy().tobytes()
    with pytest.raises(PayloadError, match="non-finite"):
        decode(msg.SerializeToString(), 3)
    factors = torch.ones(2, 1)
    factors[1, 0] = bad
    with pytest.raises(PayloadError, match="non-finite"):
        encode(
            LowRank(
                4, torch.float32, (LowRankBlock(0, 2, 2, factors, torch.ones(2, 1)),), Dense(0, torch.float32, x[:0])
            )
        )


def test_invalid_payload_objects_cannot_be_encoded():
    gen = torch.Generator().manual_seed(0)
    dense = make_dense(3, gen)

    def block(offset):
        return LowRankBlock(offset, 2, 2, torch.ones(2, 1), torch.ones(2, 1))

    for bad, message in (
        (Sparse(10, torch.float32, torch.tensor([3, 1, 5]), dense), "increasing"),
        (Sparse(10, torch.float32, torch.tensor([1, 1, 5]), dense), "increasing"),
        (Sparse(10, torch.float32, torch.tensor([1, 3, 10]), dense), "increasing"),
        (Sparse(10, torch.float32, torch.tensor([1, 3]), dense), "covers"),
        (Sparse(10, torch.float32, torch.tensor([1, 2, 3]), dense, seed=-1), "seed"),
        (Quantized(3, torch.float32, 1.0, 4, torch.zeros(3, dtype=torch.bool), torch.tensor([0, 5, 1])), "lie in"),
        (Quantized(3, torch.float32, 1.0, 4, torch.zeros(3, dtype=torch.bool), torch.tensor([0, -1, 1])), "lie in"),
        (Quantized(3, torch.float32, 1.0, 0, torch.zeros(3, dtype=torch.bool), torch.tensor([0, 0, 0])), "levels"),
        (Natural(3, torch.float32, torch.zeros(3, dtype=torch.bool), torch.tensor([0, 278, 1])), "lie in"),
        (Dense(3, torch.float32, torch.zeros(3, dtype=torch.float64)), "dtype"),
        (Dense(3, torch.int32, torch.zeros(3)), "dtype"),
        (Sign(3, torch.float32, 1.0, torch.zeros(4, dtype=torch.bool)), "shape"),
        (LowRank(4, torch.float32, (LowRankBlock(2, 2, 2, torch.ones(2, 1), torch.ones(2, 1)),), dense), "fit"),
        (
            LowRank(8, torch.float32, (block(0), block(3)), make_dense(0, gen)),
            "overlap",
        ),
    ):
        with pytest.raises(PayloadError, match=message):
            encode(bad)
    with pytest.raises(PayloadError):
        encode("not a payload")


def test_nesting_deeper_than_four_is_refused():
    gen = torch.Generator().manual_seed(0)
    deep = make_dense(1, gen)
    for _ in range(4):
        deep = Sparse(1, torch.float32, torch.tensor([0]), deep)
    with pytest.raises(PayloadError, match="deep"):
        encode(deep)
    msg = envelope("", numel=1)
    level = msg.sparse
    for _ in range(5):
        level.count = 1
        level.indices.bitmap = b"\x01"
        level = level.values.sparse
    level.count = 1
    with pytest.raises(PayloadError, match="deep"):
        decode(msg.SerializeToString(), 1)


def quantized_msg(numel: int = 10) -> pb.Payload:
    msg = envelope("", numel=numel)
    msg.quantized.levels = 4
    msg.quantized.magnitudes.fixed.SetInParent()
    return msg


def natural_msg(numel: int = 10) -> pb.Payload:
    msg = envelope("", numel=numel)
    msg.natural.values.fixed.SetInParent()
    return msg


def test_huge_claimed_counts_fail_fast_without_allocating():
    started = time.perf_counter()
    cases = []
    msg = envelope("", numel=10)
    msg.sparse.count = 10**12
    cases.append(msg)
    msg = envelope("", numel=10)
    msg.sparse.count = 5
    msg.sparse.indices.gaps.unary = b"\xff" * 10**5
    cases.append(msg)
    msg = quantized_msg()
    msg.quantized.levels = 2**32 - 1
    cases.append(msg)
    msg = quantized_msg()
    msg.quantized.magnitudes.sparse.count = 2**64 - 1
    cases.append(msg)
    msg = quantized_msg()
    msg.quantized.magnitudes.rice.k = 2**32 - 1
    cases.append(msg)
    msg = quantized_msg()
    msg.quantized.magnitudes.fixed.width = 2**32 - 1
    cases.append(msg)
    msg = quantized_msg()
    msg.quantized.magnitudes.rice.unary = b"\x01" * 10**5  # 800000 quotient bits for 10 values
    cases.append(msg)
    msg = natural_msg()
    msg.natural.symbol_count = 2**32 - 1
    cases.append(msg)
    msg = envelope("", numel=10)
    msg.low_rank.blocks.add(offset=0, rows=10**12, cols=10**12, rank=10**12)
    cases.append(msg)
    msg = envelope("", numel=10)
    msg.low_rank.blocks.add(offset=2**64 - 1, rows=1, cols=1, rank=1)
    cases.append(msg)
    msg = envelope("", numel=10)
    msg.low_rank.blocks.add(offset=0, rows=2, cols=5, rank=2**40)
    cases.append(msg)
    for msg in cases:
        with pytest.raises(PayloadError):
            decode(msg.SerializeToString(), 10)
    with pytest.raises(PayloadError, match="exceeds"):
        decode(b"\x00" * 10**7, 10)
    assert time.perf_counter() - started < 1.0


def test_indices_must_be_in_range_and_strictly_increasing():
    msg = envelope("sparse", numel=10)
    msg.sparse.count = 2
    msg.sparse.values.dense.precision = pb.DTYPE_FLOAT32
    msg.sparse.values.dense.values = b"\x00" * 8
    msg.sparse.indices.bitmap = b"\x01\x04"  # bit 10 is outside [0, 10)
    with pytest.raises(PayloadError, match="beyond"):
        decode(msg.SerializeToString(), 10)
    msg.sparse.indices.bitmap = b"\x03\x00"
    assert decode(msg.SerializeToString(), 10).indices.tolist() == [0, 1]
    # gaps summing past the end
    msg.sparse.indices.gaps.k = 0
    msg.sparse.indices.gaps.unary = bytes([0b1000_0001, 0b1])  # gaps 0 and 7, then one more value
    with pytest.raises(PayloadError):
        decode(msg.SerializeToString(), 10)
    msg.sparse.indices.gaps.unary = bytes([0b1000_0001])  # gaps 0, 6: indices 0, 7
    assert decode(msg.SerializeToString(), 10).indices.tolist() == [0, 7]
    msg.sparse.indices.gaps.unary = bytes([0b1000_0001, 0])  # trailing byte
    with pytest.raises(PayloadError, match="trailing"):
        decode(msg.SerializeToString(), 10)


# ---------------------------------------------------------------------------------------------
# building blocks


@pytest.mark.parametrize("width", list(range(0, 65)))
def test_fixed_width_streams_follow_the_documented_layout(width):
    rng = np.random.default_rng(width)
    for n in (0, 1, 7, 8, 9, 31, 257):
        v = rng.integers(0, 2**width, n, dtype=np.uint64) if width < 64 else rng.integers(0, 2**63, n).astype(np.uint64)
        data = bits.pack_uint(v, width)
        reference = np.zeros(n * width, dtype=np.uint8)
        for j in range(width):
            reference[j::width] = (v >> np.uint64(j)) & np.uint64(1)
        assert data == np.packbits(reference, bitorder="little").tobytes()
        assert np.array_equal(bits.unpack_uint(data, n, width).astype(np.uint64), v)
        if n * width % 8:
            with pytest.raises(PayloadError, match="padding"):
                bits.unpack_uint(data[:-1] + bytes([data[-1] | 0x80]), n, width)
        with pytest.raises(PayloadError):
            bits.unpack_uint(data + b"\x00", n, width)


def test_rice_parameter_is_optimal_and_streams_round_trip():
    rng = np.random.default_rng(0)
    for n in (0, 1, 5, 1000):
        for mean in (0.1, 1, 3, 100, 1e6):
            v = rng.geometric(1 / (mean + 1), n).astype(np.int64) - 1
            plan = rice.plan(v)
            cost = [n * (k + 1) + int((v >> k).sum()) for k in range(40)]
            assert cost[plan.k] == min(cost)
            assert rice.plan_from_histogram(np.bincount(v, minlength=1)) == plan
            unary, rem = rice.encode(v, plan.k)
            assert (len(unary), len(rem)) == (plan.unary_bytes, plan.remainder_bytes)
            top = int(v.max()) if n else 0
            assert np.array_equal(rice.decode(plan.k, unary, rem, n, top, int(v.sum())), v)
            if n:
                with pytest.raises(PayloadError):
                    rice.decode(plan.k, unary, rem, n, top - 1, int(v.sum()))  # a value above the bound
                with pytest.raises(PayloadError):
                    rice.decode(plan.k, unary, rem, n + 1, top, int(v.sum()))


def test_rice_streams_longer_than_a_chunk_decode_exactly_into_any_dtype_that_holds_the_bound():
    # the encoder and the decoder work chunk by chunk (of values and of unary bytes): sequences
    # across several chunks, with long quotients in some, must come back exactly, and a value
    # above the bound or a sum above the limit in the last chunk only must still be refused
    rng = np.random.default_rng(1)
    n = 3 * rice._CHUNK + 5
    for k, top, dtype in ((0, 40, np.uint8), (3, 255, np.uint8), (5, 256, np.int32), (9, 60000, np.uint16)):
        v = np.minimum(rng.geometric(0.5, n) - 1 << k | rng.integers(0, 1 << k, n), top).astype(np.int64)
        v[rng.integers(0, n, 20)] = top  # a few long quotients
        unary, rem = rice.encode(v, k)
        assert len(unary) > 2 * rice._DECODE_BYTES or k == 9
        decoded = rice.decode(k, unary, rem, n, top, n * top, dtype=dtype)
        assert decoded.dtype == dtype and np.array_equal(decoded, v)
        assert np.array_equal(rice.decode(k, unary, rem, n, top, n * top), v)
        over = v.copy()
        over[-1] = top + 1
        bad_unary, bad_rem = rice.encode(over, k)
        with pytest.raises(PayloadError, match="exceeds"):
            rice.decode(k, bad_unary, bad_rem, n, top, n * top, dtype=dtype)
        with pytest.raises(PayloadError, match="sum to more|bytes possible"):  # either refuses the sum
            rice.decode(k, unary, rem, n, top, int(v.sum()) - 1, dtype=dtype)


def test_a_full_index_set_is_checked_without_materialising_its_positions():
    n = 1000
    for plan in (indices.IndexPlan("bitmap", 0), indices.plan_index_set(n, n)):
        msg = pb.IndexSet()
        indices.write_index_set(plan, msg, n, indices=np.arange(n))
        assert indices.decode_index_set(msg, n, n, positions=False) is None
        assert np.array_equal(indices.decode_index_set(msg, n, n), np.arange(n))
    msg = pb.IndexSet()
    indices.write_index_set(indices.IndexPlan("bitmap", 0), msg, n, indices=np.arange(n - 1))
    with pytest.raises(PayloadError, match="holds 999 indices"):
        indices.decode_index_set(msg, n, n, positions=False)


def test_index_sets_round_trip_in_every_coding_and_the_smallest_is_chosen():
    rng = np.random.default_rng(0)
    for n in (1, 8, 100, 5000):
        for count in sorted({0, 1, n // 10, n // 2, n - 1, n}):
            idx = np.sort(rng.choice(n, count, replace=False)).astype(np.int64)
            chosen = indices.plan_index_set(n, count, indices=idx)
            sizes = {}
            for plan in (
                indices.IndexPlan("bitmap", 0),
                indices._rice_plan("gaps", indices.gaps_of(idx)),
                indices._rice_plan("complement_gaps", indices.gaps_of(np.setdiff1d(np.arange(n), idx))),
            ):
                msg = pb.IndexSet()
                indices.write_index_set(plan, msg, n, indices=idx)
                sizes[plan.coding] = msg.ByteSize()
                assert np.array_equal(indices.decode_index_set(msg, n, count), idx)
            assert sizes[chosen.coding] == chosen.nbytes
            assert chosen.nbytes <= min(sizes.values()) + (1 if count in (0, n) else 0)


def test_int_codes_nest_sparse_forms_for_peaked_values():
    rng = np.random.default_rng(0)
    v = (rng.random(100_000) < 0.02).astype(np.int64) * rng.geometric(0.9, 100_000)
    plan = ints.plan_ints(v)
    assert plan.form == "sparse" and plan.minus_one.form == "sparse"
    msg = pb.IntCode()
    ints.write_ints(plan, msg)
    assert msg.ByteSize() == plan.nbytes
    decoded, pos = ints.read_ints(msg, v.size, int(v.max()), "test")
    assert np.array_equal(decoded, v) and np.array_equal(pos, np.flatnonzero(v))
