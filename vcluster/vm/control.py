"""Driving a running QEMU over QMP (``qemu.qmp``), synchronously and always bounded.

The runner is a plain synchronous program; this wraps ``QMPClient`` with an
event loop of its own and a timeout on every call, and turns the library's
errors into QmpError with the command that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import QMPClient, QMPError

from vcluster.errors import VclusterError

T = TypeVar("T")
CALL_TIMEOUT = 5.0

# The library logs every disconnect it did not ask for; the runner reports what matters.
logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)


class QmpError(VclusterError):
    """QEMU's monitor could not be reached or refused a command."""


class Qmp:
    """A QMP connection to one QEMU, on its unix socket."""

    def __init__(self, path: Path, name: str, timeout: float = CALL_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._client = QMPClient(name)
        self.connected = False

    def _sync(self, what: str, coro: Awaitable[T], timeout: float | None = None) -> T:
        limit = self.timeout if timeout is None else timeout
        try:
            return self._loop.run_until_complete(asyncio.wait_for(coro, limit))
        except TimeoutError:
            raise QmpError(f"QMP {what}: no answer from QEMU within {limit:g} s") from None
        except (QMPError, OSError, EOFError) as e:
            # EOFError: QEMU closed the connection (it quit, or died).
            raise QmpError(f"QMP {what}: {e or type(e).__name__}") from e

    def connect(self, deadline: float, alive: Callable[[], bool]) -> None:
        """Connect once QEMU has made its socket; give up at ``deadline`` or if QEMU died."""
        while True:
            if not alive():
                raise QmpError("QMP connect: QEMU is not running")
            if self.path.exists():
                try:
                    self._sync("connect", self._client.connect(str(self.path)))
                    self.connected = True
                    return
                except QmpError:
                    if time.monotonic() >= deadline:
                        raise
            elif time.monotonic() >= deadline:
                raise QmpError(f"QMP connect: QEMU made no socket at {self.path}")
            time.sleep(0.05)

    def execute(self, command: str, arguments: dict[str, Any] | None = None,
                timeout: float | None = None) -> Any:
        return self._sync(command, self._client.execute(command, arguments), timeout)

    def status(self) -> str:
        """The VM's run state (``running``, ``paused``, ``shutdown`` ...)."""
        reply = self.execute("query-status")
        return str(reply.get("status", "unknown")) if isinstance(reply, dict) else "unknown"

    def powerdown(self) -> None:
        """Press the ACPI power button (a guest that ignores it keeps running)."""
        self.execute("system_powerdown")

    def quit(self) -> None:
        """Ask QEMU to exit now; it may close the connection before it answers."""
        with contextlib.suppress(QmpError):
            self.execute("quit")

    def close(self) -> None:
        if self.connected:
            with contextlib.suppress(QmpError):
                self._sync("disconnect", self._client.disconnect())
            self.connected = False
        self._loop.close()
