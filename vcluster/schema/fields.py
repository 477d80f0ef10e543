"""Typed readers for configuration mappings.

A ``Section`` wraps one YAML mapping; each accessor validates one key and
raises a ConfigError naming file, line, key, bad value and what is allowed.
``done()`` refuses keys nobody asked for, so typos never pass silently.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from vcluster.errors import ConfigError, Origin
from vcluster.schema.source import Node

_SIZE_RE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def describe(value: Any) -> str:
    """Show a bad value the way the user wrote it."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "an empty value"
    if isinstance(value, str):
        return repr(value)
    return str(value).lower() if isinstance(value, bool) else str(value)


def parse_size(text: str) -> int | None:
    """``64M`` → 67108864 (binary units K, M, G, T; optional ``iB``/``B``)."""
    m = _SIZE_RE.match(text)
    if not m:
        return None
    return int(m.group(1)) * _UNITS[m.group(2).upper()]


def format_size(size: int) -> str:
    """67108864 → ``64M``: the largest unit that divides evenly."""
    for unit in ("T", "G", "M", "K"):
        if size and size % _UNITS[unit] == 0:
            return f"{size // _UNITS[unit]}{unit}"
    return str(size)


class Section:
    """One mapping in a configuration file, read key by key."""

    def __init__(self, node: Node, where: str, what: str = "a mapping of keys to values") -> None:
        if not node.is_mapping:
            raise ConfigError(node.origin, where, f"{describe(node.value)} is not a mapping", what)
        self.node = node
        self.where = where
        self._used: set[str] = set()

    # -- plumbing -------------------------------------------------------------

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def names(self) -> list[str]:
        return list(self.node.value)

    def has(self, key: str) -> bool:
        return key in self.node.value and self.node.value[key].value is not None

    def raw(self, key: str) -> Node | None:
        """The node under ``key`` (marked as used), ``None`` when absent or empty."""
        self._used.add(key)
        node: Node | None = self.node.value.get(key)
        if node is None or node.value is None:
            return None
        return node

    def key_origin(self, key: str) -> Origin:
        assert self.node.key_origins is not None
        return self.node.key_origins.get(key, self.node.origin)

    def error(self, key: str, problem: str, expected: str = "") -> ConfigError:
        node = self.node.value.get(key)
        origin = node.origin if node is not None else self.node.origin
        return ConfigError(origin, self.path(key), problem, expected)

    def done(self, allowed: Iterable[str] | None = None) -> None:
        """Refuse every key that was not read (or is not in ``allowed``)."""
        known = set(allowed) if allowed is not None else self._used
        for key in self.node.value:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    self.key_origin(key),
                    self.path(key),
                    f"unknown key{hint}",
                    "one of: " + ", ".join(sorted(known)) if known else "no keys here",
                )

    # -- typed accessors ------------------------------------------------------

    def section(self, key: str) -> Section | None:
        node = self.raw(key)
        return Section(node, self.path(key)) if node is not None else None

    def string(self, key: str, default: str | None = None, *, required: bool = False,
               expected: str = "a string") -> str | None:
        node = self.raw(key)
        if node is None:
            if required:
                raise ConfigError(self.key_origin(key) if key in self.node.value
                                  else self.node.origin, self.path(key), "missing", expected)
            return default
        if isinstance(node.value, bool) or not isinstance(node.value, str | int | float):
            raise self.error(key, f"{describe(node.value)} is not a string", expected)
        return str(node.value)

    def choice(self, key: str, choices: Iterable[str], default: str) -> str:
        options = list(choices)
        value = self.string(key, default)
        assert value is not None
        if value not in options:
            raise self.error(key, f"{value!r} is not allowed", "one of: " + ", ".join(options))
        return value

    def integer(self, key: str, default: int | None = None, *, minimum: int | None = None,
                maximum: int | None = None) -> int | None:
        node = self.raw(key)
        if node is None:
            return default
        value = node.value
        bounds = "a whole number" + (f" of at least {minimum}" if minimum is not None else "") + (
            f" and at most {maximum}" if maximum is not None else "")
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"{describe(value)} is not a whole number", bounds)
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            raise self.error(key, f"{value} is out of range", bounds)
        return value

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        node = self.raw(key)
        if node is None:
            return default
        value = node.value
        if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
            raise self.error(key, f"{describe(value)} is not a valid number",
                             f"a number of at least {minimum:g}")
        return float(value)

    def boolean(self, key: str, default: bool) -> bool:
        node = self.raw(key)
        if node is None:
            return default
        if not isinstance(node.value, bool):
            raise self.error(key, f"{describe(node.value)} is not a boolean", "true or false")
        return node.value

    def size(self, key: str, default: int | None = None, *, required: bool = False) -> int | None:
        """A size such as ``512M`` or ``2G`` (binary units), in bytes."""
        expected = "a size such as 512M or 2G"
        node = self.raw(key)
        if node is None:
            if required:
                raise self.error(key, "missing", expected)
            return default
        value = node.value
        size = None
        if isinstance(value, int) and not isinstance(value, bool):
            size = value
        elif isinstance(value, str):
            size = parse_size(value)
        if size is None or size <= 0:
            raise self.error(key, f"{describe(value)} is not a size", expected)
        return size

    def strings(self, key: str, *, expected: str = "a list of strings") -> tuple[str, ...]:
        """A list of strings; a single string is taken as a one-item list."""
        node = self.raw(key)
        if node is None:
            return ()
        if isinstance(node.value, str):
            return (node.value,)
        if not isinstance(node.value, list):
            raise self.error(key, f"{describe(node.value)} is not a list", expected)
        out = []
        for item in node.value:
            if isinstance(item.value, bool) or not isinstance(item.value, str | int | float):
                raise ConfigError(item.origin, self.path(key),
                                  f"{describe(item.value)} is not a string", expected)
            out.append(str(item.value))
        return tuple(out)

    def file_path(self, key: str, base: Path, *, must_exist: bool = False) -> Path | None:
        """A path, relative ones taken from ``base`` (the file's directory); ``~`` expanded."""
        text = self.string(key, expected="a file path")
        if text is None:
            return None
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = base / path
        if must_exist and not path.exists():
            raise self.error(key, f"{text!r}: no such file", "an existing file")
        return path
