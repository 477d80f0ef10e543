"""The agent's wire protocol, version 2: typed requests and answers, both ways through the codec.

One request per connection on ``<directories.run>/agent.sock``: the client
sends one JSON object and a newline, the agent answers with one JSON object
and a newline (sent with SCM_RIGHTS when it carries file descriptors)::

    {"version": 2, "op": OP, FIELDS...}  ->  {"ok": true, "answer": ANSWER}
                                         |   {"ok": false, "code": CODE, "error": MESSAGE}

FIELDS are the fields of the op's request dataclass and ANSWER is its answer
dataclass, both as ``vcluster.codec`` writes them; either end decodes with
the codec, so an unknown field, a missing one or a wrong type is refused
naming the field path (``request networks[0].mtu: ...``).  (Version 1 had
the same requests, with answers flat beside ``ok``: either end of another
version gets a clear ``unsupported-version``.)  Ops (who may call them):
request -> answer.

- ``ping`` (anyone): ``Ping`` -> ``PingAnswer``.
- ``vm-resources`` (a process of the job, as the job's user): ``VmResources``
  -> ``VmResourcesAnswer``, the taps' fds attached in the order of ``taps``;
  ``workdir`` is the job's work directory on this host (the user's, mode
  0700, removed at release).  The site decides what may be made
  (``agent/policy.py``): each network must be one of the agent's
  networks.yaml, of a type the agent makes (``vcluster.networks``), and takes
  its MTU from there (a request naming another MTU is refused); the VM index
  must be below the job's task count; a FAM region may not exceed the
  largest ``fam.max-size`` in resources.yaml; a job has at most
  ``MAX_REGIONS`` region names per host.
  A nat network gets the job a block of its subnet on this host, the
  VM an address in it and a host port forwarded to its port 22
  (``TapInfo.nat``), with the job's NAT rules (``agent/nat.py``).
  A network with a ``vni`` is joined to the job's other hosts: the VNI must
  be the one the agents took for the job's network (``vnis``); the agent
  adds a VXLAN device with forwarding entries towards every other host of
  the job (from SLURM) and a filter that accepts the VNI's packets only from
  them.
- ``vnis`` (the job's user, or root; the job running or configuring):
  ``Vnis`` -> ``VnisAnswer``, a VXLAN id per named private network, taken
  from the network's ``vni-range`` by compare-and-swap in the store (the
  same ids again when asked again); served by login-node agents too.
- ``credentials`` (any local user): ``Credentials`` -> ``CredentialsAnswer``.
- ``prolog`` (root): ``Prolog`` -> ``PrologAnswer``; ``release`` (root):
  ``Release`` -> ``ReleaseAnswer`` (``user``, the job's from the epilog's
  SLURM_JOB_USER, has its cluster keys deleted even when this host has no
  undo log of the job); ``status`` (root): ``Status`` -> ``StatusAnswer``.

Every caller is identified by SO_PEERCRED, never by what it sends.  Beyond
the types, each request's ``validate`` checks names and ranges, and a
failure is a ``bad-request`` naming the field and what was expected.  A
caller beyond the server's connection limits gets ``busy`` (try again).

Imports only the standard library, the codec and the error tree: the client
(every VM runner) loads it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from vcluster import codec
from vcluster.errors import VclusterError

VERSION = 2
MAX_MESSAGE = 64 * 1024  # a request is a few hundred bytes; refuse anything absurd
MAX_NETWORKS = 36  # one base-36 digit in device names
MAX_VM = 36**3 - 1  # three base-36 digits in device names
MIN_FAM = 4096
MAX_REGIONS = 8  # distinct FAM region names per job and host (each is host memory)
MIN_MTU, MAX_MTU = 68, 65535
VNI_MIN, VNI_MAX = 1, (1 << 24) - 1  # VXLAN ids are 24 bits

_JOB_RE = re.compile(r"^[0-9]{1,10}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TYPE_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._@-]{0,63}$")

A = TypeVar("A")


class Code(StrEnum):
    """Why a request failed."""

    DENIED = "denied"  # the caller may not do this (not root, not in the job, not its user)
    BAD_REQUEST = "bad-request"  # malformed or unsupported request
    FAILED = "failed"  # the agent tried and could not
    UNSUPPORTED_VERSION = "unsupported-version"
    BUSY = "busy"  # too many connections at once (server.py); try again
    UNAVAILABLE = "unavailable"  # the client's own: no agent answered (never on the wire)

    def __str__(self) -> str:
        return self.value

    @classmethod
    def read(cls, text: str) -> Code:
        """The code an agent sent; one this version does not know counts as ``failed``."""
        try:
            return cls(text)
        except ValueError:
            return cls.FAILED


class AgentError(VclusterError):
    """A request the agent refused or could not do: ``code`` and a one-line message.

    The same class on both ends: the agent's handlers raise it and the server
    sends it as ``Refused``; the client raises it again from what it got.
    """

    def __init__(self, code: Code, message: str) -> None:
        self.code = code
        super().__init__(message)


class AgentUnavailable(AgentError):
    """No agent answers on the socket (or what it sent cannot be read)."""

    def __init__(self, message: str) -> None:
        super().__init__(Code.UNAVAILABLE, message)


def denied(message: str) -> AgentError:
    return AgentError(Code.DENIED, message)


def bad_request(message: str) -> AgentError:
    return AgentError(Code.BAD_REQUEST, message)


def failed(message: str) -> AgentError:
    return AgentError(Code.FAILED, message)


def _invalid(where: str, problem: str) -> AgentError:
    """A bad request worded as the codec words its refusals: ``request PATH: PROBLEM``."""
    return bad_request(f"request {where}: {problem}")


def _check_job(job: str) -> None:
    if not _JOB_RE.match(job):
        raise _invalid("job", f"{job!r} is not a SLURM job id (expected digits, such as \"123\")")


def _check_name(name: str, where: str) -> None:
    if not _NAME_RE.match(name):
        raise _invalid(where, f"{name!r} is not a name (expected letters, digits, . _ - "
                              "starting with a letter or digit, at most 64)")


def _check_vni(vni: int, where: str) -> None:
    if not VNI_MIN <= vni <= VNI_MAX:
        raise _invalid(where, f"{vni} is out of range (expected a VXLAN id, {VNI_MIN} to "
                              f"{VNI_MAX})")


def _check_networks(names: list[str], where: str) -> None:
    if len(names) > MAX_NETWORKS:
        raise _invalid(where, f"{len(names)} networks (expected at most {MAX_NETWORKS})")
    if len(set(names)) != len(names):
        raise _invalid(where, f"a name appears twice in {names} (expected each network once)")


# ------------------------------------------------------------------ requests


@dataclass(frozen=True)
class NetworkSpec:
    """A network of the site (networks.yaml) to attach a VM to."""

    name: str
    type: str  # a type of vcluster.networks; the agent's policy says which it makes
    mtu: int | None = None  # None: the site's; the agent never uses another
    vni: int | None = None  # the job's VXLAN id of this network (``vnis``); None: no tunnel

    def validate(self, where: str) -> None:
        _check_name(self.name, f"{where}.name")
        if not _TYPE_RE.match(self.type):
            raise _invalid(f"{where}.type", f"{self.type!r} is not a network type (expected "
                                            "lower-case letters, such as \"private\")")
        if self.mtu is not None and not MIN_MTU <= self.mtu <= MAX_MTU:
            raise _invalid(f"{where}.mtu", f"{self.mtu} is out of range (expected {MIN_MTU} "
                                           f"to {MAX_MTU})")
        if self.vni is not None:
            _check_vni(self.vni, f"{where}.vni")


@dataclass(frozen=True)
class FamSpec:
    """A FAM region of the job: every VM asking for ``name`` gets the same one."""

    name: str
    size: int

    def validate(self, where: str) -> None:
        _check_name(self.name, f"{where}.name")
        if self.size < MIN_FAM or self.size & (self.size - 1):
            raise _invalid(f"{where}.size", f"{self.size} is not a power of two of at least "
                                            f"{MIN_FAM} bytes (ivshmem needs one)")


@dataclass(frozen=True)
class Ping:
    op: ClassVar[str] = "ping"

    def validate(self) -> None:
        pass


@dataclass(frozen=True)
class VmResources:
    op: ClassVar[str] = "vm-resources"
    job: str
    vm: int
    networks: tuple[NetworkSpec, ...]
    fam: FamSpec | None = None

    def validate(self) -> None:
        _check_job(self.job)
        if not 0 <= self.vm <= MAX_VM:
            raise _invalid("vm", f"{self.vm} is out of range (expected 0 to {MAX_VM})")
        _check_networks([n.name for n in self.networks], "networks")
        for i, net in enumerate(self.networks):
            net.validate(f"networks[{i}]")
        if self.fam is not None:
            self.fam.validate("fam")


@dataclass(frozen=True)
class Vnis:
    """The job's VXLAN ids of its private ``networks`` (names from networks.yaml)."""

    op: ClassVar[str] = "vnis"
    job: str
    networks: tuple[str, ...]

    def validate(self) -> None:
        _check_job(self.job)
        _check_networks(list(self.networks), "networks")
        for i, name in enumerate(self.networks):
            _check_name(name, f"networks[{i}]")


@dataclass(frozen=True)
class Credentials:
    op: ClassVar[str] = "credentials"

    def validate(self) -> None:
        pass


@dataclass(frozen=True)
class Prolog:
    op: ClassVar[str] = "prolog"
    job: str

    def validate(self) -> None:
        _check_job(self.job)


@dataclass(frozen=True)
class Release:
    op: ClassVar[str] = "release"
    job: str
    user: str | None = None  # the job's user, said by root (the epilog)

    def validate(self) -> None:
        _check_job(self.job)
        if self.user is not None and not _USER_RE.match(self.user):
            raise _invalid("user", f"{self.user!r} is not a user name (expected letters, "
                                   "digits and . _ @ -, at most 64)")


@dataclass(frozen=True)
class Status:
    op: ClassVar[str] = "status"

    def validate(self) -> None:
        pass


Request = Ping | VmResources | Vnis | Credentials | Prolog | Release | Status
_REQUESTS: tuple[type[Request], ...] = (Ping, VmResources, Vnis, Credentials, Prolog, Release,
                                        Status)
OPS: dict[str, type[Request]] = {cls.op: cls for cls in _REQUESTS}


def encode_request(request: Request) -> bytes:
    """One request on the wire: the version, the op and its fields."""
    message = {"version": VERSION, "op": request.op, **codec.to_data(request)}
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def parse(line: bytes) -> Request:
    """The request in ``line`` (one JSON object), or an AgentError saying what is wrong."""
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the request is not JSON ({e})") from None
    if not isinstance(data, dict):
        raise bad_request("the request is not a JSON object")
    version = data.pop("version", None)
    if version != VERSION:
        raise AgentError(Code.UNSUPPORTED_VERSION,
                         f"request version {json.dumps(version)} is not supported "
                         f"(this agent speaks version {VERSION})")
    op = data.pop("op", None)
    cls = OPS.get(op) if isinstance(op, str) else None
    if cls is None:
        raise _invalid("op", f"{json.dumps(op)} is not an operation (expected one of "
                             f"{', '.join(OPS)})")
    request = codec.from_data(cls, data, what="request", root="", error=bad_request)
    request.validate()
    return request


# ------------------------------------------------------------------ answers


@dataclass(frozen=True)
class PingAnswer:
    version: int
    host: str


@dataclass(frozen=True)
class NatLease:
    """What a VM gets of a nat network on its host."""

    address: str  # the VM's, CIDR (10.250.0.18/28)
    gateway: str  # its default route (the host's side of the bridge)
    ssh_address: str | None = None  # where others reach the VM's port 22: this host's
    ssh_port: int | None = None  # address and a port of its forwarded there


@dataclass(frozen=True)
class TapInfo:
    """A tap made for the VM; its open file descriptor travels beside the answer."""

    network: str
    ifname: str
    mac: str | None = None  # None: the VM runner chooses (cluster.mac_address)
    nat: NatLease | None = None  # set for a nat network


@dataclass(frozen=True)
class FamRegion:
    path: Path  # the region's file (the job user's, 0600)
    size: int


@dataclass(frozen=True)
class VmResourcesAnswer:
    taps: tuple[TapInfo, ...]
    fam: FamRegion | None
    workdir: Path  # the job's work directory on this host (the user's, 0700)


@dataclass(frozen=True)
class VnisAnswer:
    vnis: dict[str, int]  # network name: the job's VXLAN id of it


@dataclass(frozen=True)
class CredentialsAnswer:
    user: str  # the etcd user
    password: str = field(repr=False)
    prefix: str  # the only keys the user may touch
    endpoints: tuple[str, ...]
    ca_cert: str | None = None  # PEM text of the store's CA, when batch.yaml names one


@dataclass(frozen=True)
class PrologAnswer:
    job: str
    published: bool  # the job's owner and this host's setup are in the store


@dataclass(frozen=True)
class ReleaseAnswer:
    job: str
    removed: tuple[str, ...]  # what was removed, in words ("tap vct3fv0n0")


@dataclass(frozen=True)
class LoggedEntry:
    """One thing a job's undo log names: ``kind`` is bridge, tap, vxlan, nft, dir, file,
    tree or store."""

    kind: str
    name: str
    vm: int | None = None
    network: str | None = None
    vni: int | None = None  # a vxlan device's VXLAN id


@dataclass(frozen=True)
class LoggedJob:
    """What a job's undo log on this host holds."""

    uid: int
    user: str
    created: float
    published: bool
    networks: dict[str, int]  # network name: the index in its devices' names
    entries: tuple[LoggedEntry, ...]


@dataclass(frozen=True)
class JobStatus:
    """One undo log on this host: what it holds, or why it cannot be read."""

    job: str
    log: LoggedJob | None = None
    error: str | None = None

    def __post_init__(self) -> None:
        if (self.log is None) == (self.error is None):
            raise ValueError("a job's status has either its log or an error")


@dataclass(frozen=True)
class StatusAnswer:
    host: str
    node: str  # the SLURM node name of this host
    registered: bool  # the host's registration lease is held
    jobs: tuple[JobStatus, ...]


Answer = (PingAnswer | VmResourcesAnswer | VnisAnswer | CredentialsAnswer | PrologAnswer
          | ReleaseAnswer | StatusAnswer)


# ------------------------------------------------------------------ replies


@dataclass(frozen=True)
class Answered:
    ok: Literal[True]
    answer: Any  # the op's answer dataclass: read by a caller who knows the op


@dataclass(frozen=True)
class Refused:
    ok: Literal[False]
    code: str  # a Code; read with Code.read, so a newer agent's code still reads
    error: str  # one line


Reply = Answered | Refused


def encode_reply(reply: Reply) -> bytes:
    """One reply on the wire: compact JSON and a newline."""
    return codec.to_json(reply).encode() + b"\n"


def decode_reply(line: bytes, cls: type[A], unreadable: Callable[[str], Exception]) -> A:
    """The answer of class ``cls`` in ``line``; AgentError for a refusal.

    A reply that does not decode is ``unreadable(message)``.
    """
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise unreadable(f"the reply is not JSON ({e}; {line[:80]!r})") from None
    if isinstance(data, dict) and data.get("ok") is False:
        refused = codec.from_data(Refused, data, what="reply", error=unreadable)
        raise AgentError(Code.read(refused.code), refused.error)
    answered = codec.from_data(Answered, data, what="reply", error=unreadable)
    return codec.from_data(cls, answered.answer, what="reply", root="answer", error=unreadable)
