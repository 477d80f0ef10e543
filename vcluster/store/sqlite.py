"""The embedded Store: one sqlite3 database file, WAL mode, shared by one user's processes.

The default of a machine without etcd (``store.backend: sqlite``).  It keeps
etcd's semantics, as the memory store does (the rules are in
``vcluster.store.rules``; tests/test_store_conformance.py runs the same suite
on all three backends), but across processes:

- Every write is one ``BEGIN IMMEDIATE`` transaction: sqlite's write lock
  orders the writers of every process, so a compare-and-swap is atomic
  between processes, and the global revision (table ``meta``) rises by one
  per write that changed something.  ``synchronous=FULL``: a write that
  returned is on disk, a process killed mid-write leaves the previous state.
- The history of changes is the table ``events`` (revision, order in it):
  watches replay it from their start revision, and the store's poller
  thread, woken by ``PRAGMA data_version`` (it changes when any other
  connection commits), delivers what other processes wrote.  History older
  than ``history`` revisions is dropped; a watch from before it fails.
- Leases are rows with a wall-clock expiry (processes share no monotonic
  clock), revoked by whichever process calls next, and by the poller.

A busy database (another process holding the write lock for longer than
``store.timeout``) is StoreUnavailable; the file and its directory are the
user's alone (0600 and 0700).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from vcluster.errors import StoreError, StoreUnavailable
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

BACKEND = "sqlite store"
DEFAULT_HISTORY = 100_000  # revisions kept for watches from the past
PRUNE_EVERY = 1000  # revisions between two prunings of the history

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta VALUES ('revision', 1), ('compacted', 0);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value TEXT NOT NULL, create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL, version INTEGER NOT NULL, lease INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease) WHERE lease != 0;
CREATE TABLE IF NOT EXISTS events (
    revision INTEGER NOT NULL, n INTEGER NOT NULL, type TEXT NOT NULL, key TEXT NOT NULL,
    value TEXT NOT NULL, PRIMARY KEY (revision, n)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY, ttl INTEGER NOT NULL,
                                   expiry REAL NOT NULL);
"""


def _after(prefix: str) -> str | None:
    """The first string after every string starting with ``prefix`` (None: there is none)."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            return prefix[:-1] + chr(last + 1)
        prefix = prefix[:-1]
    return None


def _range_sql(key: str, prefix: bool) -> tuple[str, tuple[str, ...]]:
    """A WHERE clause on ``key`` for one key, or every key starting with it."""
    if not prefix:
        return "key = ?", (key,)
    end = _after(key)
    if end is None:
        return "key >= ?", (key,)
    return "key >= ? AND key < ?", (key, end)


def _entry(row: tuple[str, str, int, int, int, int]) -> Entry:
    return Entry(*row)


class SqliteStore(FedStore):
    """The Store interface on a sqlite3 database file (see the module docstring)."""

    def __init__(self, path: Path, *, timeout: float = 5.0,
                 clock: Callable[[], float] = time.time, min_ttl: int = DEFAULT_MIN_TTL,
                 history: int = DEFAULT_HISTORY, poll_interval: float = 0.01) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._clock = clock
        self._min_ttl = min_ttl
        self._history = history
        self._poll_interval = poll_interval
        self._lock = threading.Lock()
        self._closed = False
        self._db = self._connect()
        self._watches: set[FedWatch] = set()
        self._poll_lock = threading.Lock()  # the poller's state and the watch set
        self._polled = 0  # the last revision whose events the watches were offered
        self._poller: threading.Thread | None = None
        self._poll_db: sqlite3.Connection | None = None
        self._stop = threading.Event()
        self._data_version = -1

    # ------------------------------------------------------------ the database

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not self.path.exists():
                os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            db = sqlite3.connect(self.path, timeout=self.timeout, isolation_level=None,
                                 check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise StoreUnavailable(f"{BACKEND}: cannot open {self.path}: "
                                   f"{getattr(e, 'strerror', None) or e}") from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            with self._translated("open", str(self.path)):
                db.execute("BEGIN IMMEDIATE")  # executescript would commit on its own
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                db.execute("COMMIT")
        except sqlite3.Error as e:
            db.close()
            raise StoreUnavailable(f"{BACKEND}: cannot use {self.path}: {e}") from None
        except BaseException:
            db.close()
            raise
        return db

    @contextlib.contextmanager
    def _translated(self, what: str, key: str) -> Iterator[None]:
        """sqlite's errors as the store's."""
        try:
            yield
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise StoreUnavailable(
                    f"{BACKEND}: cannot {what} {key!r}: {self.path} stayed locked by another "
                    f"process for {self.timeout:g} s") from None
            raise StoreError(f"{BACKEND}: cannot {what} {key!r}: {e}") from None
        except sqlite3.Error as e:
            raise StoreError(f"{BACKEND}: cannot {what} {key!r}: {e}") from None

    @contextlib.contextmanager
    def _reading(self, what: str, key: str) -> Iterator[sqlite3.Connection]:
        """One read transaction (one snapshot), under this object's lock.

        Leases that expired meanwhile are revoked first, in a write
        transaction of their own, so that no read sees their keys.
        """
        with self._lock:
            if self._closed:
                raise StoreClosed(f"the store is closed (cannot {what} {key!r})")
            db = self._db
            with self._translated(what, key):
                if self._expiry_due(db):
                    self._expire_now(db)
                db.execute("BEGIN")
                try:
                    yield db
                finally:
                    db.execute("COMMIT")

    def _expire_now(self, db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")
        try:
            writes = self._expire(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        self._finish(db, writes)

    def _revision(self, db: sqlite3.Connection) -> int:
        row = db.execute("SELECT value FROM meta WHERE name = 'revision'").fetchone()
        return int(row[0])

    def _get(self, db: sqlite3.Connection, key: str) -> Entry | None:
        row = db.execute("SELECT key, value, create_revision, mod_revision, version, lease "
                         "FROM kv WHERE key = ?", (key,)).fetchone()
        return _entry(row) if row else None

    def _range(self, db: sqlite3.Connection, key: str, prefix: bool) -> list[Entry]:
        where, args = _range_sql(key, prefix)
        rows = db.execute("SELECT key, value, create_revision, mod_revision, version, lease "
                          f"FROM kv WHERE {where} ORDER BY key", args).fetchall()
        return [_entry(r) for r in rows]

    # ------------------------------------------------------------ writing (in a transaction)

    def _put(self, db: sqlite3.Connection, writes: list[WatchEvent], revision: int, key: str,
             value: str, lease: Lease | None) -> None:
        lease_id = lease.id if lease is not None else 0
        old = self._get(db, key)
        created, version = (old.create_revision, old.version + 1) if old else (revision, 1)
        db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?, ?)",
                   (key, value, created, revision, version, lease_id))
        writes.append(WatchEvent(EventType.PUT, key, value, revision))

    def _delete(self, db: sqlite3.Connection, writes: list[WatchEvent], revision: int,
                key: str, prefix: bool) -> int:
        gone = self._range(db, key, prefix)
        if gone:
            where, args = _range_sql(key, prefix)
            db.execute(f"DELETE FROM kv WHERE {where}", args)
        writes.extend(WatchEvent(EventType.DELETE, e.key, "", revision) for e in gone)
        return len(gone)

    def _finish(self, db: sqlite3.Connection, writes: list[WatchEvent]) -> None:
        """Commit the open write transaction: its events at the next revision, if any."""
        if writes:
            self._commit_revision(db, writes)
            if writes[0].revision % PRUNE_EVERY == 0:
                self._drop_history(db, writes[0].revision - self._history + 1)
        db.execute("COMMIT")

    def _drop_history(self, db: sqlite3.Connection, before: int) -> None:
        db.execute("DELETE FROM events WHERE revision < ?", (before,))
        db.execute("UPDATE meta SET value = max(value, ?) WHERE name = 'compacted'", (before,))

    def _need_leases(self, db: sqlite3.Connection, what: str, key: str,
                     ops: Sequence[Op]) -> None:
        for op in ops:
            if isinstance(op, Put) and op.lease is not None and op.lease.id and db.execute(
                    "SELECT 1 FROM leases WHERE id = ?", (op.lease.id,)).fetchone() is None:
                raise LeaseExpired(f"cannot {what} {key!r}: the lease has expired or was revoked")

    def _expiry_due(self, db: sqlite3.Connection) -> bool:
        return db.execute("SELECT 1 FROM leases WHERE expiry <= ? LIMIT 1",
                          (self._clock(),)).fetchone() is not None

    def _expire(self, db: sqlite3.Connection) -> list[WatchEvent]:
        """Revoke the leases that expired (inside a write transaction): the first one's
        deletes, at the next revision; the others are committed here, each its own."""
        due = db.execute("SELECT id FROM leases WHERE expiry <= ? ORDER BY expiry, id",
                         (self._clock(),)).fetchall()
        writes: list[WatchEvent] = []
        for (lease_id,) in due:
            if writes:  # one revision per lease, as etcd revokes them one by one
                self._commit_revision(db, writes)
                writes = []
            writes = self._revoke(db, lease_id)
        return writes

    def _expire_inside(self, db: sqlite3.Connection) -> None:
        """Inside a write transaction: expire due leases, each in a revision of its own."""
        writes = self._expire(db)
        if writes:
            self._commit_revision(db, writes)

    def _commit_revision(self, db: sqlite3.Connection, writes: list[WatchEvent]) -> None:
        """Record ``writes`` as one revision without ending the transaction."""
        revision = writes[0].revision
        db.executemany("INSERT INTO events VALUES (?, ?, ?, ?, ?)",
                       [(e.revision, n, e.type.value, e.key, e.value)
                        for n, e in enumerate(writes)])
        db.execute("UPDATE meta SET value = ? WHERE name = 'revision'", (revision,))

    def _revoke(self, db: sqlite3.Connection, lease_id: int) -> list[WatchEvent]:
        db.execute("DELETE FROM leases WHERE id = ?", (lease_id,))
        keys = [k for (k,) in db.execute("SELECT key FROM kv WHERE lease = ? ORDER BY key",
                                         (lease_id,))]
        revision = self._revision(db) + 1
        db.execute("DELETE FROM kv WHERE lease = ?", (lease_id,))
        return [WatchEvent(EventType.DELETE, k, "", revision) for k in keys]

    # ------------------------------------------------------------ keys

    def get(self, key: str) -> Entry | None:
        need_key(BACKEND, "read", key)
        with self._reading("read", key) as db:
            return self._get(db, key)

    def get_prefix(self, prefix: str) -> Snapshot:
        need_key(BACKEND, "read", prefix)
        with self._reading("read", prefix) as db:
            return Snapshot(tuple(self._range(db, prefix, True)), self._revision(db))

    def _write(self, what: str, key: str,
               body: Callable[[sqlite3.Connection, list[WatchEvent], int], None]) -> int:
        """Run ``body`` in a write transaction; the store's revision after it."""
        with self._lock:
            if self._closed:
                raise StoreClosed(f"the store is closed (cannot {what} {key!r})")
            db = self._db
            with self._translated(what, key):
                db.execute("BEGIN IMMEDIATE")
                try:
                    self._expire_inside(db)
                    revision = self._revision(db)
                    writes: list[WatchEvent] = []
                    body(db, writes, revision + 1)
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                self._finish(db, writes)
                return revision + 1 if writes else revision

    def put(self, key: str, value: str, lease: Lease | None = None) -> int:
        need_key(BACKEND, "write", key)

        def body(db: sqlite3.Connection, writes: list[WatchEvent], revision: int) -> None:
            self._need_leases(db, "write", key, [Put(key, value, lease)])
            self._put(db, writes, revision, key, value, lease)

        return self._write("write", key, body)

    def delete(self, key: str) -> bool:
        need_key(BACKEND, "delete", key)
        count: list[int] = []
        self._write("delete", key, lambda db, writes, revision: count.append(
            self._delete(db, writes, revision, key, False)))
        return count[0] > 0

    def delete_prefix(self, prefix: str) -> int:
        need_key(BACKEND, "delete", prefix)
        count: list[int] = []
        self._write("delete", prefix, lambda db, writes, revision: count.append(
            self._delete(db, writes, revision, prefix, True)))
        return count[0]

    def txn(self, compare: Sequence[Compare], success: Sequence[Op],
            failure: Sequence[Op] = ()) -> TxnResult:
        for c in compare:
            check_compare(c)
        what = "run a transaction on"
        first = first_key(compare, success, failure)
        check_txn(BACKEND, first, compare, success, failure)
        outcome: list[TxnResult] = []

        def body(db: sqlite3.Connection, writes: list[WatchEvent], revision: int) -> None:
            succeeded = all(holds(c, self._get(db, c.key)) for c in compare)
            ops = success if succeeded else failure
            self._need_leases(db, what, first, ops)
            results: list[tuple[Entry, ...] | None] = []
            for op in ops:
                if isinstance(op, Put):
                    self._put(db, writes, revision, op.key, op.value, op.lease)
                    results.append(None)
                elif isinstance(op, Delete):
                    self._delete(db, writes, revision, op.key, op.prefix)
                    results.append(None)
                else:  # reads see this transaction's earlier writes, as in etcd
                    results.append(tuple(self._range(db, op.key, op.prefix)))
            outcome.append(TxnResult(succeeded, tuple(results)))

        self._write(what, first, body)
        return outcome[0]

    def compact(self, revision: int) -> None:
        """Forget the events before ``revision``: a watch from earlier then fails."""
        def body(db: sqlite3.Connection, _writes: list[WatchEvent], _next: int) -> None:
            current = self._revision(db)
            compacted = int(db.execute(
                "SELECT value FROM meta WHERE name = 'compacted'").fetchone()[0])
            if revision > current:
                raise StoreError(f"cannot compact history up to revision {revision}: "
                                 f"the store is at revision {current}")
            if revision <= compacted:
                raise StoreError(f"cannot compact history up to revision {revision}: "
                                 f"already compacted up to {compacted}")
            self._drop_history(db, revision)

        self._write("compact history up to", str(revision), body)

    # ------------------------------------------------------------ watches

    def _watch(self, key: str, prefix: bool, start_revision: int | None,
               callback: Callable[[WatchEvent], None] | None,
               on_error: Callable[[StoreError], None] | None) -> Watch:
        if start_revision is not None and start_revision < 0:
            raise ValueError(f"cannot watch {key!r} from revision {start_revision}")
        with self._poll_lock:
            if self._closed:
                raise StoreClosed(f"the store is closed (cannot watch {key!r})")
            db = self._poll_connection()
            with self._translated("watch", key):
                self._poll_once(db)  # the watches have been offered everything up to now
                first = start_revision or self._polled + 1
                watch = FedWatch(self._forget, key, prefix, first, callback, on_error)
                compacted = int(db.execute(
                    "SELECT value FROM meta WHERE name = 'compacted'").fetchone()[0])
                if first < compacted:
                    watch.push(StoreError(
                        f"cannot watch {key!r} from revision {start_revision}: the sqlite "
                        f"store has compacted its history up to revision {compacted} (read "
                        "the keys again and watch from the revision of that read)"))
                else:
                    watch.offer(self._events(db, first, self._polled))
                    self._watches.add(watch)
            watch.start()
        self._start_poller()
        return watch

    def _poll_connection(self) -> sqlite3.Connection:
        if self._poll_db is None:
            self._poll_db = sqlite3.connect(self.path, timeout=self.timeout,
                                            isolation_level=None, check_same_thread=False)
            self._polled = self._revision(self._poll_db)
        return self._poll_db

    def _events(self, db: sqlite3.Connection, first: int, last: int) -> list[WatchEvent]:
        rows = db.execute("SELECT type, key, value, revision FROM events WHERE revision >= ? "
                          "AND revision <= ? ORDER BY revision, n", (first, last)).fetchall()
        return [WatchEvent(EventType(t), k, v, r) for t, k, v, r in rows]

    def _poll_once(self, db: sqlite3.Connection) -> None:
        """Offer the watches every event committed since the last poll (under _poll_lock)."""
        version = int(db.execute("PRAGMA data_version").fetchone()[0])
        if version == self._data_version:
            return
        self._data_version = version
        db.execute("BEGIN")
        try:
            latest = self._revision(db)
            new = self._events(db, self._polled + 1, latest)
        finally:
            db.execute("COMMIT")
        self._polled = latest
        for watch in self._watches:
            watch.offer(new)

    def _start_poller(self) -> None:
        with self._poll_lock:
            if self._poller is None and not self._closed:
                self._poller = threading.Thread(
                    target=_poll_in_background,
                    args=(weakref.ref(self), self._stop, self._poll_interval),
                    name="sqlite-store poller", daemon=True)
                self._poller.start()

    def _poll(self) -> None:
        """One round of the poller: revoke expired leases, deliver new events."""
        if self._closed:
            return
        with contextlib.suppress(StoreError), self._lock:
            if not self._closed:
                with self._translated("expire leases in", str(self.path)):
                    if self._expiry_due(self._db):
                        self._expire_now(self._db)
        with self._poll_lock:
            if self._closed or self._poll_db is None:
                return
            try:
                with self._translated("watch", str(self.path)):
                    self._poll_once(self._poll_db)
            except StoreError as e:
                for watch in list(self._watches):
                    watch.push(e)
                self._watches.clear()

    def _forget(self, watch: FedWatch) -> None:
        with self._poll_lock:
            self._watches.discard(watch)

    # ------------------------------------------------------------ leases

    def grant(self, ttl: int) -> Lease:
        import secrets  # only leases need it, and few commands take one

        check_grant(BACKEND, ttl)
        ttl = max(ttl, self._min_ttl)
        granted: list[int] = []

        def body(db: sqlite3.Connection, _writes: list[WatchEvent], _next: int) -> None:
            lease_id = 0
            while lease_id == 0 or db.execute("SELECT 1 FROM leases WHERE id = ?",
                                              (lease_id,)).fetchone():
                lease_id = secrets.randbits(63)
            db.execute("INSERT INTO leases VALUES (?, ?, ?)",
                       (lease_id, ttl, self._clock() + ttl))
            granted.append(lease_id)

        self._write("grant a lease for", f"{ttl} s", body)
        self._start_poller()  # its expiry is seen even if nobody calls
        return Lease(granted[0], ttl)

    def keep_alive(self, lease: Lease) -> int:
        got: list[int] = []

        def body(db: sqlite3.Connection, _writes: list[WatchEvent], _next: int) -> None:
            row = db.execute("SELECT ttl FROM leases WHERE id = ?", (lease.id,)).fetchone()
            if row is None:
                raise LeaseExpired(f"lease {lease.id:x} has expired or was revoked")
            db.execute("UPDATE leases SET expiry = ? WHERE id = ?",
                       (self._clock() + row[0], lease.id))
            got.append(int(row[0]))

        self._write("refresh lease", f"{lease.id:x}", body)
        return got[0]

    def revoke(self, lease: Lease) -> None:
        def body(db: sqlite3.Connection, writes: list[WatchEvent], _next: int) -> None:
            if db.execute("SELECT 1 FROM leases WHERE id = ?", (lease.id,)).fetchone():
                writes.extend(self._revoke(db, lease.id))

        self._write("revoke lease", f"{lease.id:x}", body)

    def time_to_live(self, lease: Lease) -> int:
        with self._reading("read lease", f"{lease.id:x}") as db:
            row = db.execute("SELECT expiry FROM leases WHERE id = ?", (lease.id,)).fetchone()
        if row is None:
            return -1
        return int(row[0] - self._clock())

    # ------------------------------------------------------------ end

    def integrity(self) -> str:
        """``PRAGMA integrity_check``'s answer: ``ok`` for a sound database."""
        with self._reading("check", str(self.path)) as db:
            return "; ".join(str(r[0]) for r in db.execute("PRAGMA integrity_check"))

    def close(self) -> None:
        with self._lock, self._poll_lock:
            if self._closed:
                return
            self._closed = True
            watches = list(self._watches)
            self._stop.set()
        for watch in watches:
            watch.cancel()
        if self._poller is not None and self._poller is not threading.current_thread():
            self._poller.join(CANCEL_WAIT)
        with self._lock, self._poll_lock:
            self._db.close()
            if self._poll_db is not None:
                self._poll_db.close()


def _poll_in_background(ref: weakref.ref[SqliteStore], stop: threading.Event,
                        interval: float) -> None:
    while not stop.wait(interval):
        store = ref()
        if store is None:
            return
        store._poll()
        del store  # not held across the wait
