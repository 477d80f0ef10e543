"""Real etcd servers for the store tests: free loopback ports, stopped by PID."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vcluster.sandbox.etcd import EtcdServer, start_etcd, stop_etcd


def free_port() -> int:
    """A TCP port nobody listens on at the moment, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def running_etcd(workdir: Path, **options: Any) -> Iterator[EtcdServer]:
    """An etcd with auth enabled on free loopback ports, stopped on exit (even on failure)."""
    server = start_etcd(workdir, client_port=free_port(), peer_port=free_port(), **options)
    try:
        yield server
    finally:
        stop_etcd(server)


@contextmanager
def silent_listener() -> Iterator[int]:
    """A port that accepts TCP connections and never answers (a hung server)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        port: int = s.getsockname()[1]
        yield port
