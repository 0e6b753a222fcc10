"""A model's flat vector as compressed payloads, per tensor rules.

`UpdatePlan` splits the flat parameter vector (in `model.named_parameters()` order) into groups,
each compressed by one operator into one payload:
- a tensor that a rule names is a group of its own, compressed with the rule's spec;
- tensors under the size threshold (`dense-below`) form one dense group ("identity");
- every other tensor is in the default group, compressed as one vector with the main spec
  (so with no rules and no threshold the whole model is one payload: one spec for the model).
Both sides build the same plan from the same config and model, so the receiver knows each
group's length (what `fedsqueeze.wire.decode` checks a payload against).

A plan behaves like a compressor on the whole flat vector (`compress` -> list of payloads,
`decompress` -> vector), so error feedback can wrap it as it wraps a single operator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from fedsqueeze import wire
from fedsqueeze.compressors import Compressed, Compressor, Dense, Quantized, Sparse, build
from fedsqueeze.config import Config

DENSE_SPEC = "identity"
DEFAULT_GROUP = "default"
DENSE_GROUP = "dense"

#: name, numel -> (spec, key of the group the tensor joins)
SpecFor = Callable[[str, int], tuple[str, str]]


@dataclass(frozen=True)
class TensorSlot:
    name: str
    shape: tuple[int, ...]
    offset: int  # start in the flat model vector

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@dataclass(frozen=True)
class Group:
    """Tensors compressed together into one payload."""

    key: str
    spec: str
    slots: tuple[TensorSlot, ...]
    compressor: Compressor

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.slots)

    def index(self) -> torch.Tensor | None:
        """Positions of this group's coordinates in the flat vector (None: one contiguous run)."""
        if len(self.slots) == 1 or all(
            b.offset == a.offset + a.numel for a, b in zip(self.slots, self.slots[1:], strict=False)
        ):
            return None
        return torch.cat([torch.arange(s.offset, s.offset + s.numel) for s in self.slots])


class UpdatePlan:
    """The groups of a flat model vector and their compressors."""

    def __init__(self, layout: Sequence[tuple[str, Sequence[int]]], spec_for: SpecFor) -> None:
        slots = []
        offset = 0
        for name, shape in layout:
            slot = TensorSlot(name, tuple(int(s) for s in shape), offset)
            slots.append(slot)
            offset += slot.numel
        self.numel = offset
        self.layout = [(s.name, s.shape) for s in slots]
        members: dict[str, list[TensorSlot]] = {}
        specs: dict[str, str] = {}
        for slot in slots:
            spec, key = spec_for(slot.name, slot.numel)
            if key in specs and specs[key] != spec:  # same key, other spec: keep them apart
                key = f"{key}:{spec}"
            specs.setdefault(key, spec)
            members.setdefault(key, []).append(slot)
        self.groups: list[Group] = []
        for key, group_slots in members.items():
            spec = specs[key]
            compressor = build(spec, layout=[s.shape for s in group_slots])
            self.groups.append(Group(key, spec, tuple(group_slots), compressor))
        self._index = [g.index() for g in self.groups]

    @classmethod
    def uplink(cls, layout: Sequence[tuple[str, Sequence[int]]], cfg: Config) -> UpdatePlan:
        """The client->server plan of a config (rules, dense-below, compressor)."""

        cfg.check_rules([name for name, _ in layout])

        def spec_for(name: str, numel: int) -> tuple[str, str]:
            spec, rule = cfg.spec_for(name, numel)
            if rule is not None:
                return spec, f"tensor:{name}"
            return spec, (DENSE_GROUP if numel < cfg.dense_below else DEFAULT_GROUP)

        return cls(layout, spec_for)

    @classmethod
    def downlink(cls, layout: Sequence[tuple[str, Sequence[int]]], cfg: Config) -> UpdatePlan:
        """The server->client plan: `downlink` for every tensor (dense below `dense-below`), or exact float32."""
        spec = cfg.downlink
        dense_below = cfg.dense_below
        if spec in ("none", "", None):
            return cls(layout, lambda name, numel: (DENSE_SPEC, DEFAULT_GROUP))

        def spec_for(name: str, numel: int) -> tuple[str, str]:
            return (DENSE_SPEC, DENSE_GROUP) if numel < dense_below else (spec, DEFAULT_GROUP)

        return cls(layout, spec_for)

    def dense_like(self) -> UpdatePlan:
        """The same groups, every one sent exact (float32): a client's first message under init=full, a resync."""
        key_of = {s.name: g.key for g in self.groups for s in g.slots}
        return UpdatePlan(self.layout, lambda name, numel: (DENSE_SPEC, key_of[name]))

    def keys(self) -> list[str]:
        return [g.key for g in self.groups]

    def split(self, vector: torch.Tensor) -> list[torch.Tensor]:
        """The 1-D piece of `vector` each group compresses."""
        if vector.dim() != 1 or vector.numel() != self.numel:
            raise ValueError(f"expected a flat vector of {self.numel} elements, got shape {tuple(vector.shape)}")
        out = []
        for group, index in zip(self.groups, self._index, strict=True):
            if index is None:
                start = group.slots[0].offset
                out.append(vector[start : start + group.numel])
            else:
                out.append(vector[index])
        return out

    def join(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        """The flat vector from each group's piece (inverse of `split`)."""
        if len(pieces) != len(self.groups):
            raise ValueError(f"expected {len(self.groups)} pieces, got {len(pieces)}")
        if len(pieces) == 1 and pieces[0].numel() == self.numel:
            return pieces[0].reshape(-1)  # one group holds the whole vector, in order: no copy
        out = torch.empty(self.numel, dtype=pieces[0].dtype if pieces else torch.float32)
        for group, index, piece in zip(self.groups, self._index, pieces, strict=True):
            if piece.numel() != group.numel:
                raise ValueError(f"group {group.key!r} needs {group.numel} elements, got {piece.numel()}")
            if index is None:
                start = group.slots[0].offset
                out[start : start + group.numel] = piece
            else:
                out[index] = piece
        return out

    def compress(
        self, vector: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator] | None = None
    ) -> list[Compressed]:
        """One payload per group, in group order; all randomness from `generator`, or from one generator
        per group (shared randomness: each group's draws then never depend on the other groups')."""
        pieces = self.split(vector)
        if generator is None or isinstance(generator, torch.Generator):
            return [g.compressor.compress(p.contiguous(), generator) for g, p in zip(self.groups, pieces, strict=True)]
        if len(generator) != len(self.groups):
            raise ValueError(f"expected {len(self.groups)} generators (one per group), got {len(generator)}")
        return [
            g.compressor.compress(p.contiguous(), gen)
            for g, p, gen in zip(self.groups, pieces, generator, strict=True)
        ]

    def decompress(self, payloads: Sequence[Compressed]) -> torch.Tensor:
        """The flat vector the payloads stand for."""
        if len(payloads) != len(self.groups):
            raise ValueError(f"expected {len(self.groups)} payloads, got {len(payloads)}")
        pieces = []
        for group, c in zip(self.groups, payloads, strict=True):
            if c.numel != group.numel:
                raise ValueError(f"payload for {group.key!r} stands for {c.numel} elements, expected {group.numel}")
            # a dense payload stands for itself whatever the group's operator (first messages, resyncs)
            dense = c.to_dense() if isinstance(c, Dense) else group.compressor.decompress(c)
            pieces.append(dense.reshape(-1).to(torch.float32))
        return self.join(pieces)

    def decompress_sparse(self, payloads: Sequence[Compressed]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(flat indices, float32 values) of the vector the payloads stand for when every payload is
        sparse (None otherwise): what a server needs to add a top-k reply without a dense copy."""
        if len(payloads) != len(self.groups) or not all(isinstance(c, Sparse) for c in payloads):
            return None
        indices, values = [], []
        for group, index, c in zip(self.groups, self._index, payloads, strict=True):
            if c.numel != group.numel:
                raise ValueError(f"payload for {group.key!r} stands for {c.numel} elements, expected {group.numel}")
            local = c.indices.to(torch.int64)
            indices.append(local + group.slots[0].offset if index is None else index[local])
            values.append(c.values.to_dense().reshape(-1).to(torch.float32))
        if len(indices) == 1:
            return indices[0], values[0]
        return torch.cat(indices), torch.cat(values)

    def error(self, vector: torch.Tensor, payloads: Sequence[Compressed]) -> float:
        """||C(v) - v||^2 / ||v||^2 of the payloads that stand for v (0 for v = 0 = C(v), else inf at v = 0).

        Every payload decompresses to `to_dense()`, so a sparse one's error needs only its kept
        coordinates: ||v||^2 - ||v_S||^2 + ||C(v)_S - v_S||^2, no dense copy (a metric taken per reply);
        so does a quantized one's, with S its nonzero levels.
        """
        v = vector.detach().reshape(-1)
        err, whole = 0.0, None  # whole: ||v||^2 when one payload stands for all of v
        for piece, c in zip(self.split(v), payloads, strict=True):
            if isinstance(c, (Sparse, Quantized)):
                # QSGD on a long vector rounds most coordinates to level 0: like a sparse payload's,
                # its error needs only the coordinates it keeps
                if isinstance(c, Sparse):
                    where, values = c.indices, c.values.to_dense().reshape(-1)
                else:
                    where = c.nonzero_levels()
                    values = c.values_at(where)
                kept = piece[where]
                diff = values.to(piece.dtype) - kept
                energy = float(torch.dot(piece, piece))
                whole = energy if len(payloads) == 1 else None
                err += max(0.0, energy - float(torch.dot(kept, kept)))
                err += float(torch.dot(diff, diff))
            elif isinstance(c, Dense) and c.scale == 1.0 and c.values.dtype == piece.dtype and _same(c.values, piece):
                continue  # the payload holds the vector itself (identity): no error
            else:
                diff = c.to_dense().reshape(-1).to(piece.dtype) - piece
                err += float(torch.dot(diff, diff))
        if err == 0.0:  # whatever ||v|| is (identity's payloads hold v itself)
            return 0.0
        norm = whole if whole is not None else float(torch.dot(v, v))
        if norm == 0.0:
            return math.inf
        return err / norm

    def encode(self, payloads: Sequence[Compressed]) -> dict[str, bytes]:
        """The wire bytes of each group's payload, keyed by group."""
        return {g.key: wire.encode(c) for g, c in zip(self.groups, payloads, strict=True)}

    def describe(self) -> list[dict[str, object]]:
        """The groups as plain data (for logs and summaries)."""
        return [
            {"key": g.key, "spec": g.spec, "numel": g.numel, "tensors": [s.name for s in g.slots]} for g in self.groups
        ]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors are the same memory (a payload that carries its input without a copy)."""
    return a.numel() == b.numel() and a.data_ptr() == b.data_ptr() and a.stride() == b.stride()
