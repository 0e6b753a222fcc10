"""The codec benchmark runs end to end, and its floors are the textbook ones (small sizes only)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import codec  # noqa: E402

from fedsqueeze.compressors import build  # noqa: E402


def test_floors_are_the_information_theoretic_ones():
    d, k = 1000, 10
    bits, _ = codec.floor_bits(build(f"topk(k={k})").compress(torch.randn(d)))
    assert math.isclose(bits, math.log2(math.comb(d, k)) + 32 * k, rel_tol=1e-9)
    seeded = build(f"randk(k={k})").compress(torch.randn(d), torch.Generator().manual_seed(0))
    assert codec.floor_bits(seeded)[0] == 64 + 32 * k
    assert codec.floor_bits(build("scaled_sign").compress(torch.randn(d)))[0] == d + 32
    # x = e_1: the levels are exactly (1, 0, 0, 0): entropy 4 h(1/4) bits, plus the float32 scale
    levels = build("qsgd(levels=1)").compress(torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.Generator().manual_seed(0))
    h = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    assert math.isclose(codec.floor_bits(levels)[0], 4 * h + 32, rel_tol=1e-9)


def test_benchmark_script_writes_its_table(tmp_path):
    out = tmp_path / "codec.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "codec.py"), "--sizes", "5000", "--repeats", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {r["operator"] for r in rows} == set(codec.OPERATORS)
    for r in rows:
        assert r["bytes"] > 0 and r["encode_mb_s"] > 0 and r["decode_mb_s"] > 0
    assert "| d | operator |" in done.stdout
