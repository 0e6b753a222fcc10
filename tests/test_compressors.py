"""The compressor API: specs, errors, registration, determinism, dtypes and devices."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch

from fedsqueeze.compressors import (
    Compressor,
    CompressorError,
    Sparse,
    available,
    build,
    register,
    registry,
    shared_indices,
)

ALL_SPECS = [
    "identity", "fp16", "bf16", "topk(0.1)", "topk(k=4)", "randk(0.2)", "randk(0.2, scaled=false)",
    "bernoulli(0.3)", "qsgd(levels=4)", "qsgd(levels=300, norm=linf)", "natural", "sign", "scaled_sign",
    "topk(0.5) | randk(0.5)", "topk(0.2) | qsgd(levels=16)", "randk(0.3) | fp16", "topk(0.5) | bernoulli(0.5) | bf16",
]  # fmt: skip


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_spec_round_trips_through_its_canonical_form(spec: str):
    c = build(spec)
    again = build(c.spec)
    assert again.spec == c.spec
    x = torch.randn(64)
    assert torch.equal(c(x, torch.Generator().manual_seed(3)), again(x, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("spec", ALL_SPECS)
def test_deterministic_for_a_given_generator(spec: str):
    x = torch.randn(500)
    a = build(spec).compress(x, torch.Generator().manual_seed(7))
    b = build(spec).compress(x, torch.Generator().manual_seed(7))
    assert torch.equal(a.to_dense(), b.to_dense())
    if not build(spec).deterministic:
        c = build(spec).compress(x, torch.Generator().manual_seed(8))
        assert not torch.equal(a.to_dense(), c.to_dense())


@pytest.mark.parametrize("spec", ALL_SPECS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_output_has_the_input_dtype_and_shape(spec: str, dtype: torch.dtype):
    x = torch.randn(100).to(dtype)
    y = build(spec)(x, torch.Generator().manual_seed(0))
    assert y.dtype == dtype and y.shape == x.shape


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nonsense", "valid names: bernoulli, bf16"),
        ("topk(0)", "ratio must be in (0, 1]"),
        ("topk(1.5)", "ratio must be in (0, 1]"),
        ("randk(-0.1)", "ratio must be in (0, 1]"),
        ("topk(ratio=0.1, k=3)", "exactly one of ratio or k"),
        ("topk(k=0)", "positive integer"),
        ("qsgd(levels=0)", "levels must be"),
        ("qsgd(norm=l1)", "norm must be one of l2, linf"),
        ("bernoulli(p=2)", "p must be in (0, 1]"),
        ("topk(0.1, colour=3)", "valid arguments: ratio, k"),
        ("qsgd(levels=4) | topk(0.1)", "cannot come before '|'"),
        ("topk(0.1) ||", "cannot parse"),
        ("topk(0.1) + qsgd", "expected name or name(args)"),
        ("topk([1, 2])", "not a number"),
        ("", "empty compressor spec"),
        ("powersgd(rank=2)", "needs the tensor layout"),
        ("randk(0.1, scaled=maybe)", "scaled must be true or false"),
    ],
)
def test_bad_specs_raise_clear_errors(spec: str, message: str):
    with pytest.raises(CompressorError, match=message.replace("(", r"\(").replace(")", r"\)").replace("|", r"\|")):
        build(spec)


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.tensor([1.0, float("nan")]), "non-finite"),
        (torch.tensor([float("inf"), 1.0]), "non-finite"),
        (torch.tensor([1, 2, 3]), "expected a float tensor"),
        (torch.zeros(3, 3), "expected a 1-D tensor"),
        ([1.0, 2.0], "expected a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(x, message: str):
    for spec in ["identity", "topk(0.5)", "qsgd(levels=4)", "natural", "scaled_sign", "topk(0.5) | qsgd(levels=2)"]:
        with pytest.raises(CompressorError, match=message):
            build(spec).compress(x, torch.Generator().manual_seed(0))


BIG = 3e38  # finite in float32, but not once scaled up or squared and summed


@pytest.mark.parametrize(
    "spec, x, message",
    [
        ("bf16", torch.tensor([3.4e38, 1.0]), "beyond 3.38953e\\+38; use fp16"),
        ("qsgd(levels=4)", torch.tensor([BIG, BIG]), "exceeds float32's range; use norm=linf"),
        ("randk(k=2)", torch.tensor([BIG, 1.0, 2.0]), "randk: the kept values times 1.5 exceed"),
        ("bernoulli(0.5)", torch.full((64,), BIG), "bernoulli: the kept values times 2 exceed"),
        ("topk(0.5) | randk(0.5)", torch.tensor([BIG, 1.0, 2.0, 3.0]), "randk: the kept values times 2 exceed"),
        ("identity", torch.tensor([1e300, 1.0], dtype=torch.float64), "exceed float32's range"),
        ("topk(0.5)", torch.tensor([1e300, 1.0], dtype=torch.float64), "exceed float32's range"),
    ],
)
def test_finite_inputs_that_float32_payloads_cannot_carry_raise_clear_errors(spec: str, x, message: str):
    with pytest.raises(CompressorError, match=message):
        build(spec).compress(x, torch.Generator().manual_seed(0))


def test_inputs_at_the_edges_of_float32_compress_to_finite_values():
    g = torch.Generator().manual_seed(0)
    tiny = torch.tensor([1e-300, -1e-301], dtype=torch.float64)  # below float32's smallest: zeros
    assert torch.equal(build("fp16")(tiny, g), torch.zeros(2, dtype=torch.float64))
    for spec in ["qsgd(levels=4, norm=linf)", "scaled_sign", "topk(0.5)", "natural", "fp16"]:
        y = build(spec)(torch.tensor([BIG, -BIG]), g)
        assert torch.isfinite(y).all(), spec


@pytest.mark.parametrize("spec", ["qsgd(levels=16)", "qsgd(levels=256)", "qsgd(levels=256, norm=linf)",
                                  "qsgd(levels=65535, norm=linf)"])  # fmt: skip
@pytest.mark.parametrize("peak", [1e-45, 1e-40, 1e-38])
def test_subnormal_scales_give_valid_payloads(spec: str, peak: float):
    """levels / scale overflows float32 for a subnormal scale: magnitudes must still be levels at most, and
    the payload must decode (it used to carry magnitude -2**31 for the zeros, refused on the wire)."""
    from fedsqueeze import wire

    x = torch.tensor([peak, 0.0, -peak / 2, peak / 4, 0.0])
    c = build(spec)
    payload = c.compress(x, torch.Generator().manual_seed(0))
    mags = payload.magnitudes.to(torch.int64)
    assert int(mags.min()) >= 0 and int(mags.max()) <= c.levels and int(mags[1]) == 0 == int(mags[4])
    y = c.decompress(wire.decode(wire.encode(payload), x.numel()))
    # within one quantisation step (as float32 holds it: below its subnormal resolution, zero)
    assert torch.all((y - x).abs() <= payload.scale / c.levels + 1.5e-45)


def test_k_larger_than_dimension_is_an_error():
    with pytest.raises(CompressorError, match="k=20 is larger than the dimension d=10"):
        build("topk(k=20)").compress(torch.randn(10))
    with pytest.raises(CompressorError, match="larger than the dimension"):
        build("randk(k=20)").compress(torch.randn(10))


def test_randk_sends_a_seed_that_reproduces_its_support():
    c = build("randk(k=50)").compress(torch.randn(10_000), torch.Generator().manual_seed(1))
    assert isinstance(c, Sparse) and c.seed is not None
    assert torch.equal(shared_indices(c.seed, 10_000, 50), c.indices)


def test_shared_indices_are_a_uniform_subset():
    counts = torch.zeros(12)
    trials = 6000
    for seed in range(trials):
        idx = shared_indices(seed, 12, 2)
        assert idx.unique().numel() == 2 and bool((idx[1:] > idx[:-1]).all())
        counts[idx] += 1
    expected = trials * 2 / 12
    # each count is Binomial(trials, 1/6): sd = sqrt(trials p (1-p))
    sd = (trials * (1 / 6) * (5 / 6)) ** 0.5
    assert float((counts - expected).abs().max()) <= 5 * sd
    big = shared_indices(3, 1_000_000, 5000)
    assert big.numel() == 5000 and big.unique().numel() == 5000 and int(big.max()) < 1_000_000


def test_composed_sparsifiers_send_one_flat_support():
    x = torch.randn(1000)
    c = build("topk(k=100) | randk(k=10)").compress(x, torch.Generator().manual_seed(0))
    assert isinstance(c, Sparse) and c.indices.numel() == 10 and c.seed is None
    kept = torch.topk(x.abs(), 100).indices
    assert set(c.indices.tolist()) <= set(kept.tolist())
    assert torch.allclose(c.to_dense()[c.indices], x[c.indices] * 10)


def test_register_a_user_compressor_by_decorator(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @register("halve")
    class Halve(Compressor):
        deterministic = True

        def compress(self, x, generator=None):
            return build("identity").compress(x * 0.5)

        def eta(self, d):
            return 0.5

        def omega(self, d):
            return 0.0

        def second_moment(self, d):
            return 0.25

    assert "halve" in available()
    c = build("topk(k=2) | halve")
    assert torch.equal(c(torch.tensor([4.0, -1.0, 2.0])), torch.tensor([2.0, 0.0, 1.0]))
    assert c.eta(3) == pytest.approx((1 / 3) ** 0.5 + 0.5)
    with pytest.raises(CompressorError, match="already registered"):
        register("halve")(type("Other", (Halve,), {}))


def test_register_a_user_compressor_by_entry_point(tmp_path, monkeypatch):
    (tmp_path / "mycodec.py").write_text(
        textwrap.dedent(
            """
            from fedsqueeze.compressors.precision import Identity

            class Doubled(Identity):
                def compress(self, x, generator=None):
                    return super().compress(x * 2)

            class Shaped(Identity):
                needs_layout = True

                def __init__(self, layout=None):
                    self.layout = layout
            """
        )
    )
    dist = tmp_path / "mycodec-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mycodec\nVersion: 1.0\n")
    # a broken plug-in listed first must not hide the others, nor the built-in operators
    (dist / "entry_points.txt").write_text(
        "[fedsqueeze.compressors]\naaa_broken = mycodec:Missing\ndoubled = mycodec:Doubled\nshaped = mycodec:Shaped\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_LAYOUT_AWARE", set(registry._LAYOUT_AWARE))
    monkeypatch.setattr(registry, "_BROKEN", {})
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    try:
        assert torch.equal(build("identity")(torch.tensor([1.5])), torch.tensor([1.5]))
        assert {"doubled", "shaped"} <= set(available()) and "aaa_broken" not in available()
        assert torch.equal(build("doubled")(torch.tensor([1.5])), torch.tensor([3.0]))
        assert build("shaped", layout=[(2, 3)]).layout == [(2, 3)]
        with pytest.raises(CompressorError, match="cannot load compressor plug-in 'aaa_broken'.*Missing"):
            build("topk(0.5) | aaa_broken")
    finally:
        sys.modules.pop("mycodec", None)


def test_factory_returning_a_non_compressor_is_rejected(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register("broken")(lambda: 42)
    with pytest.raises(CompressorError, match="returned int, not a Compressor"):
        build("broken")


def test_powersgd_checks_layout_and_warm_start():
    c = build("powersgd(rank=1)", layout=[(8, 6), (8,)])
    with pytest.raises(CompressorError, match="layout"):
        c.compress(torch.randn(10))
    other = build("powersgd(rank=2)", layout=[(8, 6), (8,)]).compress(torch.randn(56))
    with pytest.raises(CompressorError, match="warm start"):
        c.compress(torch.randn(56), warm_start=other)
    with pytest.raises(CompressorError, match="layout comes from the model"):
        build("powersgd(rank=1, layout=3)", layout=[(8, 6)])


def test_natural_cpu_codes_match_the_frexp_formula():
    """The CPU path works on the float32 bits; the device path's frexp formula is the reference."""
    from fedsqueeze.compressors.compressed import NATURAL_BIAS
    from fedsqueeze.compressors.randomness import uniform

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200_003, generator=g) * torch.exp2(torch.randint(-160, 128, (200_003,), generator=g).float())
    x = torch.where(torch.isfinite(x), x, 1.0)
    x[:8] = torch.tensor([0.0, -0.0, 1.4e-45, -1.1754942e-38, 2.0**-126, 3.4028235e38, -(2.0**127), 1.0])
    c = build("natural").compress(x, torch.Generator().manual_seed(7))
    mantissa, exponent = torch.frexp(x)
    u = uniform(x.numel(), torch.Generator().manual_seed(7), x.device)
    e = exponent.to(torch.int32) - 1 + (u < 2.0 * mantissa.abs() - 1.0).to(torch.int32)
    codes = torch.where(x == 0, 0, torch.clamp(e + NATURAL_BIAS, max=127 + NATURAL_BIAS)).to(torch.int16)
    assert torch.equal(c.codes, codes) and torch.equal(c.negative, x < 0)


def test_uniform_words_are_the_words_behind_numpys_float32_uniforms():
    """uniform_into gives rng.random(n, dtype=float32) bit for bit, and leaves the generator where that
    call does, including a high half kept for the next draw (odd n) and one kept from an earlier draw."""
    from fedsqueeze.compressors.randomness import uniform_into

    r = np.random.default_rng(3)
    for _ in range(200):
        seed = int(r.integers(1 << 62))
        ours, numpys = (np.random.Generator(np.random.PCG64(seed)) for _ in range(2))
        for _ in range(int(r.integers(1, 6))):
            n = int(r.integers(0, 5)) if r.random() < 0.3 else int(r.integers(0, 3000))
            expected = numpys.random(n, dtype=np.float32)
            got = uniform_into(ours, np.empty(n, dtype=np.float32))
            assert np.array_equal(got.view(np.uint32), expected.view(np.uint32))
            if r.random() < 0.3:  # another kind of draw in between
                assert ours.random() == numpys.random()
        a, b = ours.bit_generator.state, numpys.bit_generator.state
        assert a["state"] == b["state"] and a["has_uint32"] == b["has_uint32"]
        assert not a["has_uint32"] or a["uinteger"] == b["uinteger"]


@pytest.mark.parametrize("p", [0.01, 0.3333, 2.0**-24, 1e-9, 0.99999994, 1.0])
def test_bernoulli_on_the_cpu_keeps_where_numpys_float32_uniform_is_below_p(p):
    from fedsqueeze.compressors.randomness import numpy_rng

    d = 200_001
    kept = build(f"bernoulli({p})").compress(torch.randn(d), torch.Generator().manual_seed(11)).indices
    u = numpy_rng(torch.Generator().manual_seed(11)).random(d, dtype=np.float32)
    assert np.array_equal(kept.numpy(), np.flatnonzero(u < np.float32(p)))
