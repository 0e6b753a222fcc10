"""The pruned model in packed form: kept values plus a bitmap or N:M index bits, optionally int8.

Per pruned weight (n elements, r rows, k kept):
- values: the kept weights in row-major order, float32 (4k bytes) or int8 (k bytes plus one float32
  scale per row, 4r bytes: symmetric per-output-channel quantisation, s_i = max_j |W_ij| / 127 over the
  kept weights, q = round(W / s_i), so |W - q s_i| <= s_i / 2);
- positions: a bitmap, one bit per weight (ceil(n / 8) bytes), or for N:M the index of each kept
  weight within its block of M, ceil(log2 M) bits each (ceil(n N / M * ceil(log2 M) / 8) bytes; for
  2:4 that is 2 bits per kept weight, the metadata layout of NVIDIA's 2:4 sparse tensor cores).
Every other tensor (biases, buffers, unpruned layers) is stored dense at its own precision.
`packed_size` is the formula; `PackedModel.nbytes` counts the bytes actually produced. The file
written by `save` adds torch's container (names, shapes) on top.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from fedsqueeze.wire.bits import nbytes, pack_mask, pack_uint, unpack_mask, unpack_uint

from .errors import PruneError
from .masks import NM

FORMAT = "fedsqueeze-pruned/v1"
INT8_MAX = 127


def index_width(m: int) -> int:
    """Bits per N:M index."""
    return max(1, math.ceil(math.log2(m)))


def packed_size(numel: int, rows: int, kept: int, *, nm: NM | None = None, int8: bool = False) -> int:
    """Bytes of one packed weight (values, scales, positions)."""
    values = kept if int8 else 4 * kept
    scales = 4 * rows if int8 else 0
    if nm is None:
        positions = nbytes(numel)
    else:
        positions = nbytes(numel // nm.m * nm.n * index_width(nm.m))
    return values + scales + positions


@dataclass
class PackedTensor:
    shape: tuple[int, ...]
    kind: str  # "dense", "bitmap" or "nm"
    dtype: str  # the tensor's dtype, as torch names it
    values: bytes
    positions: bytes = b""
    scales: bytes = b""
    nm: NM | None = None

    @property
    def nbytes(self) -> int:
        return len(self.values) + len(self.positions) + len(self.scales)

    @property
    def int8(self) -> bool:
        return bool(self.scales)


@dataclass
class PackedModel:
    tensors: dict[str, PackedTensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


# ---- int8 ----------------------------------------------------------------------------------------------


def quantize_rows(w: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 levels of w, float32 scale per row) over the kept weights of each row."""
    w = w.detach().to(torch.float32)
    peak = (w.abs() * mask).amax(dim=1)
    scale = torch.where(peak > 0, peak / INT8_MAX, torch.ones_like(peak))
    q = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q * mask, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(torch.float32) * scale[:, None]


# ---- one tensor ----------------------------------------------------------------------------------------


def pack_weight(w: torch.Tensor, mask: torch.Tensor, *, nm: NM | None = None, int8: bool = False) -> PackedTensor:
    """Pack a weight (any shape, viewed as (rows, -1)) with its keep-mask of the same matrix shape."""
    shape = tuple(w.shape)
    w2 = w.detach().reshape(shape[0], -1).to(torch.float32)
    mask = mask.reshape(w2.shape).to(torch.bool)
    flat_mask = mask.reshape(-1)
    if nm is None:
        kind, positions = "bitmap", pack_mask(flat_mask.numpy())
    else:
        blocks = mask.reshape(-1, nm.m)
        if not bool((blocks.sum(1) == nm.n).all()):
            raise PruneError(f"mask is not {nm}: some block of {nm.m} does not keep exactly {nm.n}")
        idx = blocks.nonzero()[:, 1]  # row-major: ascending within each block
        kind, positions = "nm", pack_uint(idx.numpy(), index_width(nm.m))
    if int8:
        q, scale = quantize_rows(w2, mask)
        values = q.reshape(-1)[flat_mask].numpy().tobytes()
        scales = scale.numpy().astype("<f4").tobytes()
    else:
        values = w2.reshape(-1)[flat_mask].numpy().astype("<f4").tobytes()
        scales = b""
    return PackedTensor(shape, kind, str(w.dtype).removeprefix("torch."), values, positions, scales, nm)


def unpack_weight(p: PackedTensor) -> torch.Tensor:
    dtype = getattr(torch, p.dtype)
    if p.kind == "dense":
        return torch.frombuffer(bytearray(p.values), dtype=dtype).reshape(p.shape).clone()
    rows = p.shape[0]
    numel = math.prod(p.shape)
    if p.kind == "bitmap":
        mask = torch.from_numpy(unpack_mask(p.positions, numel, "bitmap"))
    elif p.kind == "nm" and p.nm is not None:
        n_blocks = numel // p.nm.m
        idx = unpack_uint(p.positions, n_blocks * p.nm.n, index_width(p.nm.m), "N:M indices").astype(np.int64)
        mask = torch.zeros(n_blocks, p.nm.m, dtype=torch.bool)
        mask.scatter_(1, torch.from_numpy(idx).reshape(n_blocks, p.nm.n), True)
        mask = mask.reshape(-1)
    else:
        raise PruneError(f"unknown packed kind {p.kind!r}")
    kept = int(mask.sum())
    out = torch.zeros(numel, dtype=torch.float32)
    if p.int8:
        levels = torch.frombuffer(bytearray(p.values), dtype=torch.int8)
        scale = torch.frombuffer(bytearray(p.scales), dtype=torch.float32)
        if levels.numel() != kept or scale.numel() != rows:
            raise PruneError(f"packed int8 weight holds {levels.numel()} values for {kept} kept positions")
        q = torch.zeros(numel, dtype=torch.int8)
        q[mask] = levels
        out = dequantize_rows(q.reshape(rows, -1), scale).reshape(-1)
    else:
        values = torch.frombuffer(bytearray(p.values), dtype=torch.float32)
        if values.numel() != kept:
            raise PruneError(f"packed weight holds {values.numel()} values for {kept} kept positions")
        out[mask] = values
    return out.reshape(p.shape).to(dtype)


# ---- a model -------------------------------------------------------------------------------------------


def pack_model(
    state_dict: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    *,
    nm_layers: Mapping[str, NM] | None = None,
    int8: bool = False,
) -> PackedModel:
    """Pack a state_dict; `masks` maps a weight's key (`layer.weight`) to its keep-mask."""
    nm_layers = nm_layers or {}
    unknown = sorted(set(masks) - set(state_dict))
    if unknown:
        raise PruneError(f"masks for {unknown} that the state_dict does not hold")
    out = {}
    for key, t in state_dict.items():
        if key in masks:
            out[key] = pack_weight(t, masks[key], nm=nm_layers.get(key), int8=int8)
        else:
            data = t.detach().contiguous().cpu()
            out[key] = PackedTensor(
                tuple(t.shape),
                "dense",
                str(t.dtype).removeprefix("torch."),
                data.reshape(-1).view(torch.uint8).numpy().tobytes(),
            )
    return PackedModel(out)


def unpack_model(packed: PackedModel) -> dict[str, torch.Tensor]:
    return {k: unpack_weight(p) for k, p in packed.tensors.items()}


def save(packed: PackedModel, path: str | os.PathLike[str]) -> int:
    """Write the packed model (torch.load(weights_only=True) reads it); returns the file size."""
    blob = {
        "format": FORMAT,
        "tensors": {
            k: {
                "shape": list(p.shape),
                "kind": p.kind,
                "dtype": p.dtype,
                "nm": [p.nm.n, p.nm.m] if p.nm else [],
                "values": _u8(p.values),
                "positions": _u8(p.positions),
                "scales": _u8(p.scales),
            }
            for k, p in packed.tensors.items()
        },
    }
    torch.save(blob, path)
    return os.path.getsize(path)


def load(path: str | os.PathLike[str]) -> PackedModel:
    blob = torch.load(path, weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise PruneError(f"{path} is not a {FORMAT} file")
    return PackedModel(
        {
            k: PackedTensor(
                tuple(d["shape"]),
                d["kind"],
                d["dtype"],
                d["values"].numpy().tobytes(),
                d["positions"].numpy().tobytes(),
                d["scales"].numpy().tobytes(),
                NM(*d["nm"]) if d["nm"] else None,
            )
            for k, d in blob["tensors"].items()
        }
    )


def _u8(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)
