"""``medsemi methods``: each registered method with its options' defaults, types and one-line meanings.

The meaning of an option is the comment on its line in the options dataclass (``threshold: float = 0.95  # τ``),
so the documentation lives beside the default it describes. An option another method has with the
same default is listed once, under that method, and referred to."""

from __future__ import annotations

import dataclasses
import inspect
import re
import typing

from medsemi.methods.registry import available_methods

_FIELD = re.compile(r"^\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$")


def option_comments(cls: type) -> dict[str, str]:
    """``{option: comment}`` from the source lines of ``cls`` and its dataclass bases (nearest class wins)."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        block: list[str] = []  # comment lines just above a field describe it when it has no trailing comment
        for line in source.splitlines():
            stripped = line.strip()
            if stripped.startswith("#"):
                block.append(stripped.lstrip("# "))
                continue
            match = _FIELD.match(line)
            if match and (match.group(2) or block):
                comments[match.group(1)] = (match.group(2) or " ".join(block)).strip()
            block = []
    return comments


def _type_name(tp: object) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def option_rows(cls: type) -> list[tuple[str, str, str, str]]:
    """``(name, type, default, meaning)`` of each option of an options dataclass (``name`` excluded)."""
    hints = typing.get_type_hints(cls)
    comments = option_comments(cls)
    rows = []
    for f in dataclasses.fields(cls):
        if f.name == "name":
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
        shown = f"{default:.4g}" if isinstance(default, float) else repr(default)
        rows.append((f.name, _type_name(hints.get(f.name, f.type)), shown,
                     comments.get(f.name, "(see the method's module docstring)")))
    return rows


def _defaults(cls: type) -> dict[str, str]:
    return {r[0]: r[2] for r in option_rows(cls)}


def describe_methods() -> str:
    """The text of ``medsemi methods``: an option shared with another method (same name and default) is listed
    once, under the method with the fewest options that has it all."""
    methods = available_methods()
    defaults = {name: _defaults(cls.Options) for name, cls in methods.items()}
    lines = []
    for name, cls in methods.items():
        mine = defaults[name]
        lines.append(f"{name}: {cls.description}")
        parents = [other for other, theirs in defaults.items() if other != name and theirs
                   and theirs.keys() <= mine.keys() and (len(theirs) < len(mine) or other < name)]
        parent = max(parents, key=lambda o: len(defaults[o]), default=None)
        inherited = {k for k, v in defaults[parent].items() if mine[k] == v} if parent else set()
        rows = [r for r in option_rows(cls.Options) if r[0] not in inherited]
        if parent:
            lines.append(f"  the options of {parent}" + (", with these added or defaulting differently:" if rows
                                                           else ", with the same defaults"))
        width = max((len(r[0]) for r in rows), default=0)
        for opt, tp, default, meaning in rows:
            lines.append(f"  method.{opt:<{width}}  {tp} = {default}  {meaning}")
        if not rows and parent is None:
            lines.append("  (no options)")
        lines.append("")
    return "\n".join(lines).rstrip()
