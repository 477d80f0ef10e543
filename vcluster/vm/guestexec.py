"""Commands in a guest through qemu-guest-agent (QMP-style JSON on the VM's ``qga.sock``).

qemu-ga speaks QMP's wire format without a greeting or capabilities
negotiation, so ``QMPClient`` connects with both turned off (as QEMU's own
qemu-ga-client does).  ``guest-exec`` starts the command with its output
captured; ``guest-exec-status`` is polled until it has exited (qemu-ga
hands the output over only then) or the timeout passes.  A guest without a
guest agent never answers: ``guest-ping`` is bounded, and the error says so.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import shlex
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import ExecuteError, QMPClient, QMPError

from vcluster.errors import VclusterError

T = TypeVar("T")
PING_TIMEOUT = 5.0
SHUTDOWN_ANSWER = 2.0  # how long a refusal of guest-shutdown may take to come back
POLL = (0.02, 0.05, 0.1, 0.2)  # growing pauses between guest-exec-status calls, then 0.2 s

logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class GuestAgentError(VclusterError):
    """A guest agent that does not answer, or refused a command."""


@dataclass(frozen=True)
class Finished:
    """How a command in the guest ended."""

    status: int  # its exit status; 128 + N when killed by signal N; 124 after a timeout
    stdout: bytes
    stderr: bytes
    timed_out: bool = False


def as_user(user: str | None, argv: Sequence[str]) -> list[str]:
    """``argv`` run as ``user`` (None or root: as it is): through su, which busybox has too."""
    if user is None or user == "root":
        return list(argv)
    return ["su", "-s", "/bin/sh", "-c", "exec " + shlex.join(argv), user]


class GuestAgent:
    """One connection to a VM's guest agent."""

    def __init__(self, socket: Path, name: str) -> None:
        self.socket = socket
        self.name = name
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)
        self._client.await_greeting = False
        self._client.negotiate = False

    def _sync(self, what: str, coro: Awaitable[T], timeout: float) -> T:
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, timeout))
        except TimeoutError:
            raise GuestAgentError(f"{self.name}: the guest agent did not answer {what} within "
                                  f"{timeout:g} s (does the image run qemu-guest-agent?)") from None
        except (QMPError, OSError, EOFError) as e:
            raise GuestAgentError(f"{self.name}: guest agent {what}: "
                                  f"{e or type(e).__name__}") from e

    def __enter__(self) -> GuestAgent:
        if not self.socket.exists():
            raise GuestAgentError(f"{self.name}: no guest agent socket {self.socket} (is the "
                                  "VM running on this host?)")
        self._sync("connect", self._client.connect(str(self.socket)), PING_TIMEOUT)
        self._sync("guest-ping", self._client.execute("guest-ping"), PING_TIMEOUT)
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):  # the connection goes with the process anyway
            self._loop.run_until_complete(asyncio.wait_for(self._client.disconnect(), 2.0))
        self._loop.close()

    def _call(self, command: str, arguments: dict[str, Any], timeout: float) -> Any:
        return self._sync(command, self._client.execute(command, arguments), timeout)

    def execute(self, command: str, arguments: dict[str, Any] | None = None, *,
                timeout: float = PING_TIMEOUT) -> Any:
        """One guest agent command (such as ``guest-fsfreeze-freeze``) and its answer."""
        return self._call(command, arguments or {}, timeout)

    def shutdown(self) -> None:
        """Ask the guest to power off; GuestAgentError if it refuses (qemu-ga answers
        nothing when it complies: no answer, or the connection going, is success)."""
        try:
            self._call("guest-shutdown", {"mode": "powerdown"}, SHUTDOWN_ANSWER)
        except GuestAgentError as e:
            if isinstance(e.__cause__, ExecuteError):
                raise

    def run(self, argv: Sequence[str], timeout: float | None,
            stdin: bytes | None = None) -> Finished:
        """Run ``argv`` in the guest and wait for it (at most ``timeout`` seconds); ``stdin``
        is all its standard input (qemu-ga writes it, then closes the pipe)."""
        arguments: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]),
                                     "capture-output": True}
        if stdin is not None:
            arguments["input-data"] = base64.b64encode(stdin).decode()
        try:
            started = self._call("guest-exec", arguments, PING_TIMEOUT)
        except GuestAgentError as e:
            if isinstance(e.__cause__, ExecuteError):  # the guest could not start it
                return Finished(127, b"", f"{argv[0]}: {e.__cause__}\n".encode())
            raise
        pid = int(started["pid"])
        deadline = None if timeout is None else time.monotonic() + timeout
        pauses = iter(POLL)
        while True:
            status = self._call("guest-exec-status", {"pid": pid}, PING_TIMEOUT)
            if status.get("exited"):
                return _finished(status)
            if deadline is not None and time.monotonic() > deadline:
                return Finished(124, b"", f"timed out after {timeout:g} s\n".encode(),
                                timed_out=True)
            time.sleep(next(pauses, POLL[-1]))


def _finished(status: dict[str, Any]) -> Finished:
    out = base64.b64decode(status.get("out-data", "")) if status.get("out-data") else b""
    err = base64.b64decode(status.get("err-data", "")) if status.get("err-data") else b""
    if "signal" in status:
        return Finished(128 + int(status["signal"]), out, err)
    return Finished(int(status.get("exitcode", 1)), out, err)
