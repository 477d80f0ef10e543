"""Standard input and output relayed to a TCP connection (``vcluster nc``, ssh's ProxyCommand)."""

from __future__ import annotations

import os
import selectors
import socket
import sys

from vcluster.errors import VclusterError

CHUNK = 64 * 1024
CONNECT_TIMEOUT = 10.0


def relay_tcp(address: str, port: int) -> int:
    """Relay stdin to ``address:port`` and the connection to stdout until it closes; 0."""
    try:
        conn = socket.create_connection((address, port), timeout=CONNECT_TIMEOUT)
    except OSError as e:
        raise VclusterError(f"cannot connect to {address}:{port}: {e.strerror or e}") from e
    conn.settimeout(None)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    with conn, selectors.DefaultSelector() as sel:
        sel.register(conn, selectors.EVENT_READ)
        sel.register(stdin, selectors.EVENT_READ)
        while True:
            for key, _ in sel.select():
                if key.fileobj is conn:
                    data = conn.recv(CHUNK)
                    if not data:
                        return 0  # the far end closed: so do we
                    _write_all(stdout, data)
                else:
                    data = os.read(stdin, CHUNK)
                    if not data:
                        sel.unregister(stdin)
                        conn.shutdown(socket.SHUT_WR)
                    else:
                        conn.sendall(data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
