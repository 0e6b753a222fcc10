"""Compressor names, the spec parser and `build`.

A spec reads like Python calls composed left to right with `|`:
    "topk(0.01)", "randk(ratio=0.05)", "qsgd(levels=16, norm=linf)", "topk(0.01) | qsgd(levels=16)".
Arguments are numbers, true/false, or (quoted or bare) words. Third-party operators join with
`@register("name")` or through the `fedsqueeze.compressors` entry-point group (an entry point's
factory with a true `needs_layout` attribute gets the model layout, as `register(needs_layout=True)`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any, TypeVar

from fedsqueeze.specs import SpecError, parse_chain

from .base import Compressor, CompressorError

ENTRY_POINT_GROUP = "fedsqueeze.compressors"

Factory = Callable[..., Compressor]
F = TypeVar("F", bound=Factory)

_REGISTRY: dict[str, Factory] = {}
_LAYOUT_AWARE: set[str] = set()
#: entry-point plug-ins that failed to load: name -> why (raised when a spec names them)
_BROKEN: dict[str, str] = {}
_entry_points_loaded = False


def register(name: str, *, needs_layout: bool = False) -> Callable[[F], F]:
    """Register a compressor class or factory under `name` so that specs can use it.

    `needs_layout`: the factory takes a keyword `layout` (the shapes of the model's tensors).
    """
    if not name.isidentifier():
        raise CompressorError(f"compressor name {name!r} is not an identifier")

    def decorate(factory: F) -> F:
        existing = _REGISTRY.get(name)
        if existing is not None and existing is not factory:
            raise CompressorError(f"a compressor named {name!r} is already registered ({existing!r})")
        _REGISTRY[name] = factory
        if needs_layout:
            _LAYOUT_AWARE.add(name)
        if isinstance(factory, type) and not factory.name:
            factory.name = name
        return factory

    return decorate


def available() -> list[str]:
    """Every registered compressor name, sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name in _REGISTRY:
            continue
        try:
            factory = ep.load()
            register(ep.name, needs_layout=bool(getattr(factory, "needs_layout", False)))(factory)
        except Exception as exc:  # a broken plug-in must not hide the others: it fails when named
            _BROKEN[ep.name] = f"cannot load compressor plug-in {ep.name!r} ({ep.value}): {type(exc).__name__}: {exc}"


def build(spec: str, layout: Sequence[Sequence[int]] | None = None) -> Compressor:
    """The compressor a spec string describes.

    `layout`: the shapes of the model tensors, in the order they are flattened; operators that
    work on matrices (powersgd) need it.
    """
    from .compose import compose

    calls = parse(spec)
    stages = [_instantiate(name, args, kwargs, layout, spec) for name, args, kwargs in calls]
    return compose(stages)


def parse(spec: str) -> list[tuple[str, list[Any], dict[str, Any]]]:
    """Split a spec into (name, positional args, keyword args) per stage, left to right."""
    if not isinstance(spec, str) or not spec.strip():
        raise CompressorError(f"empty compressor spec {spec!r}; valid names: {', '.join(available())}")
    try:
        stages = parse_chain(spec, example="topk(0.01) | qsgd(levels=16)")
    except SpecError as exc:
        raise CompressorError(f"cannot parse compressor spec {spec!r}: {exc}") from None
    out = []
    for stage in stages:
        for value in [*stage.args, *stage.kwargs.values()]:
            if not isinstance(value, (int, float, str, bool)):
                raise CompressorError(f"argument {value!r} in {spec!r} is not a number, true/false or a word")
        out.append((stage.name, list(stage.args), dict(stage.kwargs)))
    return out


def _instantiate(
    name: str, args: list[Any], kwargs: dict[str, Any], layout: Sequence[Sequence[int]] | None, spec: str
) -> Compressor:
    _load_entry_points()
    factory = _REGISTRY.get(name)
    if factory is None and name in _BROKEN:
        raise CompressorError(f"{_BROKEN[name]}; in {spec!r}")
    if factory is None:
        raise CompressorError(f"unknown compressor {name!r} in {spec!r}; valid names: {', '.join(available())}")
    if name in _LAYOUT_AWARE:
        if "layout" in kwargs:
            raise CompressorError(f"{name}: the layout comes from the model, not from the spec")
        kwargs = {**kwargs, "layout": layout}
    try:
        signature = inspect.signature(factory)
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        params = [p for p in _parameters(factory) if p != "layout"]
        valid = ", ".join(params) if params else "none"
        raise CompressorError(f"bad arguments for {name} in {spec!r}: {exc}; valid arguments: {valid}") from None
    except ValueError:  # builtins without a signature: let the call decide
        pass
    compressor = factory(*args, **kwargs)
    if not isinstance(compressor, Compressor):
        raise CompressorError(f"compressor factory {name!r} returned {type(compressor).__name__}, not a Compressor")
    return compressor


def _parameters(factory: Factory) -> list[str]:
    try:
        return list(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return []
