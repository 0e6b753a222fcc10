"""The one parser of spec strings: `name`, `name(args)`, and chains `a(...) | b(...)`.

Every spec in a config reads like a call: compressors ("topk(0.01) | qsgd(levels=16)"), feedback
("efbv(lam=0.1)"), algorithms ("flix(alpha=[0.1, 0.5])"), tasks ('libsvm-logreg(path="a.txt")',
"my_module:build(width=32)") and partitions ("dirichlet(0.3)"). The name is everything before the
first parenthesis (so it may hold '-', '.' and ':'); arguments are Python literals (numbers, quoted
strings, lists), true/false, or bare words read as strings (`norm=linf`). Each caller checks the
names and values it accepts; this module only reads the text and raises SpecError saying where.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from typing import Any

_NAME = re.compile(r"^[A-Za-z_][\w.:-]*$")
_WORDS = {"true": True, "false": False, "True": True, "False": False}


class SpecError(ValueError):
    """A spec string that does not read as name(args); the message says which part and why."""


@dataclass(frozen=True)
class Call:
    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def bind(self, names: tuple[str, ...]) -> dict[str, Any]:
        """The arguments by name, positional ones in `names` order; SpecError for too many or an unknown one."""
        valid = ", ".join(names) or "none"
        if len(self.args) > len(names):
            raise SpecError(f"{self.name} takes at most {len(names)} arguments ({valid})")
        bound = dict(zip(names, self.args, strict=False))
        for key, value in self.kwargs.items():
            if key not in names:
                raise SpecError(f"{self.name} has no argument {key!r}; valid: {valid}")
            bound[key] = value
        return bound


def parse_call(spec: str, *, example: str = "name(arg, key=value)") -> Call:
    """One `name` or `name(args)`; SpecError (with `example`) if the text is not that."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"empty spec {spec!r}; write e.g. {example!r}")
    text = spec.strip()
    name, paren, rest = text.partition("(")
    name = name.strip()
    if not _NAME.match(name):
        raise SpecError(f"cannot read {spec!r}: expected name or name(args), e.g. {example!r}")
    if not paren:
        return Call(name)
    if not rest.rstrip().endswith(")"):
        raise SpecError(f"unbalanced parentheses in {spec!r}: expected name or name(args), e.g. {example!r}")
    try:
        node = ast.parse(f"f({rest}", mode="eval").body
    except SyntaxError as exc:
        raise SpecError(f"cannot read the arguments of {spec!r}: {exc.msg}") from None
    if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
        raise SpecError(f"cannot read the arguments of {spec!r}: expected name or name(args), e.g. {example!r}")
    args = tuple(_literal(a, spec) for a in node.args)
    kwargs: dict[str, Any] = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise SpecError(f"'**' is not allowed in {spec!r}")
        kwargs[kw.arg] = _literal(kw.value, spec)
    return Call(name, args, kwargs)


def parse_chain(spec: str, *, example: str = "a(arg) | b(key=value)") -> list[Call]:
    """The stages of `a | b | ...`, left to right (a '|' inside brackets or quotes does not split)."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"empty spec {spec!r}; write e.g. {example!r}")
    return [parse_call(part, example=example) for part in _split_top_level(spec, "|")]


def quote_bare_values(spec: str) -> str | None:
    """`spec` with every `key=value` argument whose value does not read as a literal put in double quotes
    (`task(path=/data/a.txt)` -> `task(path="/data/a.txt")`), if that makes it parse; else None.

    For error messages: a file path written without quotes is the usual reason an argument does not read.
    """
    if not isinstance(spec, str):
        return None
    name, paren, rest = spec.strip().partition("(")
    if not paren or not rest.rstrip().endswith(")"):
        return None
    changed, parts = False, []
    for part in _split_top_level(rest.rstrip()[:-1], ","):
        key, eq, value = part.partition("=")
        if eq and key.strip().isidentifier() and value.strip() and not _reads_as_literal(value.strip()):
            text = value.strip().replace("\\", "\\\\").replace('"', '\\"')
            part, changed = f'{key.strip()}="{text}"', True
        parts.append(part.strip())
    if not changed:
        return None
    fixed = f"{name.strip()}({', '.join(parts)})"
    try:
        parse_call(fixed)
    except SpecError:
        return None
    return fixed


def _reads_as_literal(text: str) -> bool:
    try:
        _literal(ast.parse(text, mode="eval").body, text)
    except (SyntaxError, SpecError):
        return False
    return True


def _split_top_level(text: str, sep: str) -> list[str]:
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote and text[i - 1] != "\\" else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def _literal(node: ast.expr, spec: str) -> Any:
    if isinstance(node, ast.Name):  # bare words: true/false, or a string such as norm=linf
        return _WORDS.get(node.id, node.id)
    if isinstance(node, ast.List):
        return [_literal(v, spec) for v in node.elts]
    try:
        return ast.literal_eval(node)
    except ValueError:
        what = ast.unparse(node)
        raise SpecError(f"argument {what!r} in {spec!r} is not a number, string, list or true/false") from None
