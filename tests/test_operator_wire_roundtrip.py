"""Every operator's payload survives the wire exactly: decompress(decode(encode(C(x)))) == decompress(C(x))."""

from __future__ import annotations

import math

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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec", [*SPECS, "powersgd(rank=2)"])
def test_operators_run_on_cuda_tensors(spec: str):
    """Every operator takes a CUDA tensor and a CUDA generator: the result stays on the device, is
    the same for the same seed, survives the wire, and (unbiased operators) averages to x."""
    layout = [(40, 20), (200,)]
    op = build(spec, layout=layout)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0)).cuda()

    def draw(seed: int):
        return op.compress(x, torch.Generator(device="cuda").manual_seed(seed))

    c = draw(1)
    y = op.decompress(c)
    assert y.device.type == "cuda" and y.dtype == x.dtype and y.shape == x.shape
    assert torch.equal(op.decompress(draw(1)), y)
    assert torch.equal(op.decompress(wire.decode(wire.encode(c), x.numel())), y.cpu())
    if op.unbiased and not op.deterministic:
        mean = torch.stack([op.decompress(draw(s)) for s in range(2, 2002)]).double().mean(0)
        bound = 5 * math.sqrt((op.omega(1000) or 0.0) / 2000) * float(torch.linalg.vector_norm(x.double()))
        assert float(torch.linalg.vector_norm(mean - x.double())) <= bound + 1e-6
