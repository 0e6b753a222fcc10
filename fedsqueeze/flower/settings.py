"""What `compress_mod` and `Compressed` agree on, and how it travels: keys in the train message's config.

The wrapper puts its settings (uplink spec, feedback, per-tensor rules, dense threshold, randomness,
downlink spec) into every train message's ConfigRecord under `fedsqueeze.*` keys, with the round's
shared seed and, for a mechanism with client memory, the feedback acknowledgement. The mod compares
them with its own before it trains: any difference is an error reply naming both values, never a
payload the server would decode under another layout.

Payloads travel in the message's one ArrayRecord as `Array(dtype="uint8", stype="fedsqueeze/v1")`
under `PAYLOAD_PREFIX + group key` (the packing of `fedsqueeze.client.app`); arrays that are not
floating point (counters, masks) travel unchanged under their own names.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np

from fedsqueeze.config import Config, ConfigError, format_rules, resolve
from fedsqueeze.engine import protocol
from fedsqueeze.engine.payloads import UpdatePlan

PREFIX = "fedsqueeze."
#: the round the server's Compressed wrapper is in, and its shared seed (fedsqueeze.engine.shared)
ROUND_SEED = PREFIX + protocol.ROUND_SEED
#: the last round whose reply from this node the server's feedback half took in
FEEDBACK_ACK = PREFIX + protocol.FEEDBACK_ACK
#: the feedback spec with every argument resolved (EF-BV's lam and nu depend on the cohort size)
FEEDBACK_RESOLVED = PREFIX + "feedback-resolved"
#: JSON [[name, shape, dtype], ...] of the floating arrays of a compressed broadcast (downlink set)
LAYOUT = PREFIX + "layout"
#: prefix of a payload's key in the ArrayRecord
PAYLOAD_PREFIX = "fedsqueeze:"
STYPE = protocol.STYPE
#: node's context.state key of the mod's memory (feedback and pending updates)
STATE_KEY = PREFIX + "mod"


@dataclass(frozen=True)
class Settings:
    """The compression settings both ends must share (names as in fedsqueeze's run config)."""

    uplink: str = "identity"
    feedback: str = "none"
    rules: str = ""
    dense_below: int = 0
    randomness: str = "independent"
    downlink: str = "none"

    def config(self) -> Config:
        """These settings as a fedsqueeze Config (its parsing and checks: ConfigError for a bad value)."""
        return resolve(
            overrides={
                "compressor": self.uplink,
                "feedback": self.feedback,
                "rules": self.rules,
                "dense-below": self.dense_below,
                "randomness": self.randomness,
                "downlink": self.downlink,
            }
        )

    def normalised(self) -> Settings:
        """The same settings as they are compared: specs without spaces, rules in their canonical form."""
        cfg = self.config()
        return Settings(
            uplink=_squeeze(cfg.compressor),
            feedback=_squeeze(cfg.feedback),
            rules=_squeeze(format_rules(cfg.rules)),
            dense_below=cfg.dense_below,
            randomness=cfg.randomness,
            downlink=_squeeze(cfg.downlink),
        )

    def to_config_record(self) -> dict[str, int | str]:
        return {PREFIX + f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config_record(cls, config: Mapping[str, object]) -> Settings | None:
        """The settings a train message carries (None if it carries none: the strategy is not wrapped)."""
        if PREFIX + "uplink" not in config:
            return None
        values = {}
        for f in fields(cls):
            key = PREFIX + f.name.replace("_", "-")
            value = config.get(key, getattr(cls, f.name))
            if not isinstance(value, type(getattr(cls, f.name))) or isinstance(value, bool):
                raise ConfigError(key, value, "the message carries a value of the wrong type")
            values[f.name] = value
        return cls(**values)

    def differences(self, other: Settings) -> list[str]:
        """'key: mine vs theirs' for every setting that differs (after normalisation)."""
        a, b = self.normalised(), other.normalised()
        return [
            f"{f.name.replace('_', '-')}: {getattr(a, f.name)!r} here, {getattr(b, f.name)!r} in the message"
            for f in fields(self)
            if getattr(a, f.name) != getattr(b, f.name)
        ]


def _squeeze(spec: str) -> str:
    return "".join(spec.split())


# ---- the model's arrays as one flat float32 vector ---------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The floating arrays of a record, in record order (what the payload plans compress), and the order
    of all its keys (the other arrays travel as they are)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    order: tuple[str, ...]

    @classmethod
    def of(cls, arrays: Mapping[str, np.ndarray]) -> Layout:
        items = [(k, a) for k, a in arrays.items() if np.issubdtype(a.dtype, np.floating)]
        return cls(tuple(k for k, _ in items), tuple(tuple(a.shape) for _, a in items),
                   tuple(a.dtype.name for _, a in items), tuple(arrays))  # fmt: skip

    def pairs(self) -> list[tuple[str, tuple[int, ...]]]:
        return list(zip(self.names, self.shapes, strict=True))

    def flatten(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """The floating arrays as one float32 vector (ValueError if one is missing or has another shape)."""
        if list(arrays) != list(self.order):
            raise ValueError(f"arrays {list(arrays)} differ from the {list(self.order)} the client received")
        parts = []
        for name, shape in self.pairs():
            a = np.asarray(arrays[name])
            if tuple(a.shape) != shape or not np.issubdtype(a.dtype, np.floating):
                raise ValueError(f"array {name!r} is {a.dtype} {tuple(a.shape)}, expected a float array {shape}")
            parts.append(a.astype(np.float32, copy=False).reshape(-1))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def unflatten(self, vector: np.ndarray) -> dict[str, np.ndarray]:
        out, offset = {}, 0
        for name, shape, dtype in zip(self.names, self.shapes, self.dtypes, strict=True):
            n = int(np.prod(shape, dtype=np.int64))
            out[name] = np.ascontiguousarray(vector[offset : offset + n].reshape(shape).astype(dtype))
            offset += n
        return out

    def to_json(self) -> str:
        arrays = [[n, list(s), d] for n, s, d in zip(self.names, self.shapes, self.dtypes, strict=True)]
        return json.dumps({"arrays": arrays, "order": list(self.order)})

    @classmethod
    def from_json(cls, text: object) -> Layout:
        try:
            data = json.loads(str(text))
            items = data["arrays"]
            names = tuple(str(n) for n, _, _ in items)
            shapes = tuple(tuple(int(x) for x in s) for _, s, _ in items)
            dtypes = tuple(np.dtype(str(d)).name for _, _, d in items)
            order = tuple(str(k) for k in data["order"])
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"unreadable {LAYOUT}: {exc!r}") from None
        return cls(names, shapes, dtypes, order)


def uplink_plan(settings: Settings, layout: Layout) -> UpdatePlan:
    return _plan(settings, layout, "uplink")


def downlink_plan(settings: Settings, layout: Layout) -> UpdatePlan:
    return _plan(settings, layout, "downlink")


@functools.lru_cache(maxsize=16)
def _plan(settings: Settings, layout: Layout, side: str) -> UpdatePlan:
    """(cached: the same plan for every message of a run; a plan holds no state)"""
    cfg = settings.config()
    build = UpdatePlan.uplink if side == "uplink" else UpdatePlan.downlink
    return build(layout.pairs(), cfg)


def payload_keys(plan: UpdatePlan) -> Sequence[str]:
    return [PAYLOAD_PREFIX + key for key in plan.keys()]
