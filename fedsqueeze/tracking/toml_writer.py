"""A small TOML writer (tomllib only reads): nested dicts of str, int, float, bool and lists.

Tables become [sections], lists of dicts become [[arrays of tables]], dicts inside arrays become
inline tables. None has no TOML spelling, so keys whose value is None are left out (a reader then
falls back to its default). Tuples are written as arrays; paths as strings; numpy/torch scalars as
the Python numbers they hold.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePath
from typing import Any

from .errors import TrackingError

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def dumps_toml(data: Mapping[str, Any]) -> str:
    """Render a mapping as a TOML document."""
    if not isinstance(data, Mapping):
        raise TrackingError(f"a TOML document must be a mapping, got {type(data).__name__}")
    lines: list[str] = []
    _table(lines, (), data)
    text = "\n".join(lines).strip("\n")
    return text + "\n" if text else ""


def write_toml(path: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    """Write a TOML file atomically (a crash leaves the old file or the new one, never half of one)."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(dumps_toml(data), encoding="utf-8")
    os.replace(tmp, p)


def _plain(value: Any) -> Any:
    """Reduce numpy/torch scalars, tuples and paths to the types TOML has."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        return value.item()
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, PurePath):
        return str(value)
    return value


def _is_table(value: Any) -> bool:
    return isinstance(value, Mapping)


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)


def _table(lines: list[str], path: tuple[str, ...], data: Mapping[str, Any]) -> None:
    items = [(str(k), _plain(v)) for k, v in data.items() if v is not None]
    for key, value in items:
        if not _is_table(value) and not _is_table_array(value):
            lines.append(f"{_key(key)} = {_value(value, (*path, key))}")
    for key, value in items:
        if _is_table(value):
            sub = (*path, key)
            lines += ["", f"[{'.'.join(_key(k) for k in sub)}]"]
            _table(lines, sub, value)
    for key, value in items:
        if _is_table_array(value):
            sub = (*path, key)
            for entry in value:
                lines += ["", f"[[{'.'.join(_key(k) for k in sub)}]]"]
                _table(lines, sub, entry)


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(s: str) -> str:
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(value: Any, where: tuple[str, ...]) -> str:
    value = _plain(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v, where) for v in value if v is not None) + "]"
    if isinstance(value, Mapping):
        inner = ", ".join(f"{_key(str(k))} = {_value(v, (*where, str(k)))}" for k, v in value.items() if v is not None)
        return "{" + inner + "}" if inner else "{}"
    raise TrackingError(f"config key {'.'.join(where)!r}: cannot write {type(value).__name__} {value!r} as TOML")
