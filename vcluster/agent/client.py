"""The client of the host agent, for the VM runner, the CLI and the SLURM scripts.

Imports only the standard library, the agent's protocol (which imports the
codec and the error tree) and the NIC backends of ``vcluster.qemu``: it is
loaded in every VM runner.  Requests
and answers are the protocol's dataclasses::

    client = AgentClient(layout.agent_socket)      # vcluster.hostpaths.HostLayout
    client.ping()                                  # PingAnswer(version=2, host="h1")
    res = client.vm_resources("123", 0, [NetworkSpec("cluster", "private")],
                              FamSpec("fam", 1 << 26))  # mtu: optional, the site's
    res.taps[0].fd, res.taps[0].ifname  # an open tap (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR):
                                        # QEMU -netdev tap,fd=N,vhost=off
    res.fam.path, res.fam.size          # the job's FAM region file (0600, the job's user)
    res.workdir                         # the job's work directory here (the user's, 0700)
    client.credentials()                # CredentialsAnswer: etcd user, password, prefix...
    client.vnis("123", ["cluster"])     # {"cluster": 4711}: the job's VXLAN ids (the
                                        # launcher, on the login node); then
                                        # NetworkSpec("cluster", "private", vni=4711)

A refusal raises AgentError (``code`` is a protocol.Code: denied,
bad-request, failed, unsupported-version, or busy: too many connections at
once, asked again a few times first; ``str()`` is the agent's one-line
message); an agent that cannot be reached, or whose reply cannot be read,
raises AgentUnavailable.  The caller owns the returned file descriptors
(close them, or pass them to QEMU).
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from vcluster.agent import protocol as p
from vcluster.agent.protocol import (
    AgentError,
    AgentUnavailable,
    CredentialsAnswer,
    FamRegion,
    FamSpec,
    NatLease,
    NetworkSpec,
    PingAnswer,
    PrologAnswer,
    ReleaseAnswer,
    StatusAnswer,
)
from vcluster.qemu import NicBackend

MAX_FDS = 64
DEFAULT_TIMEOUT = 60.0
BUSY_RETRIES = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2)  # about 6 s in all

A = TypeVar("A")

__all__ = ["AgentClient", "AgentError", "AgentUnavailable", "FamRegion", "NatLease", "Tap",
           "VmDevices"]


@dataclass(frozen=True)
class Tap:
    network: str
    ifname: str
    mac: str | None
    fd: int
    nat: NatLease | None = None  # a nat network's address, gateway and ssh port


@dataclass(frozen=True)
class VmDevices:
    taps: tuple[Tap, ...]
    fam: FamRegion | None
    workdir: Path  # the job's directory on this host, the user's, mode 0700
    # A local cluster's NICs, one backend per network (a tap's fd, a user-space switch's
    # port, QEMU's user-mode NAT); empty: every NIC is on its tap
    ports: tuple[NicBackend, ...] = ()

    def backends(self) -> tuple[NicBackend, ...]:
        """What each NIC of the VM is plugged into, in the order of its networks."""
        return self.ports or tuple(tap.fd for tap in self.taps)

    def close(self) -> None:
        """Close the tap file descriptors (once QEMU has inherited them)."""
        for tap in self.taps:
            with contextlib.suppress(OSError):
                os.close(tap.fd)


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    data = b""
    fds: list[int] = []
    space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
    while not data.endswith(b"\n"):
        chunk, ancillary, _flags, _addr = sock.recvmsg(p.MAX_MESSAGE, space)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[:len(payload) - len(payload) % got.itemsize])
                fds.extend(got)
        if not chunk:
            break
        data += chunk
        if len(data) > p.MAX_MESSAGE:
            break
    return data, fds


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class AgentClient:
    """Requests to the agent on ``path``, one connection each."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def ask(self, request: p.Request, answer: type[A]) -> tuple[A, list[int]]:
        """Send one request; its answer (of class ``answer``) and the fds that came with it.

        An agent that is ``busy`` (too many connections at once: many VMs of a
        job starting together) is asked again a few times, with growing pauses.
        """
        for pause in BUSY_RETRIES:
            try:
                return self._ask_once(request, answer)
            except AgentError as e:
                if e.code is not p.Code.BUSY:
                    raise
                time.sleep(pause)
        return self._ask_once(request, answer)

    def _ask_once(self, request: p.Request, answer: type[A]) -> tuple[A, list[int]]:
        message = p.encode_request(request)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(str(self.path))
                # The agent may answer (busy) and close before reading: read that answer.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(message)
                data, fds = _receive(sock)
        except FileNotFoundError:
            raise AgentUnavailable(f"no vcluster agent socket at {self.path} "
                                   "(is vcluster-agent running on this host?)") from None
        except ConnectionRefusedError:
            raise AgentUnavailable(f"the vcluster agent at {self.path} does not accept "
                                   "connections (is vcluster-agent running?)") from None
        except TimeoutError:
            raise AgentUnavailable(f"the vcluster agent at {self.path} did not answer "
                                   f"within {self.timeout:g} s") from None
        except OSError as e:
            raise AgentUnavailable(f"cannot talk to the vcluster agent at {self.path}: "
                                   f"{e.strerror or e}") from None
        try:
            return p.decode_reply(data, answer, self._unreadable), fds
        except BaseException:
            _close(fds)
            raise

    def _unreadable(self, message: str) -> AgentUnavailable:
        return AgentUnavailable(f"the vcluster agent at {self.path} sent a broken answer "
                                f"({message})")

    def call(self, request: p.Request, answer: type[A]) -> A:
        """A request whose answer carries no file descriptors."""
        got, fds = self.ask(request, answer)
        _close(fds)
        return got

    def ping(self) -> PingAnswer:
        return self.call(p.Ping(), PingAnswer)

    def vm_resources(self, job: str, vm: int, networks: Sequence[NetworkSpec],
                     fam: FamSpec | None) -> VmDevices:
        """The taps (open), FAM region and work directory of VM ``vm`` of ``job`` here."""
        request = p.VmResources(job=job, vm=vm, networks=tuple(networks), fam=fam)
        answer, fds = self.ask(request, p.VmResourcesAnswer)
        if len(answer.taps) != len(fds):
            _close(fds)
            raise AgentError(p.Code.FAILED, f"the vcluster agent at {self.path} described "
                                            f"{len(answer.taps)} taps but sent {len(fds)} "
                                            "file descriptors")
        taps = tuple(Tap(network=t.network, ifname=t.ifname, mac=t.mac, fd=fd, nat=t.nat)
                     for t, fd in zip(answer.taps, fds, strict=True))
        return VmDevices(taps=taps, fam=answer.fam, workdir=answer.workdir)

    def vnis(self, job: str, networks: Sequence[str]) -> dict[str, int]:
        """The VXLAN id of each private network of ``job`` (taken once, then the same)."""
        return self.call(p.Vnis(job=job, networks=tuple(networks)), p.VnisAnswer).vnis

    def credentials(self) -> CredentialsAnswer:
        return self.call(p.Credentials(), CredentialsAnswer)

    def prolog(self, job: str) -> PrologAnswer:
        return self.call(p.Prolog(job), PrologAnswer)

    def release(self, job: str, user: str | None = None) -> ReleaseAnswer:
        """Release ``job`` here (root); ``user``, the job's, also deletes its cluster keys."""
        return self.call(p.Release(job, user), ReleaseAnswer)

    def status(self) -> StatusAnswer:
        return self.call(p.Status(), StatusAnswer)
