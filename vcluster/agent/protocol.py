"""The agent's request schema, version 1.

One request per connection on ``<directories.run>/agent.sock``: the client
sends one JSON object and a newline, the agent answers with one JSON object
and a newline (sent with SCM_RIGHTS when it carries file descriptors)::

    {"version": 1, "op": OP, ...}   ->  {"ok": true, ...}
                                    |   {"ok": false, "error": MESSAGE, "code": CODE}

Ops (who may call them):

- ``ping`` (anyone) -> ``version``, ``host``.
- ``vm-resources`` (a process of the job, as the job's user) with ``job``,
  ``vm``, ``networks`` ([{name, type, mtu}]; ``mtu`` optional) and ``fam``
  ({name, size} or null) -> ``taps`` ([{network, ifname, mac}], their fds
  attached in that order), ``fam`` ({path, size} or null) and ``workdir``
  (the job's work directory on this host: the user's, mode 0700, removed at
  release).  The site decides what may be made (``agent/policy.py``): each
  network must be a ``type: private`` network of the agent's networks.yaml
  and takes its MTU from there (a request naming another MTU is refused), the
  VM index must be below the job's task count, a FAM region may not exceed
  the largest ``fam.max-size`` in resources.yaml, and a job has at most
  ``MAX_REGIONS`` region names per host.
- ``credentials`` (any local user) -> ``user``, ``password``, ``prefix``,
  ``endpoints``, ``ca_cert``.
- ``prolog`` (root) with ``job``; ``release`` (root) with ``job`` and an
  optional ``user`` (the job's user, from the epilog's SLURM_JOB_USER: its
  cluster keys are deleted even when this host has no undo log of the job);
  ``status`` (root).

Every caller is identified by SO_PEERCRED, never by what it sends.  This
module parses and validates requests into frozen dataclasses; anything
malformed is a ``bad-request`` naming the field and what was expected.  A
caller beyond the server's connection limits gets ``busy`` (try again).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from vcluster.errors import VclusterError

VERSION = 1
SOCKET_NAME = "agent.sock"
MAX_MESSAGE = 64 * 1024  # a request is a few hundred bytes; refuse anything absurd
MAX_NETWORKS = 36  # one base-36 digit in device names
MAX_VM = 36**3 - 1  # three base-36 digits in device names
MIN_FAM = 4096
MAX_REGIONS = 8  # distinct FAM region names per job and host (each is host memory)

_JOB_RE = re.compile(r"^[0-9]{1,10}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._@-]{0,63}$")


class Code(StrEnum):
    """Why a request failed."""

    DENIED = "denied"  # the caller may not do this (not root, not in the job, not its user)
    BAD_REQUEST = "bad-request"  # malformed or unsupported request
    FAILED = "failed"  # the agent tried and could not
    UNSUPPORTED_VERSION = "unsupported-version"
    BUSY = "busy"  # too many connections at once (server.py); try again

    def __str__(self) -> str:
        return self.value


class Refusal(VclusterError):
    """A request the agent answers with ``ok: false``: a code and a one-line message."""

    def __init__(self, code: Code, message: str) -> None:
        self.code = code
        super().__init__(message)


def denied(message: str) -> Refusal:
    return Refusal(Code.DENIED, message)


def bad_request(message: str) -> Refusal:
    return Refusal(Code.BAD_REQUEST, message)


def failed(message: str) -> Refusal:
    return Refusal(Code.FAILED, message)


# ------------------------------------------------------------------ requests


@dataclass(frozen=True)
class NetworkSpec:
    name: str
    type: str
    mtu: int | None  # None: the site's (networks.yaml); the agent never uses another


@dataclass(frozen=True)
class FamSpec:
    name: str
    size: int


@dataclass(frozen=True)
class Ping:
    pass


@dataclass(frozen=True)
class VmResources:
    job: str
    vm: int
    networks: tuple[NetworkSpec, ...]
    fam: FamSpec | None


@dataclass(frozen=True)
class Credentials:
    pass


@dataclass(frozen=True)
class Prolog:
    job: str


@dataclass(frozen=True)
class Release:
    job: str
    user: str | None = None  # the job's user, said by root (the epilog)


@dataclass(frozen=True)
class Status:
    pass


Request = Ping | VmResources | Credentials | Prolog | Release | Status


def _field(data: dict[str, Any], key: str, kind: type, expected: str, where: str = "") -> Any:
    if key not in data:
        raise bad_request(f"{where}{key}: missing (expected {expected})")
    value = data[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad_request(f"{where}{key}: {json.dumps(value)} is not {expected}")
    return value


def job_id(data: dict[str, Any]) -> str:
    job = _field(data, "job", str, "a SLURM job id such as \"123\"")
    if not _JOB_RE.match(job):
        raise bad_request(f"job: {job!r} is not a SLURM job id (expected digits, such as \"123\")")
    return str(job)


def _name(data: dict[str, Any], where: str) -> str:
    name = str(_field(data, "name", str, "a name", where))
    if not _NAME_RE.match(name):
        raise bad_request(f"{where}name: {name!r} is not a name (expected letters, digits, "
                          ". _ - starting with a letter or digit, at most 64)")
    return name


def _network(item: Any, i: int) -> NetworkSpec:
    where = f"networks[{i}]."
    if not isinstance(item, dict):
        raise bad_request(f"networks[{i}]: expected an object {{name, type, mtu}}")
    name = _name(item, where)
    kind = str(_field(item, "type", str, "a network type such as \"private\"", where))
    if kind != "private":
        raise bad_request(f"{where}type: {kind!r} is not supported by this agent "
                          "(expected \"private\")")
    if item.get("mtu") is None:
        return NetworkSpec(name, kind, None)
    mtu = int(_field(item, "mtu", int, "an MTU from 68 to 65535", where))
    if not 68 <= mtu <= 65535:
        raise bad_request(f"{where}mtu: {mtu} is out of range (expected 68 to 65535)")
    return NetworkSpec(name, kind, mtu)


def _fam(item: Any) -> FamSpec | None:
    if item is None:
        return None
    if not isinstance(item, dict):
        raise bad_request("fam: expected an object {name, size} or null")
    name = _name(item, "fam.")
    size = int(_field(item, "size", int, "a size in bytes", "fam."))
    if size < MIN_FAM or size & (size - 1):
        raise bad_request(f"fam.size: {size} is not a power of two of at least {MIN_FAM} bytes "
                          "(ivshmem needs one)")
    return FamSpec(name, size)


def _user(data: dict[str, Any]) -> str | None:
    if data.get("user") is None:
        return None
    user = str(_field(data, "user", str, "a user name"))
    if not _USER_RE.match(user):
        raise bad_request(f"user: {user!r} is not a user name (expected letters, digits and "
                          ". _ @ -, at most 64)")
    return user


def _vm_resources(data: dict[str, Any]) -> VmResources:
    job = job_id(data)
    vm = int(_field(data, "vm", int, "a VM index from 0"))
    if not 0 <= vm <= MAX_VM:
        raise bad_request(f"vm: {vm} is out of range (expected 0 to {MAX_VM})")
    raw = _field(data, "networks", list, "a list of networks")
    if len(raw) > MAX_NETWORKS:
        raise bad_request(f"networks: {len(raw)} networks (expected at most {MAX_NETWORKS})")
    networks = tuple(_network(item, i) for i, item in enumerate(raw))
    names = [n.name for n in networks]
    if len(set(names)) != len(names):
        raise bad_request(f"networks: a name appears twice in {names}")
    return VmResources(job, vm, networks, _fam(data.get("fam")))


def parse(line: bytes) -> Request:
    """The request in ``line`` (one JSON object), or a Refusal saying what is wrong."""
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the request is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise bad_request("the request is not a JSON object")
    version = data.get("version")
    if version != VERSION:
        raise Refusal(Code.UNSUPPORTED_VERSION,
                      f"request version {json.dumps(version)} is not supported "
                      f"(this agent speaks version {VERSION})")
    op = data.get("op")
    if op == "ping":
        return Ping()
    if op == "vm-resources":
        return _vm_resources(data)
    if op == "credentials":
        return Credentials()
    if op == "prolog":
        return Prolog(job_id(data))
    if op == "release":
        return Release(job_id(data), _user(data))
    if op == "status":
        return Status()
    raise bad_request(f"op: {json.dumps(op)} is not an operation (expected one of ping, "
                      "vm-resources, credentials, prolog, release, status)")


# ------------------------------------------------------------------ responses


def encode(message: dict[str, Any]) -> bytes:
    """One message on the wire: compact JSON and a newline."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def error_response(code: Code, message: str) -> dict[str, Any]:
    return {"ok": False, "error": message, "code": code.value}
