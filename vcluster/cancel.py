"""Stop signals as a cancellation that code checks or waits on.

SLURM and terminals tell vcluster to stop with SIGTERM (scancel, a time
limit), SIGINT (Ctrl-C) and SIGHUP (a hung-up terminal).  A ``Cancellation``
turns them into one flag: the signal handler only records which signal came,
and the code decides where it can stop: ``check()`` raises ``Cancelled``,
``wait(timeout)`` sleeps until the timeout or the signal, whichever is
first.  Nothing is raised from inside a signal handler, so no clean-up is
ever cut short half-way.  ``blocked()`` holds the signals back around a
step that must not be split (starting a child and recording it).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence
from types import FrameType

from vcluster.errors import VclusterError

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# What each signal means for a user, for the message they see.
WHY = {
    signal.SIGTERM: "the job was cancelled or reached its time limit (SIGTERM)",
    signal.SIGINT: "interrupted (Ctrl-C)",
    signal.SIGHUP: "the terminal hung up (SIGHUP)",
}


class Cancelled(VclusterError):
    """A stop signal arrived; ``signal`` says which (None: cancelled by code)."""

    exit_code = 130

    def __init__(self, message: str, signum: int | None = None) -> None:
        self.signal = signum
        super().__init__(message)


class Cancellation:
    """A flag set by stop signals (once ``installed``) or by ``cancel``."""

    def __init__(self, signals: Sequence[int] = STOP_SIGNALS) -> None:
        self.signals = tuple(signals)
        self.signum: int | None = None  # the first stop signal that arrived
        self.reason: str | None = None
        self._event = threading.Event()

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if not self._event.is_set():
            self.signum = signum
            name = signal.Signals(signum)
            self.reason = WHY.get(name, f"stopped ({name.name})")
        self._event.set()

    def cancel(self, reason: str = "cancelled") -> None:
        if not self._event.is_set():
            self.reason = reason
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    @property
    def signal_name(self) -> str | None:
        return None if self.signum is None else signal.Signals(self.signum).name

    def check(self, what: str = "stopped") -> None:
        """Raise ``Cancelled`` (``what: reason``) if a stop signal arrived."""
        if self._event.is_set():
            raise Cancelled(f"{what}: {self.reason}", self.signum)

    def wait(self, timeout: float | None) -> bool:
        """Sleep up to ``timeout`` seconds; True as soon as cancelled."""
        return self._event.wait(timeout)

    @contextlib.contextmanager
    def installed(self) -> Iterator[Cancellation]:
        """Handle the stop signals with this cancellation inside the block (main thread)."""
        saved = {sig: signal.signal(sig, self._handle) for sig in self.signals}
        try:
            yield self
        finally:
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    @contextlib.contextmanager
    def blocked(self) -> Iterator[None]:
        """Hold the stop signals back inside the block; they are handled after it."""
        old = signal.pthread_sigmask(signal.SIG_BLOCK, self.signals)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def ignored(signals: Sequence[int] = STOP_SIGNALS) -> Iterator[None]:
    """Ignore the stop signals inside the block (a clean-up that must finish)."""
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in signals}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
