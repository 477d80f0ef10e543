"""The state store interface, independent of the backend (etcd, embedded).

Keys and values are text (``str``): keys come from ``vcluster.store.keys``,
values are JSON written by ``vcluster.store.records``.  Every call is bounded
by the configured timeout; failures are StoreUnavailable (cannot reach the
store), StorePermissionDenied (credentials or role refused) or StoreError.

Compare-and-swap goes through ``txn`` (compare, then the success or failure
operations, atomically) or its short forms ``create`` (put if absent) and
``replace`` (put if the value is still the old one).  Watches deliver events
in revision order, from now or from a given revision; leases expire the keys
attached to them unless kept alive.  A Store may be shared between threads.
"""

from __future__ import annotations

import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import Literal, Self

from vcluster.errors import StoreError

log = logging.getLogger(__name__)


class LeaseExpired(StoreError):
    """The lease is gone (expired or revoked); keys attached to it are deleted."""


class StoreClosed(StoreError):
    """The store was closed; no more calls."""


@dataclass(frozen=True)
class Entry:
    """One key as stored, with etcd's revisions (0 means none)."""

    key: str
    value: str
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class Snapshot:
    """The keys under a prefix, sorted by key, as of ``revision``.

    To list then follow a prefix without missing a change, watch from
    ``revision + 1``.
    """

    entries: tuple[Entry, ...]
    revision: int

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def values(self) -> dict[str, str]:
        return {e.key: e.value for e in self.entries}


class EventType(Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True)
class WatchEvent:
    """A change seen by a watch; ``value`` is ``""`` for a delete."""

    type: EventType
    key: str
    value: str
    revision: int


@dataclass(frozen=True)
class Lease:
    """A granted lease: keys put with it are deleted when it expires."""

    id: int
    ttl: int  # seconds, as granted


# ------------------------------------------------------------ transactions

CompareTarget = Literal["value", "version", "create", "mod"]
CompareOp = Literal["==", "!=", "<", ">"]


@dataclass(frozen=True)
class Compare:
    """One condition of a transaction: ``target(key) op operand``."""

    key: str
    target: CompareTarget
    op: CompareOp
    operand: str | int


def value_is(key: str, value: str) -> Compare:
    return Compare(key, "value", "==", value)


def absent(key: str) -> Compare:
    """The key does not exist (its create revision is 0)."""
    return Compare(key, "create", "==", 0)


def present(key: str) -> Compare:
    return Compare(key, "create", ">", 0)


def unchanged_since(key: str, mod_revision: int) -> Compare:
    """The key was last modified at ``mod_revision`` (0: it does not exist)."""
    return Compare(key, "mod", "==", mod_revision)


@dataclass(frozen=True)
class Put:
    key: str
    value: str
    lease: Lease | None = None


@dataclass(frozen=True)
class Delete:
    key: str
    prefix: bool = False


@dataclass(frozen=True)
class Get:
    key: str
    prefix: bool = False


Op = Put | Delete | Get


@dataclass(frozen=True)
class TxnResult:
    """Whether the comparisons held, and one result per executed operation:
    the entries read for a Get, None for a Put or Delete."""

    succeeded: bool
    results: tuple[tuple[Entry, ...] | None, ...]


# ------------------------------------------------------------ watches


class Watch(ABC):
    """A running watch: iterate it, or ``get`` with a timeout; ``cancel`` ends it.

    If the store goes away the iteration raises the StoreError; resume with a
    new watch from the last event's ``revision + 1``.
    """

    _DONE = object()

    def __init__(self, callback: Callable[[WatchEvent], None] | None,
                 on_error: Callable[[StoreError], None] | None) -> None:
        self._queue: queue.Queue[WatchEvent | StoreError | object] = queue.Queue()
        self._callback = callback
        self._on_error = on_error
        self._error: StoreError | None = None
        self._done = False

    # the backend feeds these from its reader thread
    def _deliver(self, event: WatchEvent) -> None:
        if self._callback is not None:
            try:
                self._callback(event)
            except Exception:
                log.exception("watch callback failed on %s", event)
        else:
            self._queue.put(event)

    def _fail(self, error: StoreError) -> None:
        if self._on_error is not None:
            try:
                self._on_error(error)
            except Exception:
                log.exception("watch error callback failed")
        self._queue.put(error)

    def _finish(self) -> None:
        self._queue.put(self._DONE)

    def get(self, timeout: float | None = None) -> WatchEvent | None:
        """The next event; None on timeout or once the watch has ended."""
        if self._error is not None:
            raise self._error
        if self._done:
            return None
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, WatchEvent):
            return item
        if isinstance(item, StoreError):
            self._error = item
            self._done = True
            raise item
        self._done = True
        return None

    def __iter__(self) -> Iterator[WatchEvent]:
        while (event := self.get()) is not None:
            yield event

    @abstractmethod
    def cancel(self) -> None:
        """Stop the watch; pending events are still returned, then the end."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cancel()


# ------------------------------------------------------------ leases


class LeaseKeeper:
    """Refreshes a lease from a background thread until stopped.

    If a refresh fails (store unreachable, lease expired) the keeper keeps
    trying while the lease may still be alive, records the error in ``error``
    and calls ``on_lost`` once the lease is known gone.
    """

    def __init__(self, store: Store, lease: Lease, interval: float | None = None,
                 on_lost: Callable[[StoreError], None] | None = None) -> None:
        self.store = store
        self.lease = lease
        self.interval = interval if interval is not None else max(lease.ttl / 3, 0.2)
        self.on_lost = on_lost
        self.error: StoreError | None = None
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{lease.id:x}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.keep_alive(self.lease)
                self.error = None
            except StoreClosed:
                return
            except LeaseExpired as e:
                self.error = e
                self.lost = True
                log.warning("%s", e)
                if self.on_lost is not None:
                    self.on_lost(e)
                return
            except StoreError as e:
                self.error = e
                log.warning("lease %x: refresh failed: %s", self.lease.id, e)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------ the store


class Store(ABC):
    """A key-value store with compare-and-swap, prefix watches and leases."""

    @abstractmethod
    def get(self, key: str) -> Entry | None:
        """The key's entry, or None if it does not exist."""

    @abstractmethod
    def get_prefix(self, prefix: str) -> Snapshot:
        """Every key starting with ``prefix``, sorted by key."""

    @abstractmethod
    def put(self, key: str, value: str, lease: Lease | None = None) -> int:
        """Store ``value`` under ``key``; returns the new revision."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Delete one key; True if it existed."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with ``prefix``; returns how many."""

    @abstractmethod
    def txn(self, compare: Sequence[Compare], success: Sequence[Op],
            failure: Sequence[Op] = ()) -> TxnResult:
        """If every comparison holds run ``success``, else ``failure``, atomically."""

    def create(self, key: str, value: str, lease: Lease | None = None) -> bool:
        """Put ``value`` only if ``key`` does not exist; True if it was created."""
        return self.txn([absent(key)], [Put(key, value, lease)]).succeeded

    def replace(self, key: str, old: str, new: str) -> bool:
        """Put ``new`` only if ``key`` still holds ``old``; True if replaced."""
        return self.txn([value_is(key, old)], [Put(key, new)]).succeeded

    @abstractmethod
    def watch_prefix(self, prefix: str, *, start_revision: int | None = None,
                     callback: Callable[[WatchEvent], None] | None = None,
                     on_error: Callable[[StoreError], None] | None = None) -> Watch:
        """Watch every key starting with ``prefix``, from now or ``start_revision``.

        With ``callback``, events go to it (on the watch's thread) instead of
        the iterator; ``on_error`` hears of a watch that broke.
        """

    @abstractmethod
    def watch(self, key: str, *, start_revision: int | None = None,
              callback: Callable[[WatchEvent], None] | None = None,
              on_error: Callable[[StoreError], None] | None = None) -> Watch:
        """Watch one key (see ``watch_prefix``)."""

    @abstractmethod
    def grant(self, ttl: int) -> Lease:
        """A new lease of ``ttl`` seconds."""

    @abstractmethod
    def keep_alive(self, lease: Lease) -> int:
        """Refresh the lease; returns its TTL, or raises LeaseExpired."""

    @abstractmethod
    def revoke(self, lease: Lease) -> None:
        """End the lease now, deleting its keys (no error if already gone)."""

    @abstractmethod
    def time_to_live(self, lease: Lease) -> int:
        """Seconds the lease has left; -1 if it is gone."""

    def keep_alive_in_background(self, lease: Lease, interval: float | None = None,
                                 on_lost: Callable[[StoreError], None] | None = None,
                                 ) -> LeaseKeeper:
        """Refresh ``lease`` every ``interval`` (default: a third of its TTL)."""
        return LeaseKeeper(self, lease, interval, on_lost)

    @abstractmethod
    def close(self) -> None:
        """Cancel the watches and release the connection."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
