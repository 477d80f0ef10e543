"""The client of the host agent, for the VM runner, the CLI and the SLURM scripts.

Imports only the standard library (it is loaded in every VM runner, and may
be copied next to a script as it is)::

    client = AgentClient(socket_path(run_dir))
    client.ping()                       # {"ok": True, "version": 1, "host": "h1"}
    res = client.vm_resources("123", 0, [{"name": "cluster", "type": "private"}],
                              {"name": "fam", "size": 1 << 26})  # mtu: optional, the site's
    res.taps[0].fd, res.taps[0].ifname  # an open tap (IFF_TAP|IFF_NO_PI|IFF_VNET_HDR):
                                        # QEMU -netdev tap,fd=N,vhost=off
    res.fam.path, res.fam.size          # the job's FAM region file (0600, the job's user)
    client.credentials()                # etcd user, password, prefix, endpoints, ca_cert

A refusal raises AgentError (``code`` is denied, bad-request, failed,
unsupported-version, or busy: too many connections at once, try again;
``str()`` is the agent's one-line message); an agent that cannot be reached
raises AgentUnavailable.  The caller owns the returned file descriptors
(close them, or pass them to QEMU).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VERSION = 1
SOCKET_NAME = "agent.sock"
MAX_MESSAGE = 64 * 1024
MAX_FDS = 64
DEFAULT_TIMEOUT = 60.0
BUSY_RETRIES = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2)  # about 6 s in all


class AgentError(Exception):
    """The agent answered ``ok: false``."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


class AgentUnavailable(AgentError):
    """No agent answers on the socket."""

    def __init__(self, message: str) -> None:
        super().__init__("unavailable", message)


@dataclass(frozen=True)
class Tap:
    network: str
    ifname: str
    mac: str | None
    fd: int


@dataclass(frozen=True)
class FamRegion:
    path: str
    size: int


@dataclass(frozen=True)
class VmDevices:
    taps: tuple[Tap, ...]
    fam: FamRegion | None
    workdir: str | None = None  # the job's directory on this host, the user's, mode 0700

    def close(self) -> None:
        """Close the tap file descriptors (once QEMU has inherited them)."""
        for tap in self.taps:
            with contextlib.suppress(OSError):
                os.close(tap.fd)


def socket_path(run_dir: str | os.PathLike[str]) -> Path:
    """The agent's socket in ``directories.run``."""
    return Path(run_dir) / SOCKET_NAME


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    data = b""
    fds: list[int] = []
    space = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)
    while not data.endswith(b"\n"):
        chunk, ancillary, _flags, _addr = sock.recvmsg(MAX_MESSAGE, space)
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(payload[:len(payload) - len(payload) % got.itemsize])
                fds.extend(got)
        if not chunk:
            break
        data += chunk
        if len(data) > MAX_MESSAGE:
            break
    return data, fds


class AgentClient:
    """Requests to the agent on ``path``, one connection each."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def request(self, op: str, **fields: Any) -> tuple[dict[str, Any], list[int]]:
        """Send one request; the answer and the file descriptors that came with it.

        An agent that is ``busy`` (too many connections at once: many VMs of a
        job starting together) is asked again a few times, with growing pauses.
        """
        for pause in BUSY_RETRIES:
            try:
                return self._request_once(op, **fields)
            except AgentError as e:
                if e.code != "busy":
                    raise
                time.sleep(pause)
        return self._request_once(op, **fields)

    def _request_once(self, op: str, **fields: Any) -> tuple[dict[str, Any], list[int]]:
        message = json.dumps({"version": VERSION, "op": op, **fields}).encode() + b"\n"
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
            answer = json.loads(data)
            if not isinstance(answer, dict):
                raise ValueError("not an object")
        except ValueError:
            for fd in fds:
                os.close(fd)
            raise AgentUnavailable(f"the vcluster agent at {self.path} sent a broken answer "
                                   f"({data[:80]!r})") from None
        if not answer.get("ok"):
            for fd in fds:
                os.close(fd)
            raise AgentError(str(answer.get("code", "failed")),
                             str(answer.get("error", "the agent refused (no reason given)")))
        return answer, fds

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        """A request whose answer carries no file descriptors."""
        answer, fds = self.request(op, **fields)
        for fd in fds:
            os.close(fd)
        return answer

    def ping(self) -> dict[str, Any]:
        return self.call("ping")

    def vm_resources(self, job: str, vm: int, networks: list[dict[str, Any]],
                     fam: dict[str, Any] | None) -> VmDevices:
        """The taps (open) and FAM region of VM ``vm`` of ``job`` on this host."""
        answer, fds = self.request("vm-resources", job=str(job), vm=vm, networks=networks,
                                   fam=fam)
        described = answer.get("taps", [])
        if len(described) != len(fds):
            for fd in fds:
                os.close(fd)
            raise AgentError("failed", f"the agent described {len(described)} taps but sent "
                                       f"{len(fds)} file descriptors")
        taps = tuple(Tap(network=str(t["network"]), ifname=str(t["ifname"]),
                         mac=t.get("mac"), fd=fd) for t, fd in zip(described, fds, strict=True))
        region = answer.get("fam")
        return VmDevices(taps=taps, fam=None if region is None else
                         FamRegion(path=str(region["path"]), size=int(region["size"])),
                         workdir=answer.get("workdir"))

    def credentials(self) -> dict[str, Any]:
        return self.call("credentials")

    def prolog(self, job: str) -> dict[str, Any]:
        return self.call("prolog", job=str(job))

    def release(self, job: str, user: str | None = None) -> dict[str, Any]:
        """Release ``job`` here (root); ``user``, the job's, also deletes its cluster keys."""
        return self.call("release", job=str(job), **({} if user is None else {"user": user}))

    def status(self) -> dict[str, Any]:
        return self.call("status")
