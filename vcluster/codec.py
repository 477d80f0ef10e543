"""The project's one JSON codec: frozen dataclasses to JSON and back, strictly.

Everything vcluster writes for another process or another version to read
goes through it: store records, the agent's requests and answers, undo logs,
the sandbox state, image metadata.  ``to_json`` turns a dataclass into JSON;
``from_json`` turns it back, checking every field against its type hint:
nested dataclasses, tuples (``tuple[T, ...]`` and fixed), lists, ``dict[str,
T]``, enums (by value), ``Literal``, ``Path`` (as a string), ``X | None`` and
the scalars ``str``/``int``/``float``/``bool``.

Reading is strict in one direction only: an unknown field is refused (a
newer writer whose data this version cannot understand), and a missing field
is refused unless the dataclass gives it a default (an older writer, before
the field existed).  A dataclass's own ``__post_init__`` checks run too; a
ValueError or TypeError there is a refusal.  Every refusal names the field
path (``VmRecord.addresses[2]``) and is raised as the error the caller asks
for, so the store raises StoreError, the agent a bad request, the sandbox a
SandboxError, each with its own words for what was being read.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from vcluster.errors import VclusterError

T = TypeVar("T")


class CodecError(VclusterError):
    """Data that does not decode into the type asked for (the default refusal)."""


ErrorFactory = Callable[[str], Exception]


def to_data(obj: object) -> Any:
    """A dataclass instance as plain JSON data (dicts, lists, scalars; field order kept)."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"the codec encodes dataclass instances, not {type(obj).__name__}")
    return _encode(obj)


def to_json(obj: object, *, indent: int | None = None) -> str:
    """``obj`` as JSON: compact, or indented for files people read."""
    data = to_data(obj)
    if indent is None:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return json.dumps(data, indent=indent, ensure_ascii=False) + "\n"


def from_data(cls: type[T], data: Any, *, what: str = "data", root: str | None = None,
              error: ErrorFactory = CodecError) -> T:
    """Decode plain JSON data into ``cls``; a refusal is ``error(message)``.

    Messages read ``{what} {path}: {problem}``; the path starts at ``root``
    (default: the class name; ``""`` for paths relative to the top object).
    """
    path = cls.__name__ if root is None else root
    try:
        value: T = _decode(cls, data, path)
    except _Refused as e:
        where = f" {e.where}" if e.where else ""
        raise error(f"{what}{where}: {e.problem}") from None
    return value


def from_json(cls: type[T], text: str | bytes, *, what: str = "data",
              root: str | None = None, error: ErrorFactory = CodecError) -> T:
    """Decode JSON (as written by ``to_json``) into ``cls``; see ``from_data``."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        name = cls.__name__ if root is None else root
        raise error(" ".join(filter(None, (what, name, f"is not valid JSON: {e}")))) from e
    return from_data(cls, data, what=what, root=root, error=error)


# ---------------------------------------------------------------- encoding


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return _encode(value.value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"cannot encode a {type(value).__name__} as JSON")


# ---------------------------------------------------------------- decoding


class _Refused(Exception):
    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(f"{where}: {problem}")


def _kind(data: Any) -> str:
    if data is None:
        return "null"
    if isinstance(data, bool):
        return "a boolean"
    if isinstance(data, dict):
        return "an object"
    if isinstance(data, list):
        return "a list"
    return repr(data)


def _refuse(where: str, data: Any, expected: str) -> _Refused:
    return _Refused(where, f"{_kind(data)} is not {expected}")


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _decode(hint: Any, data: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"{where}: only X | None unions can be decoded")
        return _decode(rest[0], data, where)
    if origin in (tuple, list):
        if not isinstance(data, list):
            raise _refuse(where, data, "a list")
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            items = [_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(data)]
            return items if origin is list else tuple(items)
        if len(data) != len(args):
            raise _refuse(where, data, f"a list of {len(args)} items")
        pairs = enumerate(zip(args, data, strict=True))
        return tuple(_decode(a, v, f"{where}[{i}]") for i, (a, v) in pairs)
    if origin is dict:
        if not isinstance(data, dict):
            raise _refuse(where, data, "an object")
        if args[0] is not str:
            raise TypeError(f"{where}: only dict[str, ...] can be decoded")
        return {k: _decode(args[1], v, f"{where}[{k!r}]") for k, v in data.items()}
    if origin is typing.Literal:
        if data not in args:
            raise _refuse(where, data, "one of " + ", ".join(repr(a) for a in args))
        return data
    if origin is not None:
        raise TypeError(f"{where}: cannot decode {hint!r}")
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return _decode_dataclass(hint, data, where)
    if isinstance(hint, type) and issubclass(hint, Enum):
        try:
            return hint(data)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in hint)
            raise _refuse(where, data, f"one of {allowed}") from None
    return _decode_scalar(hint, data, where)


def _decode_scalar(hint: Any, data: Any, where: str) -> Any:
    if hint is Path:
        if not isinstance(data, str):
            raise _refuse(where, data, "a path string")
        return Path(data)
    if hint is bool:
        if not isinstance(data, bool):
            raise _refuse(where, data, "true or false")
        return data
    if hint is int:
        if not isinstance(data, int) or isinstance(data, bool):
            raise _refuse(where, data, "an integer")
        return data
    if hint is float:
        if not isinstance(data, int | float) or isinstance(data, bool):
            raise _refuse(where, data, "a number")
        return float(data)
    if hint is str:
        if not isinstance(data, str):
            raise _refuse(where, data, "a string")
        return data
    if hint is Any:
        return data
    raise TypeError(f"{where}: cannot decode {hint!r}")


def _decode_dataclass(cls: type[Any], data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise _refuse(where, data, f"an object ({cls.__name__})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise _Refused(where, f"unknown field {unknown[0]!r} (a {cls.__name__} has "
                              f"{', '.join(fields) or 'no fields'}; written by a newer "
                              "vcluster?)")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            has_default = (f.default is not dataclasses.MISSING
                           or f.default_factory is not dataclasses.MISSING)
            if has_default:
                continue
            raise _Refused(where, f"missing field {name!r}")
        kwargs[name] = _decode(hints[name], data[name], _join(where, name))
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise _Refused(where, str(e)) from e
