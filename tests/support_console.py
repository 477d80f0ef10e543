"""Commands typed into a running VM's serial console, by root, with their exit status.

The tiny image gives a root shell on ttyS0.  Root (the tests, the benchmarks)
connects to the VM's console socket in the job's work directory, types
``COMMAND; echo MARK:$?`` and reads what the console sends back until
``MARK:<status>`` appears.  The typed line is echoed too, but there ``$?`` is
still literal, so only the shell's answer matches.  A reader thread drains
the socket all the time: QEMU stops the guest's serial output when its
client does not read.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import socket
import threading
import time
from dataclasses import dataclass, field

from vcluster.hostpaths import VmFiles

_COUNTER = itertools.count(1)


@dataclass(frozen=True)
class Result:
    status: int
    output: str  # what the command printed, without the echoed command line

    def __str__(self) -> str:
        return f"exit {self.status}: {self.output}"


@dataclass
class GuestShell:
    """The shell on one VM's serial console."""

    name: str
    files: VmFiles
    _conn: socket.socket | None = field(default=None, repr=False)
    _received: bytearray = field(default_factory=bytearray, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _reader: threading.Thread | None = field(default=None, repr=False)

    def _connect(self) -> socket.socket:
        if self._conn is None:
            self._conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._conn.connect(str(self.files.console_socket))
            self._reader = threading.Thread(target=self._read, args=(self._conn,),
                                            name=f"console-{self.name}", daemon=True)
            self._reader.start()
        return self._conn

    def _read(self, conn: socket.socket) -> None:
        while True:
            try:
                chunk = conn.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            with self._lock:
                self._received += chunk

    def _text(self, start: int) -> str:
        with self._lock:
            return self._received[start:].decode(errors="replace")

    def run(self, command: str, timeout: float = 60) -> Result:
        """Run ``command`` in the guest's shell; its status and output."""
        mark = f"vc-done-{next(_COUNTER)}-{time.monotonic_ns() % 100000}"
        conn = self._connect()
        with self._lock:
            start = len(self._received)
        conn.sendall(f"{command}; echo {mark}:$?\n".encode())
        # Not anchored: on the first command the shell's first prompt may come after our
        # echoed line and before the answer.  The echoed line has "$?", never digits.
        done = re.compile(rf"{re.escape(mark)}:(\d+)\b")
        deadline = time.monotonic() + timeout
        while True:
            text = self._text(start)
            found = done.search(text)
            if found:
                lines = text[:found.start()].replace("\r", "").splitlines()
                kept = [line for line in lines if mark not in line]
                if kept and kept[-1].strip() in ("#", "$"):  # the prompt before the answer
                    kept.pop()
                output = "\n".join(kept).strip()
                return Result(int(found.group(1)), output)
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: {command!r} did not finish in {timeout:g} s; "
                                     f"console since:\n{text[-2000:]}")
            time.sleep(0.05)

    def check(self, command: str, timeout: float = 60) -> str:
        """``run``, asserting exit status 0; the output."""
        result = self.run(command, timeout)
        assert result.status == 0, f"{self.name}: {command!r}: {result}"
        return result.output

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RDWR)  # wakes the reader's recv
            self._conn.close()
            self._conn = None
        if self._reader is not None:
            self._reader.join(5)
            self._reader = None
