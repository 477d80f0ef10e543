"""Helpers for the store tests, whatever the backend: watching, racing, a clock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from vcluster.store.base import Store, Watch, WatchEvent


class FakeClock:
    """A clock for MemoryStore that moves only when told, so leases expire on cue."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def events(watch: Watch, count: int, timeout: float = 5.0) -> list[WatchEvent]:
    """Up to ``count`` events, waiting at most ``timeout`` in all."""
    got: list[WatchEvent] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        event = watch.get(timeout=deadline - time.monotonic())
        if event is not None:
            got.append(event)
    return got


def race(stores: dict[str, Store], attempt: Callable[[str, Store], bool]) -> dict[str, bool]:
    """Start ``attempt(name, store)`` for every client at the same instant; who won."""
    barrier = threading.Barrier(len(stores))
    won: dict[str, bool] = {}

    def contend(name: str, store: Store) -> None:
        barrier.wait()
        won[name] = attempt(name, store)

    threads = [threading.Thread(target=contend, args=item) for item in stores.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return won
