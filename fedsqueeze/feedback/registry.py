"""Feedback names, the spec parser and `build`.

A spec reads like a call, with the syntax of compressor specs (`fedsqueeze.compressors.registry.parse`):
    "none", "ef", "ef21", "ef21(init=zero)", "efbv", "efbv(lam=0.1, nu=1)", "efbv(0.1, 1)", "diana(a=0.05)".
Arguments left out that have no fixed default (EF-BV's lam and nu, DIANA's a) come from the
compressor's declared constants through `fedsqueeze.feedback.theory` when the mechanism is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from fedsqueeze.compressors import CompressorError
from fedsqueeze.compressors.registry import parse

from .base import Codec, FeedbackError, Mechanism

M = TypeVar("M", bound=type[Mechanism])

_REGISTRY: dict[str, type[Mechanism]] = {}


def register(name: str) -> Callable[[M], M]:
    """Register a mechanism class under `name` so that specs can use it."""

    def decorate(cls: M) -> M:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not cls:
            raise FeedbackError(f"a feedback mechanism named {name!r} is already registered")
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return decorate


def mechanism(name: str) -> type[Mechanism]:
    """The mechanism class registered as `name`; FeedbackError lists the valid names."""
    if name not in _REGISTRY:
        raise FeedbackError(f"unknown feedback {name!r}; valid names: {', '.join(available())}")
    return _REGISTRY[name]


def available() -> list[str]:
    """Every feedback name, sorted."""
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class Context:
    """What theory defaults need: the vector length, the number of clients, the kind of randomness."""

    dim: int | None = None
    num_clients: int | None = None
    #: all clients draw the compressor's randomness from one shared seed (omega_av = omega) rather
    #: than independently (omega_av = omega / n)
    shared_randomness: bool = False


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """(name, checked arguments by name) of a feedback spec; FeedbackError lists valid names or arguments.

    Arguments the spec leaves out are absent (their defaults are resolved by `build`).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise FeedbackError(f"empty feedback spec {spec!r}; valid names: {', '.join(available())}")
    try:
        stages = parse(spec)
    except CompressorError as exc:  # the call syntax is that of compressor specs
        raise FeedbackError(str(exc).replace("compressor spec", "feedback spec")) from None
    if len(stages) != 1:
        raise FeedbackError(f"feedback spec {spec!r} has {len(stages)} stages; give one mechanism (no '|')")
    name, args, kwargs = stages[0]
    cls = _REGISTRY.get(name)
    if cls is None:
        raise FeedbackError(f"unknown feedback {name!r} in {spec!r}; valid names: {', '.join(available())}")
    params = {p.name: p for p in cls.params}
    valid = ", ".join(params) if params else "none"
    if len(args) > len(cls.params):
        raise FeedbackError(
            f"{name} takes at most {len(cls.params)} arguments, got {len(args)}; valid arguments: {valid}"
        )
    given: dict[str, Any] = {param.name: value for param, value in zip(cls.params, args, strict=False)}
    for key, value in kwargs.items():
        if key not in params:
            raise FeedbackError(f"unknown argument {key!r} for {name} in {spec!r}; valid arguments: {valid}")
        if key in given:
            raise FeedbackError(f"argument {key!r} for {name} given twice in {spec!r}")
        given[key] = value
    return name, {k: params[k].check(f"{name}: {k}", v) for k, v in given.items()}


def build(
    spec: str,
    codec: Codec,
    *,
    dim: int | None = None,
    num_clients: int | None = None,
    shared_randomness: bool = False,
    dense: Codec | None = None,
) -> Mechanism:
    """The mechanism a spec describes, around `codec` (a Compressor or a per-tensor plan).

    dim, num_clients and shared_randomness are needed only for defaults derived from the
    compressor's constants (EF-BV's lam, nu; DIANA's a). `dense` is the codec of a client's first,
    uncompressed message (default: `identity`, float32 values; give a plan of identities when
    `codec` is a multi-group plan, so that the first message has the usual structure).
    """
    name, given = parse_spec(spec)
    cls = _REGISTRY[name]
    ctx = Context(dim, num_clients, shared_randomness)
    kwargs = {p.name: given.get(p.name, p.default) for p in cls.params}
    kwargs = cls.resolve(codec, kwargs, ctx)
    return cls(codec, dense=dense, **kwargs)
