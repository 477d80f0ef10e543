"""The serial console: relay a terminal to a VM's console socket, or show its log.

``relay`` connects to the unix socket QEMU serves the VM's ttyS0 on, puts
the terminal in raw mode (keys go to the guest as typed, Ctrl-C included)
and copies bytes both ways until the detach key (Ctrl-], as in telnet and
virsh), end of input, or the VM going away.  The terminal is restored on
every way out.  ``tail_lines`` gives the last lines of the console log.
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import socket
import sys
import termios
import tty
from collections.abc import Iterator
from pathlib import Path

from vcluster.errors import VclusterError

DETACH_KEY = b"\x1d"  # Ctrl-]
DETACH_NAME = "Ctrl-]"
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-Z\\-_a-z]|[\x00-\x08\x0b-\x1f\x7f]")


class ConsoleError(VclusterError):
    """A console could not be reached."""


def tail_lines(path: Path, count: int = 20, max_bytes: int = 64 * 1024) -> tuple[str, ...]:
    """The last ``count`` non-empty lines of a console log, without terminal escapes."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            data = f.read()
    except FileNotFoundError:
        return ()
    lines = [_CONTROL.sub("", line).rstrip()[:300]
             for line in data.decode("utf-8", errors="replace").splitlines()]
    return tuple(line for line in lines if line)[-count:]


def connect(path: Path, what: str) -> socket.socket:
    """Connect to a console socket, with a message saying why not."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except PermissionError:
        sock.close()
        raise ConsoleError(f"{what}: permission denied on {path} (the console is not yours)"
                           ) from None
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise ConsoleError(f"{what}: no console at {path} (the VM is not running on this "
                           "host, or not started yet)") from None
    except OSError as e:
        sock.close()
        raise ConsoleError(f"{what}: cannot connect to {path}: {e.strerror}") from None
    return sock


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Raw mode on ``fd`` if it is a terminal, restored afterwards."""
    if not os.isatty(fd):
        yield
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


def relay(sock: socket.socket, stdin: int, stdout: int) -> str:
    """Copy between the terminal and the socket; why it ended ("detached", "closed", "eof")."""
    selector = selectors.DefaultSelector()
    selector.register(stdin, selectors.EVENT_READ, "in")
    selector.register(sock, selectors.EVENT_READ, "vm")
    try:
        with raw_terminal(stdin):
            while True:
                for key, _ in selector.select():
                    if key.data == "vm":
                        data = sock.recv(65536)
                        if not data:
                            return "closed"
                        _write_all(stdout, data)
                        continue
                    data = os.read(stdin, 4096)
                    if not data:
                        return "eof"
                    if DETACH_KEY in data:
                        sock.sendall(data[:data.index(DETACH_KEY)])
                        return "detached"
                    sock.sendall(data)
    finally:
        selector.close()


def attach(path: Path, what: str) -> str:
    """Attach this process's terminal to the console at ``path``."""
    sock = connect(path, what)
    with sock:
        sys.stderr.write(f"Connected to the console of {what}; detach with {DETACH_NAME}.\r\n")
        sys.stderr.flush()
        how = relay(sock, sys.stdin.fileno(), sys.stdout.fileno())
    ending = {"detached": "detached", "closed": "the VM closed its console",
              "eof": "end of input"}[how]
    sys.stderr.write(f"\r\n[{what}: {ending}]\n")
    return how


def print_log(path: Path, what: str, lines: int | None = None) -> None:
    """Write the console log (or its last ``lines`` lines) to stdout."""
    try:
        with open(path, "rb") as f:
            if lines is None:
                while chunk := f.read(65536):
                    sys.stdout.buffer.write(chunk)
    except PermissionError:
        raise ConsoleError(f"{what}: permission denied on {path} (the console log is not "
                           "yours)") from None
    except FileNotFoundError:
        raise ConsoleError(f"{what}: no console log at {path} (the VM is not running on "
                           "this host)") from None
    if lines is not None:
        for line in tail_lines(path, lines):
            sys.stdout.write(line + "\n")
    sys.stdout.flush()
