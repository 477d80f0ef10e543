"""Store semantics, the same tests on every backend: memory, sqlite and a real etcd.

The etcd runs with TLS and authentication (tests/support_etcd.py), and the
tests use a user confined to its prefix, as the agent hands out.  The memory
and sqlite stores run on a FakeClock, so their leases expire when a test
says, not after a wait; on etcd ``elapse`` is real time.  The sqlite store's
other clients are connections of their own to the same file; races between
processes and kills mid-write are in tests/test_store_sqlite.py.  What only etcd has (TLS, roles,
tokens, unreachable servers) is in tests/test_store_etcd.py.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.waiting import wait_for
from tests.support_etcd import running_etcd
from tests.support_store import FakeClock, events, race
from vcluster.config.batch import StoreConfig
from vcluster.errors import StoreError
from vcluster.lifecycle import VmState
from vcluster.sandbox.etcd import EtcdServer, add_prefix_user
from vcluster.store import MemoryStore, open_store
from vcluster.store.base import (
    Compare,
    Delete,
    EventType,
    Get,
    Lease,
    LeaseExpired,
    Op,
    Put,
    Store,
    StoreClosed,
    WatchEvent,
    absent,
    unchanged_since,
)
from vcluster.store.keys import Keys
from vcluster.store.records import VmRecord, from_json, to_json
from vcluster.store.sqlite import SqliteStore

KEYS = Keys("/vcluster")


@dataclass
class Backend:
    """The store under test, and what differs between backends in driving it."""

    store: Store
    clients: Callable[[int], AbstractContextManager[list[Store]]]  # more clients of the data
    elapse: Callable[[float], None]  # let this many seconds of lease time pass
    compact: Callable[[int], None]  # drop the history before a revision


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    with running_etcd(tmp_path_factory.mktemp("etcd") / "server") as server:
        yield server


@pytest.fixture(scope="module")
def alice_config(etcd_server: EtcdServer) -> StoreConfig:
    password_file = add_prefix_user(etcd_server, "alice", KEYS.user_prefix("alice"))
    return etcd_server.store_config("alice", password_file)


def _memory_backend() -> Iterator[Backend]:
    clock = FakeClock()
    # A short expiry interval: watchers see expired leases go as soon as the clock moves.
    store = MemoryStore(clock=clock, expiry_interval=0.01)

    @contextmanager
    def clients(count: int) -> Iterator[list[Store]]:
        yield [store] * count  # in-process, every client is the store itself

    try:
        yield Backend(store, clients, clock.advance, store.compact)
    finally:
        store.close()


def _sqlite_backend(path: Path) -> Iterator[Backend]:
    clock = FakeClock()

    def opened() -> SqliteStore:  # short polls: watchers see changes and expiries at once
        return SqliteStore(path, clock=clock, poll_interval=0.01)

    @contextmanager
    def clients(count: int) -> Iterator[list[Store]]:
        with contextlib.ExitStack() as stack:  # connections of their own, as processes have
            yield [stack.enter_context(opened()) for _ in range(count)]

    store = opened()
    try:
        yield Backend(store, clients, clock.advance, store.compact)
    finally:
        store.close()


def _etcd_backend(server: EtcdServer, config: StoreConfig) -> Iterator[Backend]:
    # Imported here: the memory half runs where grpc and pyetcd are not installed.
    from vcluster.store.etcd import EtcdStore

    @contextmanager
    def clients(count: int) -> Iterator[list[Store]]:
        opened = [open_store(config) for _ in range(count)]
        try:
            yield opened
        finally:
            for store in opened:
                store.close()

    def compact(revision: int) -> None:
        with EtcdStore(server.store_config()) as root:  # compaction is root's
            root._client.compact(revision)

    with open_store(config) as store:
        yield Backend(store, clients, time.sleep, compact)


@pytest.fixture(params=["memory", "sqlite", pytest.param("etcd", marks=pytest.mark.etcd)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "memory":
        yield from _memory_backend()
    elif request.param == "sqlite":
        yield from _sqlite_backend(tmp_path / "store.db")
    else:
        yield from _etcd_backend(request.getfixturevalue("etcd_server"),
                                 request.getfixturevalue("alice_config"))


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.store


@pytest.fixture
def prefix() -> str:
    """A fresh cluster prefix of alice's, so tests do not see each other's keys."""
    return KEYS.cluster_prefix("alice", secrets.token_hex(4))


def entry_of(store: Store, key: str) -> tuple[str, int, int, int]:
    """(value, create_revision, mod_revision, version) of a key that must exist."""
    entry = store.get(key)
    assert entry is not None, key
    return entry.value, entry.create_revision, entry.mod_revision, entry.version


# ------------------------------------------------------------ keys and revisions


def test_get_put_delete_and_prefix(store: Store, prefix: str) -> None:
    assert store.get(f"{prefix}missing") is None
    for i in (2, 0, 1):
        store.put(f"{prefix}vms/{i}", f"vm{i}")
    snap = store.get_prefix(f"{prefix}vms/")
    assert [e.key for e in snap] == [f"{prefix}vms/{i}" for i in range(3)]
    assert snap.values() == {f"{prefix}vms/{i}": f"vm{i}" for i in range(3)}
    assert snap.revision == max(e.mod_revision for e in snap)
    assert store.delete(f"{prefix}vms/0") is True
    assert store.delete(f"{prefix}vms/0") is False
    assert store.delete_prefix(f"{prefix}vms/") == 2
    assert len(store.get_prefix(prefix)) == 0


def test_revision_rises_once_per_write_that_changes_something(store: Store,
                                                             prefix: str) -> None:
    a, b, c = f"{prefix}a", f"{prefix}b", f"{prefix}c"
    start = store.get_prefix(prefix).revision
    first = store.put(a, "1")
    assert first == start + 1
    assert entry_of(store, a) == ("1", first, first, 1)
    second = store.put(a, "2")
    assert second == first + 1
    assert entry_of(store, a) == ("2", first, second, 2)
    # Writes that change nothing take no revision.
    assert store.delete(f"{prefix}missing") is False
    assert store.delete_prefix(f"{prefix}missing/") == 0
    assert store.txn([], [Get(a), Delete(f"{prefix}missing")]).succeeded
    assert store.get_prefix(prefix).revision == second
    # A transaction is one revision, however many keys it writes.
    assert store.txn([], [Put(b, "b"), Put(c, "c")]).succeeded
    assert entry_of(store, b) == ("b", second + 1, second + 1, 1)
    assert entry_of(store, c) == ("c", second + 1, second + 1, 1)
    assert store.delete_prefix(prefix) == 3
    assert store.get_prefix(prefix).revision == second + 2
    # A key created again starts over.
    again = store.put(a, "3")
    assert entry_of(store, a) == ("3", again, again, 1)


def test_record_round_trips_through_the_store(store: Store, prefix: str) -> None:
    record = VmRecord(VmState.BOOTING, host="h1", addresses=("10.0.0.2", "fd00::2"),
                      since=1700000000.25)
    store.put(f"{prefix}vms/0", to_json(record))
    entry = store.get(f"{prefix}vms/0")
    assert entry is not None and from_json(VmRecord, entry.value) == record


def test_empty_keys_are_refused(store: Store) -> None:
    calls: list[Callable[[], object]] = [
        lambda: store.get(""), lambda: store.get_prefix(""), lambda: store.put("", "x"),
        lambda: store.delete(""), lambda: store.delete_prefix(""),
        lambda: store.txn([absent("")], []), lambda: store.txn([], [Put("", "x")]),
    ]
    for call in calls:
        with pytest.raises(StoreError, match="key is not provided"):
            call()


# ------------------------------------------------------------ compare-and-swap


def test_two_clients_race_create_exactly_one_wins(backend: Backend, prefix: str) -> None:
    with backend.clients(2) as (a, b):
        for round_ in range(20):
            key = f"{prefix}race{round_}"

            def create(name: str, store: Store, key: str = key) -> bool:
                return store.create(key, name)

            won = race({"a": a, "b": b}, create)
            assert sorted(won.values()) == [False, True], won
            winner = next(n for n, w in won.items() if w)
            entry = a.get(key)
            assert entry is not None and entry.value == winner


def test_two_clients_race_replace_exactly_one_wins(backend: Backend, prefix: str) -> None:
    key = f"{prefix}counter"
    with backend.clients(2) as (a, b):
        a.put(key, "0")
        for round_ in range(20):
            old, new = str(round_), str(round_ + 1)

            def replace(_: str, store: Store, old: str = old, new: str = new) -> bool:
                return store.replace(key, old, new)

            won = race({"a": a, "b": b}, replace)
            assert sorted(won.values()) == [False, True], won
        entry = b.get(key)
        assert entry is not None and entry.value == "20"


def test_create_and_replace(store: Store, prefix: str) -> None:
    key, missing = f"{prefix}k", f"{prefix}missing"
    assert store.create(key, "a") is True
    assert store.create(key, "b") is False
    assert store.replace(key, "b", "c") is False
    assert store.replace(key, "a", "c") is True
    value, _, _, version = entry_of(store, key)
    assert (value, version) == ("c", 2)
    # The value of a missing key compares false, even with the empty string.
    assert store.replace(missing, "", "x") is False
    assert store.get(missing) is None


def test_general_transaction(store: Store, prefix: str) -> None:
    key, other = f"{prefix}a", f"{prefix}b"
    revision = store.put(key, "1")
    entry = store.get(key)
    assert entry is not None and entry.mod_revision == revision
    result = store.txn([unchanged_since(key, revision), absent(other)],
                       [Put(other, "2"), Get(prefix, prefix=True)],
                       [Get(key)])
    assert result.succeeded
    assert result.results[0] is None
    listed = result.results[1]
    # The read sees the transaction's own write, at the transaction's revision.
    assert listed is not None and [(e.key, e.value, e.mod_revision) for e in listed] == [
        (key, "1", revision), (other, "2", revision + 1)]
    # The same comparisons now fail: the failure branch runs and reads.
    result = store.txn([absent(other)], [Delete(prefix, prefix=True)], [Get(other)])
    assert not result.succeeded
    assert result.results[0] is not None and result.results[0][0].value == "2"
    assert store.txn([], [Get(f"{prefix}missing")]).results == ((),)
    result = store.txn([Compare(key, "version", "==", 1)], [Delete(prefix, prefix=True)])
    assert result.succeeded and result.results == (None,)
    assert store.get_prefix(prefix).entries == ()


def test_every_compare_target_and_operator(store: Store, prefix: str) -> None:
    key, missing = f"{prefix}k", f"{prefix}missing"
    created = store.put(key, "b")
    modified = store.put(key, "b")
    cases: list[tuple[Compare, bool]] = [
        (Compare(key, "value", "==", "b"), True),
        (Compare(key, "value", "!=", "b"), False),
        (Compare(key, "value", "<", "c"), True),
        (Compare(key, "value", "<", "a"), False),
        (Compare(key, "value", ">", "a"), True),
        (Compare(key, "value", "<", "é"), True),  # bytes: UTF-8 of é sorts after ASCII
        (Compare(key, "version", "==", 2), True),
        (Compare(key, "version", "!=", 2), False),
        (Compare(key, "version", "<", 3), True),
        (Compare(key, "version", ">", 2), False),
        (Compare(key, "create", "==", created), True),
        (Compare(key, "create", "<", modified), True),
        (Compare(key, "mod", "==", modified), True),
        (Compare(key, "mod", ">", created), True),
        (Compare(key, "mod", "<", modified), False),
        # A missing key: no value at all, zeros elsewhere.
        (Compare(missing, "value", "!=", "anything"), False),
        (Compare(missing, "value", "<", "zzz"), False),
        (Compare(missing, "version", "==", 0), True),
        (Compare(missing, "create", "<", 1), True),
        (Compare(missing, "mod", "==", 0), True),
        (Compare(missing, "mod", ">", 0), False),
    ]
    got = [store.txn([c], []).succeeded for c, _ in cases]
    assert got == [want for _, want in cases]
    assert store.txn([c for c, want in cases if want], []).succeeded  # all must hold
    assert not store.txn([c for c, _ in cases], []).succeeded
    for wrong in (Compare(key, "version", "==", "2"), Compare(key, "value", "==", 2),
                  Compare(key, "mod", "==", True)):
        with pytest.raises(ValueError, match="wrong operand"):
            store.txn([wrong], [])


def test_transactions_etcd_refuses(store: Store, prefix: str) -> None:
    key, other = f"{prefix}k", f"{prefix}other"
    twice: list[tuple[list[Op], list[Op]]] = [
        ([Put(key, "1"), Put(key, "2")], []),
        ([Put(key, "1"), Delete(key)], []),
        ([Delete(prefix, prefix=True), Put(key, "1")], []),
        ([Put(other, "1")], [Put(key, "1"), Put(key, "2")]),  # even in the branch not taken
    ]
    for success, failure in twice:
        with pytest.raises(StoreError, match="duplicate key given in txn request"):
            store.txn([], success, failure)
    assert store.get_prefix(prefix).entries == ()
    # Deletes may overlap.
    assert store.txn([], [Delete(key), Delete(prefix, prefix=True)]).succeeded
    reads = [Get(f"{prefix}{i}") for i in range(129)]
    with pytest.raises(StoreError, match="too many operations in txn request"):
        store.txn([], reads)
    assert len(store.txn([], reads[:128]).results) == 128


# ------------------------------------------------------------ watches


def test_prefix_watch_sees_puts_and_deletes_in_order(store: Store, prefix: str) -> None:
    with store.watch_prefix(prefix) as watch:
        store.put(f"{prefix}x", "1")
        store.put(f"{prefix}y", "2")
        store.put(f"{prefix}x", "3")
        store.delete(f"{prefix}y")
        store.put(f"{prefix[:-1]}-sibling/k", "not under the prefix")
        store.txn([], [Put(f"{prefix}z", "4"), Put(f"{prefix}y", "5")])
        store.delete_prefix(prefix)
        got = events(watch, 9)
    assert [(e.type, e.key.removeprefix(prefix), e.value) for e in got] == [
        (EventType.PUT, "x", "1"),
        (EventType.PUT, "y", "2"),
        (EventType.PUT, "x", "3"),
        (EventType.DELETE, "y", ""),
        (EventType.PUT, "z", "4"),
        (EventType.PUT, "y", "5"),
        (EventType.DELETE, "x", ""),
        (EventType.DELETE, "y", ""),  # a range is deleted in key order
        (EventType.DELETE, "z", ""),
    ]
    revisions = [e.revision for e in got]
    assert revisions[:4] == list(range(revisions[0], revisions[0] + 4))
    # One revision per transaction, skipping the sibling's put.
    assert revisions[4:] == [revisions[3] + 2] * 2 + [revisions[3] + 3] * 3


def test_watch_from_a_revision_misses_nothing(store: Store, prefix: str) -> None:
    store.put(f"{prefix}a", "1")
    snap = store.get_prefix(prefix)
    store.put(f"{prefix}b", "2")  # between the read and the watch
    with store.watch_prefix(prefix, start_revision=snap.revision + 1) as watch:
        store.put(f"{prefix}c", "3")
        got = events(watch, 2)
        assert watch.get(timeout=0.3) is None
    assert [e.key.removeprefix(prefix) for e in got] == ["b", "c"]
    assert [e.revision for e in got] == [snap.revision + 1, snap.revision + 2]


def test_watch_from_a_future_revision_starts_there(store: Store, prefix: str) -> None:
    now = store.get_prefix(prefix).revision
    with store.watch(f"{prefix}k", start_revision=now + 3) as watch:
        for value in "1234":
            store.put(f"{prefix}k", value)
        got = events(watch, 2)
    assert [(e.value, e.revision) for e in got] == [("3", now + 3), ("4", now + 4)]


def test_watch_from_a_compacted_revision_fails(backend: Backend, store: Store,
                                               prefix: str) -> None:
    first = store.put(f"{prefix}k", "1")
    second = store.put(f"{prefix}k", "2")
    backend.compact(second)
    errors: list[StoreError] = []
    with store.watch_prefix(prefix, start_revision=first, on_error=errors.append) as watch, \
            pytest.raises(StoreError, match=f"compacted its history up to revision {second}"):
        watch.get(timeout=5)
    assert len(errors) == 1 and f"from revision {first}" in str(errors[0])
    with store.watch_prefix(prefix, start_revision=second) as watch:  # what is kept replays
        assert [(e.value, e.revision) for e in events(watch, 1)] == [("2", second)]


def test_watch_callback_and_cancel(store: Store, prefix: str) -> None:
    seen: list[WatchEvent] = []
    arrived = threading.Event()

    def record(event: WatchEvent) -> None:
        seen.append(event)
        arrived.set()

    watch = store.watch(f"{prefix}k", callback=record)
    store.put(f"{prefix}k", "1")
    store.put(f"{prefix}other", "ignored")
    assert arrived.wait(5)
    watch.cancel()
    with store.watch(f"{prefix}k") as witness:
        store.put(f"{prefix}k", "2")
        assert [e.value for e in events(witness, 1)] == ["2"]  # delivered by now, if ever
    assert [(e.key, e.value) for e in seen] == [(f"{prefix}k", "1")]
    assert watch.get(timeout=0.1) is None  # ended


def test_cancel_ends_an_iteration_after_what_arrived(store: Store, prefix: str) -> None:
    watch = store.watch_prefix(prefix)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.extend(e.value for e in watch), daemon=True)
    reader.start()
    store.put(f"{prefix}a", "1")
    store.put(f"{prefix}b", "2")
    wait_for("both events", lambda: len(got) == 2, 5, interval=0.01)
    watch.cancel()
    reader.join(5)
    assert not reader.is_alive() and got == ["1", "2"]


# ------------------------------------------------------------ leases


def test_lease_ttl_time_to_live_and_limits(store: Store) -> None:
    lease = store.grant(5)
    short = store.grant(1)
    try:
        assert lease.ttl == 5 and lease.id != 0 and short.id != lease.id
        assert store.time_to_live(lease) in (4, 5)  # whole seconds left, truncated
        assert store.keep_alive(lease) == 5
        assert short.ttl == 2  # etcd's minimum with its default election timeout
    finally:
        store.revoke(lease)
        store.revoke(short)
    assert store.time_to_live(lease) == -1
    assert store.time_to_live(Lease(0x5EED, 5)) == -1  # never granted
    with pytest.raises(LeaseExpired, match="expired or was revoked"):
        store.keep_alive(Lease(0x5EED, 5))
    with pytest.raises(ValueError):
        store.grant(0)
    with pytest.raises(StoreError, match="too large lease TTL"):
        store.grant(10**10)


def test_expired_lease_removes_its_keys(backend: Backend, store: Store, prefix: str) -> None:
    lease = store.grant(2)
    store.put(f"{prefix}host2", "registered", lease=lease)
    store.put(f"{prefix}host1", "registered", lease=lease)
    store.put(f"{prefix}plain", "stays")
    with store.watch_prefix(prefix) as watch:
        entry = store.get(f"{prefix}host1")
        assert entry is not None and entry.lease == lease.id
        backend.elapse(2)
        got = events(watch, 2, timeout=10)  # no call meanwhile: the store expires it itself
    assert [(e.type, e.key) for e in got] == [(EventType.DELETE, f"{prefix}host1"),
                                              (EventType.DELETE, f"{prefix}host2")]
    assert got[0].revision == got[1].revision  # one revision for the whole lease
    assert store.get(f"{prefix}host1") is None
    assert store.get(f"{prefix}plain") is not None
    assert store.time_to_live(lease) == -1
    with pytest.raises(LeaseExpired, match="expired or was revoked"):
        store.keep_alive(lease)
    with pytest.raises(LeaseExpired):
        store.put(f"{prefix}late", "x", lease=lease)
    with pytest.raises(LeaseExpired):
        store.txn([], [Put(f"{prefix}late", "x", lease=lease)])
    # Only the branch that runs needs its leases.
    assert not store.txn([absent(f"{prefix}plain")], [Put(f"{prefix}late", "x", lease=lease)]
                         ).succeeded
    store.revoke(lease)  # already gone: no error
    assert store.get(f"{prefix}late") is None


def test_put_without_the_lease_detaches_the_key(store: Store, prefix: str) -> None:
    lease = store.grant(30)
    try:
        store.put(f"{prefix}k", "leased", lease=lease)
        store.put(f"{prefix}k", "kept")
        entry = store.get(f"{prefix}k")
        assert entry is not None and entry.lease == 0
    finally:
        store.revoke(lease)
    revision = store.get_prefix(prefix).revision
    assert entry_of(store, f"{prefix}k")[0] == "kept"
    assert revision == entry.mod_revision  # revoking a lease without keys changed nothing


def test_keep_alive_restarts_the_ttl(backend: Backend, store: Store, prefix: str) -> None:
    lease = store.grant(2)
    store.put(f"{prefix}host", "registered", lease=lease)
    backend.elapse(1.5)
    assert store.keep_alive(lease) == 2
    backend.elapse(1.5)  # 3 s after the grant, 1.5 s after the refresh
    assert store.get(f"{prefix}host") is not None
    assert store.time_to_live(lease) in (0, 1)
    backend.elapse(0.5)
    wait_for("the lease to expire", lambda: store.get(f"{prefix}host") is None, 5,
             interval=0.05)
    assert store.time_to_live(lease) == -1


def test_kept_alive_lease_outlives_its_ttl_and_revoke_ends_it(
        backend: Backend, store: Store, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lease = store.grant(2)
    assert store.create(f"{prefix}host", "registered", lease=lease)
    refreshes: list[int] = []
    keep_alive = store.keep_alive

    def counted(lease: Lease) -> int:
        ttl = keep_alive(lease)
        refreshes.append(ttl)
        return ttl

    monkeypatch.setattr(store, "keep_alive", counted)
    keeper = store.keep_alive_in_background(lease, interval=0.1)
    try:
        for _ in range(6):  # 3 s in all, past the 2 s TTL
            before = len(refreshes)
            backend.elapse(0.5)

            def refreshed(before: int = before) -> bool:
                return len(refreshes) > before

            wait_for("a refresh", refreshed, 5, interval=0.01)
        assert store.get(f"{prefix}host") is not None
        assert keeper.error is None and not keeper.lost
        assert set(refreshes) == {2}
    finally:
        keeper.stop()
    store.revoke(lease)
    assert store.get(f"{prefix}host") is None


def test_lease_keeper_reports_a_lost_lease(store: Store, prefix: str) -> None:
    lease = store.grant(5)
    store.put(f"{prefix}host", "registered", lease=lease)
    lost: list[StoreError] = []
    keeper = store.keep_alive_in_background(lease, interval=0.05, on_lost=lost.append)
    try:
        store.revoke(lease)  # someone else ends it (an operator, a partition)
        wait_for("the keeper to notice", lambda: bool(lost), 5, interval=0.01)
        assert keeper.lost and isinstance(lost[0], LeaseExpired)
        assert store.get(f"{prefix}host") is None
    finally:
        keeper.stop()


# ------------------------------------------------------------ closing


def test_closed_store_refuses_calls_and_ends_watches(store: Store, prefix: str) -> None:
    lease = store.grant(30)
    watch = store.watch_prefix(prefix)
    store.put(f"{prefix}k", "1")
    assert [e.value for e in events(watch, 1)] == ["1"]
    store.close()
    assert watch.get(timeout=5) is None  # ended, not failed
    calls: list[Callable[[], object]] = [
        lambda: store.get(f"{prefix}k"), lambda: store.get_prefix(prefix),
        lambda: store.put(f"{prefix}k", "2"), lambda: store.delete(f"{prefix}k"),
        lambda: store.delete_prefix(prefix), lambda: store.txn([], [Get(f"{prefix}k")]),
        lambda: store.create(f"{prefix}k", "2"), lambda: store.watch_prefix(prefix),
        lambda: store.watch(f"{prefix}k"), lambda: store.grant(5),
        lambda: store.keep_alive(lease), lambda: store.time_to_live(lease),
        lambda: store.revoke(lease),
    ]
    for call in calls:
        with pytest.raises(StoreClosed, match="closed"):
            call()
    store.close()  # again: nothing
