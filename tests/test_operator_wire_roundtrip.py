"""Every operator's payload survives the wire exactly: decompress(decode(encode(C(x)))) == decompress(C(x))."""

from __future__ import annotations

import pytest
import torch

from fedsqueeze import wire
from fedsqueeze.compressors import build

SPECS = [
    "identity", "fp16", "bf16", "topk(0.1)", "topk(k=1)", "topk(1.0)", "randk(0.2)", "randk(0.2, scaled=false)",
    "randk(1.0)", "bernoulli(0.3)", "bernoulli(0.99)", "qsgd(levels=1)", "qsgd(levels=16)",
    "qsgd(levels=300, norm=linf)", "natural", "sign", "scaled_sign", "topk(0.5) | randk(0.5)",
    "topk(0.2) | qsgd(levels=16)", "randk(0.3) | fp16", "topk(0.5) | bernoulli(0.5) | bf16", "randk(0.1) | natural",
]  # fmt: skip


def vectors(d: int):
    g = torch.Generator().manual_seed(d)
    yield torch.randn(d, generator=g)
    yield torch.randn(d, generator=g) * 1e30
    yield torch.randn(d, generator=g) * 1e-30
    yield torch.zeros(d)
    sparse = torch.randn(d, generator=g)
    sparse[torch.rand(d, generator=g) < 0.95] = 0.0
    yield sparse


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("d", [1, 3, 1000, 100_000])
def test_exact_round_trip(spec: str, d: int):
    op = build(spec)
    for i, x in enumerate(vectors(d)):
        c = op.compress(x, torch.Generator().manual_seed(i))
        data = wire.encode(c)
        back = wire.decode(data, d)
        assert torch.equal(op.decompress(back), op.decompress(c)), (spec, d, i)
        assert wire.encode(back) == data


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtype_survives_the_wire(dtype: torch.dtype):
    x = torch.randn(500).to(dtype)
    for spec in ["identity", "topk(0.1) | qsgd(levels=4)", "natural", "scaled_sign"]:
        op = build(spec)
        y = op.decompress(wire.decode(wire.encode(op.compress(x, torch.Generator().manual_seed(0))), 500))
        assert y.dtype == dtype


def test_powersgd_round_trip_and_size():
    layout = [(64, 100), (64,), (10, 64), (10,), (3, 3)]
    d = sum(torch.Size(s).numel() for s in layout)
    op = build("powersgd(rank=2)", layout=layout)
    x = torch.randn(d, generator=torch.Generator().manual_seed(0))
    c = op.compress(x, torch.Generator().manual_seed(1))
    data = wire.encode(c)
    assert torch.equal(op.decompress(wire.decode(data, d)), op.decompress(c))
    factors = 2 * (64 + 100) + 2 * (10 + 64)
    assert len(data) < 4 * (factors + 64 + 10 + 9) + 64


def test_decoded_payload_of_the_wrong_size_is_refused():
    data = wire.encode(build("topk(0.1)").compress(torch.randn(100)))
    with pytest.raises(wire.PayloadError):
        wire.decode(data, 101)
