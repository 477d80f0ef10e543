"""What the store holds, and the JSON codec that writes and reads it.

Records are frozen dataclasses.  ``to_json`` turns one into compact JSON and
``from_json`` turns it back, checking every field against its type hint:
nested dataclasses, tuples (``tuple[T, ...]`` and fixed), ``dict[str, T]``,
enums (stored by value), ``Path`` (stored as a string), ``X | None`` and the
scalars ``str``/``int``/``float``/``bool``.

The store is shared across hosts and vcluster versions, so reading is strict
in one direction only: an unknown field is refused (a newer writer whose
record this version cannot understand), and a missing field is refused unless
the dataclass gives it a default (an older writer, before the field existed).
Every refusal is a StoreError naming the record type and the field path.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

from vcluster.errors import StoreError
from vcluster.lifecycle import VmState, check_transition

T = TypeVar("T")


# ---------------------------------------------------------------- the codec


def to_json(obj: object) -> str:
    """Encode a dataclass instance as compact JSON (field order kept)."""
    if not dataclasses.is_dataclass(obj) or isinstance(obj, type):
        raise TypeError(f"to_json wants a dataclass instance, not {type(obj).__name__}")
    return json.dumps(_encode(obj), separators=(",", ":"), ensure_ascii=False)


def from_json(cls: type[T], text: str | bytes) -> T:
    """Decode JSON written by ``to_json`` into ``cls``, or raise StoreError."""
    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise StoreError(f"stored {cls.__name__} is not valid JSON: {e}") from e
    value: T = _decode(cls, data, cls.__name__)
    return value


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
    raise TypeError(f"cannot store a {type(value).__name__} as JSON")


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


def _refuse(where: str, data: Any, expected: str) -> StoreError:
    return StoreError(f"stored {where}: {_kind(data)} is not {expected}")


def _decode(hint: Any, data: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if data is None and type(None) in args:
            return None
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"{where}: only X | None unions can be stored")
        return _decode(rest[0], data, where)
    if origin is tuple:
        if not isinstance(data, list):
            raise _refuse(where, data, "a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_decode(args[0], v, f"{where}[{i}]") for i, v in enumerate(data))
        if len(data) != len(args):
            raise _refuse(where, data, f"a list of {len(args)} items")
        pairs = enumerate(zip(args, data, strict=True))
        return tuple(_decode(a, v, f"{where}[{i}]") for i, (a, v) in pairs)
    if origin is dict:
        if not isinstance(data, dict):
            raise _refuse(where, data, "an object")
        if args[0] is not str:
            raise TypeError(f"{where}: only dict[str, ...] can be stored")
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
        raise StoreError(
            f"stored {where}: unknown field {unknown[0]!r} "
            f"(a {cls.__name__} has {', '.join(fields)}; written by a newer vcluster?)"
        )
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in data:
            has_default = (f.default is not dataclasses.MISSING
                           or f.default_factory is not dataclasses.MISSING)
            if has_default:
                continue
            raise StoreError(f"stored {where}: missing field {name!r}")
        kwargs[name] = _decode(hints[name], data[name], f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise StoreError(f"stored {where}: {e}") from e


# ---------------------------------------------------------------- the records


@dataclass(frozen=True)
class HostRecord:
    """An agent's registration under ``hosts/<host>`` (kept alive by a lease)."""

    name: str
    address: str  # underlay address other hosts reach (VXLAN tunnels)
    version: str  # vcluster version of the agent
    since: float  # when the agent registered (seconds since the epoch)


@dataclass(frozen=True)
class JobOwner:
    """Who owns a job (``jobs/<jobid>/owner``), written by the agent from SLURM."""

    uid: int
    user: str


class SetupState(Enum):
    """How far an agent got setting up a job on its host."""

    PENDING = "pending"
    READY = "ready"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class HostSetup:
    """An agent's state for one job on its host (``jobs/<jobid>/hosts/<host>/setup``)."""

    state: SetupState
    error: str | None = None

    def __post_init__(self) -> None:
        if (self.state is SetupState.FAILED) != (self.error is not None):
            raise ValueError("an error message goes with the failed state, and only with it")


@dataclass(frozen=True)
class VmRecord:
    """One VM's published state (``users/<user>/clusters/<jobid>/vms/<i>``)."""

    state: VmState
    host: str | None = None  # set once a runner picked the VM up
    addresses: tuple[str, ...] = ()
    since: float = 0.0  # when the VM entered this state (seconds since the epoch)
    error: str | None = None
    console_tail: tuple[str, ...] = ()  # last console lines, published when a VM fails

    def __post_init__(self) -> None:
        if (self.state is VmState.FAILED) != (self.error is not None):
            raise ValueError("an error message goes with the failed state, and only with it")

    def moved_to(self, state: VmState, since: float, *, error: str | None = None,
                 host: str | None = None, addresses: tuple[str, ...] | None = None,
                 console_tail: tuple[str, ...] = ()) -> VmRecord:
        """The record after a legal transition (IllegalTransition otherwise)."""
        check_transition(self.state, state)
        return VmRecord(
            state=state,
            host=self.host if host is None else host,
            addresses=self.addresses if addresses is None else addresses,
            since=since,
            error=error,
            console_tail=console_tail,
        )
