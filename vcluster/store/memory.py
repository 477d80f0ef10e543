"""An in-memory Store with the etcd backend's semantics, for tests and single-process use.

The point is that code tested against a MemoryStore behaves the same on etcd,
so this copies what etcd 3.4 does (tests/test_store_conformance.py runs the
same tests on both), including the corners callers can trip over:

- One global revision, starting at 1, raised by one per write: a transaction
  with several puts is one revision, and a write that changes nothing (a
  delete of a missing key, a read-only transaction) raises nothing.
- A comparison on the value of a missing key is false whatever the operator;
  version, create and mod compare as 0.  A transaction branch may not write a
  key twice (two puts, or a put inside a deleted range), may not exceed 128
  operations, and keys may not be empty: those are StoreErrors, as etcd
  refuses them.
- Watches replay retained history from ``start_revision``; history older than
  ``history`` revisions (or ``compact``) is dropped, and a watch from before it
  fails on its first ``get`` like one on a compacted etcd.
- A lease's TTL is at least ``min_ttl`` (etcd: 1.5 election timeouts, 2 s by
  default); ``time_to_live`` truncates to whole seconds.  Expired leases are
  revoked on the next call and by a background thread, so watchers see the
  deletes even while nobody calls.  ``clock`` is injectable so tests can
  expire leases without waiting.

There is no connection: every client of the data is this one object, shared
between threads under one lock.  Watch callbacks run on the watch's own
thread, never under the lock, so they may call the store.
"""

from __future__ import annotations

import bisect
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from vcluster.errors import StoreError
from vcluster.store.base import (
    Compare,
    Delete,
    Entry,
    EventType,
    Lease,
    LeaseExpired,
    Op,
    Put,
    Snapshot,
    StoreClosed,
    TxnResult,
    Watch,
    WatchEvent,
)
from vcluster.store.rules import (
    CANCEL_WAIT,
    DEFAULT_MIN_TTL,
    FedStore,
    FedWatch,
    check_compare,
    check_grant,
    check_txn,
    first_key,
    holds,
    need_key,
)

BACKEND = "memory store"

DEFAULT_HISTORY = 100_000  # revisions kept for watches from the past



@dataclass
class _Lease:
    id: int
    ttl: int
    expiry: float
    keys: set[str] = field(default_factory=set)


class MemoryStore(FedStore):
    """The Store interface held in this process's memory (see the module docstring)."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic,
                 min_ttl: int = DEFAULT_MIN_TTL, history: int = DEFAULT_HISTORY,
                 expiry_interval: float = 0.1) -> None:
        if min_ttl < 1 or history < 0 or expiry_interval <= 0:
            raise ValueError(f"MemoryStore: min_ttl={min_ttl} history={history} "
                             f"expiry_interval={expiry_interval}: need min_ttl >= 1, "
                             "history >= 0, expiry_interval > 0")
        self._clock = clock
        self._min_ttl = min_ttl
        self._history_limit = history
        self._expiry_interval = expiry_interval
        self._lock = threading.Lock()
        self._closed = False
        self._revision = 1  # a fresh etcd is at revision 1
        self._kv: dict[str, Entry] = {}
        self._sorted: list[str] = []  # the keys in order, so a prefix is a slice
        self._leases: dict[int, _Lease] = {}
        self._history: deque[tuple[int, tuple[WatchEvent, ...]]] = deque()
        self._compacted = 0  # watches from below this revision have missed events
        self._watches: set[FedWatch] = set()
        self._stop = threading.Event()
        self._timer: threading.Thread | None = None

    # ------------------------------------------------------------ keys

    def get(self, key: str) -> Entry | None:
        with self._lock:
            self._begin("read", key)
            need_key(BACKEND, "read", key)
            return self._kv.get(key)

    def get_prefix(self, prefix: str) -> Snapshot:
        with self._lock:
            self._begin("read", prefix)
            need_key(BACKEND, "read", prefix)
            entries = tuple(self._kv[k] for k in self._range(prefix, True))
            return Snapshot(entries, self._revision)

    def put(self, key: str, value: str, lease: Lease | None = None) -> int:
        with self._lock:
            self._begin("write", key)
            need_key(BACKEND, "write", key)
            self._need_leases("write", key, [Put(key, value, lease)])
            revision, events = self._write()
            self._put(key, value, lease, revision, events)
            self._commit(revision, events)
            return revision

    def delete(self, key: str) -> bool:
        with self._lock:
            self._begin("delete", key)
            need_key(BACKEND, "delete", key)
            revision, events = self._write()
            existed = self._delete(key, revision, events)
            self._commit(revision, events)
            return existed

    def delete_prefix(self, prefix: str) -> int:
        with self._lock:
            self._begin("delete", prefix)
            need_key(BACKEND, "delete", prefix)
            revision, events = self._write()
            for key in self._range(prefix, True):
                self._delete(key, revision, events)
            self._commit(revision, events)
            return len(events)

    def txn(self, compare: Sequence[Compare], success: Sequence[Op],
            failure: Sequence[Op] = ()) -> TxnResult:
        for c in compare:
            check_compare(c)  # before any call, as the etcd backend does
        what = "run a transaction on"
        first = first_key(compare, success, failure)
        with self._lock:
            self._begin(what, first)
            check_txn(BACKEND, first, compare, success, failure)
            succeeded = all(holds(c, self._kv.get(c.key)) for c in compare)
            ops = success if succeeded else failure
            self._need_leases(what, first, ops)
            revision, events = self._write()
            results: list[tuple[Entry, ...] | None] = []
            for op in ops:
                if isinstance(op, Put):
                    self._put(op.key, op.value, op.lease, revision, events)
                    results.append(None)
                elif isinstance(op, Delete):
                    for key in self._range(op.key, op.prefix):
                        self._delete(key, revision, events)
                    results.append(None)
                else:  # reads see this transaction's earlier writes, as in etcd
                    results.append(tuple(self._kv[k] for k in self._range(op.key, op.prefix)))
            self._commit(revision, events)
        return TxnResult(succeeded, tuple(results))

    def compact(self, revision: int) -> None:
        """Forget the events before ``revision`` (etcd's compaction): a watch
        from an earlier revision then fails instead of replaying them."""
        with self._lock:
            self._begin("compact history up to", str(revision))
            if revision > self._revision:
                raise StoreError(f"cannot compact history up to revision {revision}: "
                                 f"the store is at revision {self._revision}")
            if revision <= self._compacted:
                raise StoreError(f"cannot compact history up to revision {revision}: "
                                 f"already compacted up to {self._compacted}")
            self._drop_history(revision)

    # ------------------------------------------------------------ watches

    def _watch(self, key: str, prefix: bool, start_revision: int | None,
               callback: Callable[[WatchEvent], None] | None,
               on_error: Callable[[StoreError], None] | None) -> Watch:
        if start_revision is not None and start_revision < 0:
            raise ValueError(f"cannot watch {key!r} from revision {start_revision}")
        with self._lock:
            self._begin("watch", key)
            first = start_revision or self._revision + 1  # 0 means now, as in etcd
            watch = FedWatch(self._forget, key, prefix, first, callback, on_error)
            if first < self._compacted:
                # etcd creates the watch, then cancels it: the error comes from get()
                watch.push(StoreError(
                    f"cannot watch {key!r} from revision {start_revision}: the memory store "
                    f"has compacted its history up to revision {self._compacted} (read the "
                    "keys again and watch from the revision of that read)"))
            else:
                for revision, events in self._history:
                    if revision >= first:
                        watch.offer(events)
                self._watches.add(watch)
            watch.start()
        return watch

    # ------------------------------------------------------------ leases

    def grant(self, ttl: int) -> Lease:
        import secrets  # only leases need it, and few commands take one

        if ttl < 1:
            raise ValueError(f"a lease lasts at least 1 s, not {ttl}")
        with self._lock:
            self._begin("grant a lease for", f"{ttl} s")
            check_grant(BACKEND, ttl)
            ttl = max(ttl, self._min_ttl)
            lease_id = 0
            while lease_id == 0 or lease_id in self._leases:  # ids are opaque, like etcd's
                lease_id = secrets.randbits(63)
            self._leases[lease_id] = _Lease(lease_id, ttl, self._clock() + ttl)
            self._start_timer()
            return Lease(lease_id, ttl)

    def keep_alive(self, lease: Lease) -> int:
        with self._lock:
            self._begin("refresh lease", f"{lease.id:x}")
            held = self._leases.get(lease.id)
            if held is None:
                raise LeaseExpired(f"lease {lease.id:x} has expired or was revoked")
            held.expiry = self._clock() + held.ttl
            return held.ttl

    def revoke(self, lease: Lease) -> None:
        with self._lock:
            self._begin("revoke lease", f"{lease.id:x}")
            held = self._leases.get(lease.id)
            if held is not None:  # already gone: no error
                self._revoke(held)

    def time_to_live(self, lease: Lease) -> int:
        with self._lock:
            self._begin("read lease", f"{lease.id:x}")
            held = self._leases.get(lease.id)
            if held is None:
                return -1
            return int(held.expiry - self._clock())  # etcd truncates too

    # ------------------------------------------------------------ end

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            watches = list(self._watches)
            self._stop.set()
        for watch in watches:  # outside the lock: cancel takes it
            watch.cancel()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.join(CANCEL_WAIT)

    # ------------------------------------------------------------ internals (under the lock)

    def _write(self) -> tuple[int, list[WatchEvent]]:
        """The revision a write would take, and its events so far (see ``_commit``)."""
        return self._revision + 1, []

    def _begin(self, what: str, key: str) -> None:
        """Refuse calls on a closed store; revoke the leases that expired meanwhile."""
        if self._closed:
            raise StoreClosed(f"the store is closed (cannot {what} {key!r})")
        self._expire()

    def _range(self, key: str, prefix: bool) -> list[str]:
        if not prefix:
            return [key] if key in self._kv else []
        start = bisect.bisect_left(self._sorted, key)
        end = start
        while end < len(self._sorted) and self._sorted[end].startswith(key):
            end += 1
        return self._sorted[start:end]

    def _need_leases(self, what: str, key: str, ops: Sequence[Op]) -> None:
        for op in ops:
            if isinstance(op, Put) and op.lease is not None and op.lease.id \
                    and op.lease.id not in self._leases:
                raise LeaseExpired(f"cannot {what} {key!r}: the lease has expired or was revoked")

    def _put(self, key: str, value: str, lease: Lease | None, revision: int,
             events: list[WatchEvent]) -> None:
        lease_id = lease.id if lease is not None else 0
        old = self._kv.get(key)
        if old is None:
            bisect.insort(self._sorted, key)
            entry = Entry(key, value, revision, revision, 1, lease_id)
        else:
            if old.lease != lease_id:
                self._detach(old)
            entry = Entry(key, value, old.create_revision, revision, old.version + 1, lease_id)
        if lease_id:
            self._leases[lease_id].keys.add(key)
        self._kv[key] = entry
        events.append(WatchEvent(EventType.PUT, key, value, revision))

    def _delete(self, key: str, revision: int, events: list[WatchEvent]) -> bool:
        old = self._kv.pop(key, None)
        if old is None:
            return False
        del self._sorted[bisect.bisect_left(self._sorted, key)]
        self._detach(old)
        events.append(WatchEvent(EventType.DELETE, key, "", revision))
        return True

    def _detach(self, entry: Entry) -> None:
        if entry.lease and (held := self._leases.get(entry.lease)) is not None:
            held.keys.discard(entry.key)

    def _commit(self, revision: int, events: list[WatchEvent]) -> None:
        """End a write: only one that changed something takes the revision."""
        if not events:
            return
        self._revision = revision
        done = tuple(events)
        self._history.append((revision, done))
        if len(self._history) > self._history_limit:
            self._drop_history(self._history[-self._history_limit][0]
                               if self._history_limit else revision + 1)
        for watch in self._watches:
            watch.offer(done)

    def _drop_history(self, before: int) -> None:
        while self._history and self._history[0][0] < before:
            self._history.popleft()
        self._compacted = max(self._compacted, before)

    def _revoke(self, held: _Lease) -> None:
        """Delete the lease and its keys, all in one revision (etcd sorts them too)."""
        del self._leases[held.id]
        revision, events = self._write()
        for key in sorted(held.keys):
            self._delete(key, revision, events)
        self._commit(revision, events)

    def _expire(self) -> None:
        now = self._clock()
        expired = [held for held in self._leases.values() if held.expiry <= now]
        for held in sorted(expired, key=lambda h: (h.expiry, h.id)):
            self._revoke(held)

    def _start_timer(self) -> None:
        if self._timer is None:
            # The thread holds the store weakly so a store nobody closed can still go.
            self._timer = threading.Thread(
                target=_expire_in_background,
                args=(weakref.ref(self), self._stop, self._expiry_interval),
                name="memory-store leases", daemon=True)
            self._timer.start()

    def _expire_now(self) -> None:
        with self._lock:
            if not self._closed:
                self._expire()

    def _forget(self, watch: FedWatch) -> None:
        with self._lock:
            self._watches.discard(watch)


def _expire_in_background(ref: weakref.ref[MemoryStore], stop: threading.Event,
                          interval: float) -> None:
    while not stop.wait(interval):
        store = ref()
        if store is None:
            return
        store._expire_now()
        del store  # not held across the wait
