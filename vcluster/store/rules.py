"""What etcd refuses and how it compares, for the backends that copy it (memory, sqlite).

Both embedded backends must behave as etcd 3.4 does where callers can tell
(tests/test_store_conformance.py runs one suite on all three), so the rules
live here once: which operands a comparison takes, what a transaction may
not do, and how a comparison holds on an entry (or on a missing key).
"""

from __future__ import annotations

import operator
import queue
import threading
from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

from vcluster.errors import StoreError
from vcluster.store.base import Compare, Delete, Entry, Op, Put, Store, Watch, WatchEvent

MAX_TXN_OPS = 128  # etcd's --max-txn-ops default
MAX_LEASE_TTL = 9_000_000_000  # etcd's MaxLeaseTTL, in seconds
DEFAULT_MIN_TTL = 2  # etcd's minimum with its default 1 s election timeout

OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, ">": operator.gt,
}
TARGETS = ("value", "version", "create", "mod")


def need_key(backend: str, what: str, key: str) -> None:
    if not key:
        raise StoreError(f"{backend}: cannot {what} {key!r}: key is not provided")


def check_compare(c: Compare) -> None:
    """Refuse an unknown target or operator, or an operand of the wrong type."""
    if c.target not in TARGETS or c.op not in OPERATORS:
        raise ValueError(f"compare on {c.target} of {c.key!r}: unknown target or op {c.op!r}")
    wants_int = c.target != "value"
    if wants_int != (isinstance(c.operand, int) and not isinstance(c.operand, bool)):
        raise ValueError(f"compare on {c.target} of {c.key!r}: wrong operand {c.operand!r}")


def first_key(compare: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]) -> str:
    """The key a transaction's messages name: its first."""
    return next((c.key for c in compare), None) or next(
        (op.key for op in (*success, *failure)), "")


def check_txn(backend: str, first: str, compare: Sequence[Compare], success: Sequence[Op],
              failure: Sequence[Op]) -> None:
    """Refuse what etcd refuses before looking at the keys, in etcd's order."""
    def refuse(reason: str) -> StoreError:
        return StoreError(f"{backend}: cannot run a transaction on {first!r}: {reason}")

    if max(len(compare), len(success), len(failure)) > MAX_TXN_OPS:
        raise refuse("too many operations in txn request")
    if not all(c.key for c in compare) or not all(op.key for op in (*success, *failure)):
        raise refuse("key is not provided")
    for branch in (success, failure):
        puts: set[str] = set()
        deleted: list[Delete] = []
        for op in branch:
            if isinstance(op, Put):
                if op.key in puts or any(covers(d, op.key) for d in deleted):
                    raise refuse("duplicate key given in txn request")
                puts.add(op.key)
            elif isinstance(op, Delete):
                if any(covers(op, key) for key in puts):
                    raise refuse("duplicate key given in txn request")
                deleted.append(op)


def covers(op: Delete, key: str) -> bool:
    return key.startswith(op.key) if op.prefix else key == op.key


def holds(c: Compare, entry: Entry | None) -> bool:
    """Whether ``c`` holds on ``entry`` (None: the key does not exist)."""
    compare = OPERATORS[c.op]
    if c.target == "value":
        # etcd: a missing key has no value to compare, so this is false even for !=
        return entry is not None and compare(entry.value.encode(), str(c.operand).encode())
    if entry is None:
        actual = 0
    elif c.target == "version":
        actual = entry.version
    elif c.target == "create":
        actual = entry.create_revision
    else:
        actual = entry.mod_revision
    return bool(compare(actual, c.operand))


def check_grant(backend: str, ttl: int) -> None:
    if ttl < 1:
        raise ValueError(f"a lease lasts at least 1 s, not {ttl}")
    if ttl > MAX_LEASE_TTL:
        raise StoreError(f"{backend}: cannot grant a lease for '{ttl} s': too large lease TTL")


CANCEL_WAIT = 5.0  # as long as the etcd backend waits for a watch's reader (store.timeout)


class FedWatch(Watch):
    """A watch the backend offers every change to; its own thread delivers its events.

    ``forget`` is called once on ``cancel`` (the backend stops offering).
    """

    def __init__(self, forget: Callable[[FedWatch], None], key: str, prefix: bool, first: int,
                 callback: Callable[[WatchEvent], None] | None,
                 on_error: Callable[[StoreError], None] | None) -> None:
        super().__init__(callback, on_error)
        self._forget = forget
        self._key = key
        self._prefix = prefix
        self._first = first
        self._cancelled = False
        self._pending: queue.SimpleQueue[WatchEvent | StoreError | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"watch {key}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def offer(self, events: Sequence[WatchEvent]) -> None:
        """The events of one or more revisions: this watch keeps those it is for."""
        for event in events:
            if event.revision >= self._first and (
                    event.key.startswith(self._key) if self._prefix else event.key == self._key):
                self._pending.put(event)

    def push(self, error: StoreError) -> None:
        """End the watch with ``error`` (after what was offered before)."""
        self._pending.put(error)

    def _run(self) -> None:
        try:
            while (item := self._pending.get()) is not None:
                if isinstance(item, StoreError):
                    self._fail(item)
                    return
                self._deliver(item)
        finally:
            self._finish()

    def cancel(self) -> None:
        if self._cancelled:
            return
        self._cancelled = True
        self._forget(self)
        self._pending.put(None)  # events offered before this are still delivered
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            self._thread.join(CANCEL_WAIT)


class FedStore(Store):
    """A Store whose watches its ``_watch`` makes (both embedded backends)."""

    def watch_prefix(self, prefix: str, *, start_revision: int | None = None,
                     callback: Callable[[WatchEvent], None] | None = None,
                     on_error: Callable[[StoreError], None] | None = None) -> Watch:
        return self._watch(prefix, True, start_revision, callback, on_error)

    def watch(self, key: str, *, start_revision: int | None = None,
              callback: Callable[[WatchEvent], None] | None = None,
              on_error: Callable[[StoreError], None] | None = None) -> Watch:
        return self._watch(key, False, start_revision, callback, on_error)

    @abstractmethod
    def _watch(self, key: str, prefix: bool, start_revision: int | None,
               callback: Callable[[WatchEvent], None] | None,
               on_error: Callable[[StoreError], None] | None) -> Watch:
        """Watch ``key`` (or every key under it, with ``prefix``)."""
