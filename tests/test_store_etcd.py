"""The etcd store against a real etcd (TLS, auth enabled), started by the tests."""

from __future__ import annotations

import logging
import os
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.support_etcd import free_port, running_etcd, silent_listener
from vcluster.config.batch import StoreConfig
from vcluster.errors import StoreError, StorePermissionDenied, StoreUnavailable
from vcluster.lifecycle import VmState
from vcluster.run import run
from vcluster.sandbox.etcd import EtcdServer, add_prefix_user, make_certificates, stop_etcd
from vcluster.store import open_store
from vcluster.store.base import (
    Compare,
    Delete,
    EventType,
    Get,
    LeaseExpired,
    Put,
    Store,
    StoreClosed,
    Watch,
    WatchEvent,
    absent,
    unchanged_since,
)
from vcluster.store.etcd import EtcdStore
from vcluster.store.keys import Keys
from vcluster.store.records import VmRecord, from_json, to_json

pytestmark = pytest.mark.etcd

KEYS = Keys("/vcluster")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    with running_etcd(tmp_path_factory.mktemp("etcd") / "server") as s:
        yield s


@pytest.fixture(scope="module")
def alice_config(server: EtcdServer) -> StoreConfig:
    password_file = add_prefix_user(server, "alice", KEYS.user_prefix("alice"))
    return server.store_config("alice", password_file)


@pytest.fixture
def alice(alice_config: StoreConfig) -> Iterator[Store]:
    with open_store(alice_config) as store:
        yield store


@pytest.fixture
def root(server: EtcdServer) -> Iterator[EtcdStore]:
    store = EtcdStore(server.store_config())
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def cluster() -> str:
    """A fresh cluster prefix of alice's, so tests do not see each other's keys."""
    return KEYS.cluster_prefix("alice", secrets.token_hex(4))


def events(watch: Watch, count: int, timeout: float = 5.0) -> list[WatchEvent]:
    """Up to ``count`` events, waiting at most ``timeout`` in all."""
    got: list[WatchEvent] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        event = watch.get(timeout=deadline - time.monotonic())
        if event is not None:
            got.append(event)
    return got


# ------------------------------------------------------------ compare-and-swap


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


def test_two_clients_race_create_exactly_one_wins(alice_config: StoreConfig,
                                                   cluster: str) -> None:
    with open_store(alice_config) as a, open_store(alice_config) as b:
        for round_ in range(20):
            key = f"{cluster}race{round_}"

            def create(name: str, store: Store, key: str = key) -> bool:
                return store.create(key, name)

            won = race({"a": a, "b": b}, create)
            assert sorted(won.values()) == [False, True], won
            winner = next(n for n, w in won.items() if w)
            entry = a.get(key)
            assert entry is not None and entry.value == winner


def test_two_clients_race_replace_exactly_one_wins(alice_config: StoreConfig,
                                                    cluster: str) -> None:
    key = f"{cluster}counter"
    with open_store(alice_config) as a, open_store(alice_config) as b:
        a.put(key, "0")
        for round_ in range(20):
            old, new = str(round_), str(round_ + 1)

            def replace(_: str, store: Store, old: str = old, new: str = new) -> bool:
                return store.replace(key, old, new)

            won = race({"a": a, "b": b}, replace)
            assert sorted(won.values()) == [False, True], won
        entry = b.get(key)
        assert entry is not None and entry.value == "20"


def test_general_transaction(alice: Store, cluster: str) -> None:
    key, other = f"{cluster}a", f"{cluster}b"
    revision = alice.put(key, "1")
    entry = alice.get(key)
    assert entry is not None and entry.mod_revision == revision
    result = alice.txn([unchanged_since(key, revision), absent(other)],
                       [Put(other, "2"), Get(cluster, prefix=True)],
                       [Get(key)])
    assert result.succeeded
    assert result.results[0] is None
    listed = result.results[1]
    assert listed is not None and [(e.key, e.value) for e in listed] == [(key, "1"), (other, "2")]
    # The same comparisons now fail: the failure branch runs and reads.
    result = alice.txn([absent(other)], [Delete(cluster, prefix=True)], [Get(other)])
    assert not result.succeeded
    assert result.results[0] is not None and result.results[0][0].value == "2"
    result = alice.txn([Compare(key, "version", "==", 1)], [Delete(cluster, prefix=True)])
    assert result.succeeded and alice.get_prefix(cluster).entries == ()


# ------------------------------------------------------------ keys and records


def test_get_put_delete_and_prefix(alice: Store, cluster: str) -> None:
    assert alice.get(f"{cluster}missing") is None
    for i in (2, 0, 1):
        alice.put(f"{cluster}vms/{i}", f"vm{i}")
    snap = alice.get_prefix(f"{cluster}vms/")
    assert [e.key for e in snap] == [f"{cluster}vms/{i}" for i in range(3)]
    assert snap.revision >= max(e.mod_revision for e in snap)
    assert alice.delete(f"{cluster}vms/0") is True
    assert alice.delete(f"{cluster}vms/0") is False
    assert alice.delete_prefix(f"{cluster}vms/") == 2
    assert len(alice.get_prefix(cluster)) == 0


def test_record_round_trips_through_etcd(alice: Store, cluster: str) -> None:
    record = VmRecord(VmState.BOOTING, host="h1", addresses=("10.0.0.2", "fd00::2"),
                      since=1700000000.25)
    alice.put(f"{cluster}vms/0", to_json(record))
    entry = alice.get(f"{cluster}vms/0")
    assert entry is not None and from_json(VmRecord, entry.value) == record


# ------------------------------------------------------------ watches


def test_prefix_watch_sees_puts_and_deletes_in_order(alice: Store, cluster: str) -> None:
    with alice.watch_prefix(cluster) as watch:
        alice.put(f"{cluster}x", "1")
        alice.put(f"{cluster}y", "2")
        alice.put(f"{cluster}x", "3")
        alice.delete(f"{cluster}y")
        alice.put(f"{cluster[:-1]}-sibling/k", "not under the prefix")
        alice.delete_prefix(cluster)
        got = events(watch, 5)
    assert [(e.type, e.key.removeprefix(cluster), e.value) for e in got] == [
        (EventType.PUT, "x", "1"),
        (EventType.PUT, "y", "2"),
        (EventType.PUT, "x", "3"),
        (EventType.DELETE, "y", ""),
        (EventType.DELETE, "x", ""),
    ]
    revisions = [e.revision for e in got]
    assert revisions == sorted(revisions) and len(set(revisions)) == 5


def test_watch_from_a_revision_misses_nothing(alice: Store, cluster: str) -> None:
    alice.put(f"{cluster}a", "1")
    snap = alice.get_prefix(cluster)
    alice.put(f"{cluster}b", "2")  # between the read and the watch
    with alice.watch_prefix(cluster, start_revision=snap.revision + 1) as watch:
        alice.put(f"{cluster}c", "3")
        got = events(watch, 2)
        assert watch.get(timeout=0.3) is None
    assert [e.key.removeprefix(cluster) for e in got] == ["b", "c"]


def test_watch_callback_and_cancel(alice: Store, cluster: str) -> None:
    seen: list[WatchEvent] = []
    arrived = threading.Event()

    def record(event: WatchEvent) -> None:
        seen.append(event)
        arrived.set()

    watch = alice.watch(f"{cluster}k", callback=record)
    alice.put(f"{cluster}k", "1")
    alice.put(f"{cluster}other", "ignored")
    assert arrived.wait(5)
    watch.cancel()
    alice.put(f"{cluster}k", "2")
    time.sleep(0.3)
    assert [(e.key, e.value) for e in seen] == [(f"{cluster}k", "1")]
    assert watch.get(timeout=0.1) is None  # ended


# ------------------------------------------------------------ leases


def test_expired_lease_removes_its_keys(alice: Store, cluster: str) -> None:
    lease = alice.grant(2)
    alice.put(f"{cluster}host", "registered", lease=lease)
    alice.put(f"{cluster}plain", "stays")
    with alice.watch_prefix(cluster) as watch:
        assert alice.get(f"{cluster}host") is not None
        assert alice.get(f"{cluster}host").lease == lease.id  # type: ignore[union-attr]
        got = events(watch, 1, timeout=10)
    assert [(e.type, e.key) for e in got] == [(EventType.DELETE, f"{cluster}host")]
    assert alice.get(f"{cluster}host") is None
    assert alice.get(f"{cluster}plain") is not None
    assert alice.time_to_live(lease) == -1
    with pytest.raises(LeaseExpired, match="expired or was revoked"):
        alice.keep_alive(lease)
    with pytest.raises(LeaseExpired):
        alice.put(f"{cluster}late", "x", lease=lease)
    alice.revoke(lease)  # already gone: no error


def test_kept_alive_lease_outlives_its_ttl_and_revoke_ends_it(alice: Store,
                                                              cluster: str) -> None:
    lease = alice.grant(2)
    assert alice.create(f"{cluster}host", "registered", lease=lease)
    keeper = alice.keep_alive_in_background(lease, interval=0.5)
    try:
        time.sleep(3.5)
        assert alice.get(f"{cluster}host") is not None
        assert keeper.error is None and not keeper.lost
    finally:
        keeper.stop()
    assert alice.keep_alive(lease) >= 1
    alice.revoke(lease)
    assert alice.get(f"{cluster}host") is None


def test_lease_keeper_reports_a_lost_lease(alice: Store, cluster: str) -> None:
    lease = alice.grant(5)
    alice.put(f"{cluster}host", "registered", lease=lease)
    lost: list[StoreError] = []
    keeper = alice.keep_alive_in_background(lease, interval=0.2, on_lost=lost.append)
    try:
        alice.revoke(lease)  # someone else ends it (an operator, a partition)
        deadline = time.monotonic() + 5
        while not lost and time.monotonic() < deadline:
            time.sleep(0.05)
        assert keeper.lost and isinstance(lost[0], LeaseExpired)
        assert alice.get(f"{cluster}host") is None
    finally:
        keeper.stop()


# ------------------------------------------------------------ authentication


def test_short_token_ttl_is_survived(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="vcluster.store.etcd")
    with running_etcd(tmp_path / "etcd", auth_token_ttl=2) as server:
        prefix = KEYS.user_prefix("bob")
        config = server.store_config("bob", add_prefix_user(server, "bob", prefix))
        with open_store(config) as bob:
            bob.put(f"{prefix}a", "1")
            time.sleep(3.5)  # the token expires after 2 s idle
            entry = bob.get(f"{prefix}a")
            assert entry is not None and entry.value == "1"
            time.sleep(3.5)
            with bob.watch_prefix(prefix) as watch:  # a watch needs a live token too
                time.sleep(3.5)
                bob.put(f"{prefix}b", "2")  # the open watch keeps working
                got = events(watch, 1)
            assert [e.key for e in got] == [f"{prefix}b"]
    relogins = [r for r in caplog.records if "logging in again" in r.getMessage()]
    assert len(relogins) >= 3


def test_role_confined_to_its_prefix(alice: Store, cluster: str) -> None:
    alice.put(f"{cluster}mine", "ok")
    outside = [KEYS.host("h1"), KEYS.vni(42), KEYS.job_owner("7"),
               KEYS.user_prefix("alice2") + "x", KEYS.user_prefix("bob") + "x"]
    for key in outside:
        with pytest.raises(StorePermissionDenied, match="permission denied") as info:
            alice.put(key, "x")
        assert "'alice'" in str(info.value) and repr(key) in str(info.value)
        with pytest.raises(StorePermissionDenied):
            alice.get(key)
        with pytest.raises(StorePermissionDenied):
            alice.create(key, "x")
    with pytest.raises(StorePermissionDenied, match="refused to watch '/vcluster/hosts/'"):
        alice.watch_prefix(KEYS.hosts_prefix())
    with pytest.raises(StorePermissionDenied):
        alice.get_prefix("/vcluster/users/")
    with pytest.raises(StorePermissionDenied):
        alice.delete_prefix(KEYS.user_prefix("bob"))


def test_admin_creates_a_confined_user(root: EtcdStore, server: EtcdServer,
                                       tmp_path: Path) -> None:
    prefix = KEYS.user_prefix("carol")
    role = root.add_prefix_user("carol", "first-password", prefix)
    assert role == "vcluster-carol"
    root.add_prefix_user("carol", "second-password", prefix)  # again: password reset
    password_file = tmp_path / "carol.password"
    password_file.write_text("second-password\n")
    with open_store(server.store_config("carol", password_file)) as carol:
        carol.put(f"{prefix}x", "1")
        with pytest.raises(StorePermissionDenied):
            carol.put(KEYS.user_prefix("alice") + "x", "1")
    password_file.write_text("first-password\n")
    with pytest.raises(StorePermissionDenied, match="authentication failed"):
        open_store(server.store_config("carol", password_file))


def test_wrong_password_and_missing_credentials(server: EtcdServer, tmp_path: Path) -> None:
    bad = tmp_path / "bad.password"
    bad.write_text("not the password\n")
    with pytest.raises(StorePermissionDenied, match=f"store.password-file {bad}"):
        open_store(server.store_config("root", bad))
    with open_store(server.store_config(user=None)) as anonymous, \
            pytest.raises(StorePermissionDenied, match="requires authentication"):
        anonymous.get("/vcluster/x")


def test_plain_http_with_auth_sends_the_token_as_metadata(tmp_path: Path) -> None:
    with running_etcd(tmp_path / "etcd", tls=False) as server:
        assert server.endpoint.startswith("http://") and server.ca_cert is None
        with open_store(server.store_config()) as store:
            with store.watch("/vcluster/k") as watch:
                store.put("/vcluster/k", "v")
                assert [e.value for e in events(watch, 1)] == ["v"]
            entry = store.get("/vcluster/k")
            assert entry is not None and entry.value == "v"


# ------------------------------------------------------------ failures are bounded


def test_stopped_etcd_is_a_clear_error_within_5_s(tmp_path: Path) -> None:
    with running_etcd(tmp_path / "etcd") as server:
        store = open_store(server.store_config())
        watch = store.watch_prefix("/vcluster/")
        stop_etcd(server)
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match=f"cannot reach etcd at {server.endpoint}"):
            store.get("/vcluster/x")
        assert time.monotonic() - start < 5
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match=server.endpoint):
            watch.get(timeout=5)
        assert time.monotonic() - start < 5
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match=server.endpoint):
            open_store(server.store_config())
        assert time.monotonic() - start < 5
        store.close()


def test_hung_server_is_a_clear_error_within_5_s(server: EtcdServer) -> None:
    with silent_listener() as port:
        endpoint = f"https://127.0.0.1:{port}"
        config = replace(server.store_config(), endpoints=(endpoint,))
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match=f"{endpoint}: no answer within 5 s"):
            open_store(config)
        assert time.monotonic() - start < 5.5  # the 5 s deadline plus scheduling


def test_second_endpoint_is_used_when_the_first_is_down(server: EtcdServer) -> None:
    dead = f"https://127.0.0.1:{free_port()}"
    config = replace(server.store_config(), endpoints=(dead, server.endpoint))
    for round_ in range(4):  # the first endpoint a client uses is chosen at random
        with open_store(config) as store:
            with store.watch("/vcluster/failover") as watch:
                store.put("/vcluster/failover", str(round_))
                assert [e.value for e in events(watch, 1)] == [str(round_)]
            entry = store.get("/vcluster/failover")
            assert entry is not None and entry.value == str(round_)


def test_tls_with_the_wrong_ca_is_refused_clearly(server: EtcdServer, tmp_path: Path) -> None:
    other_ca, _, _ = make_certificates(tmp_path / "other", "127.0.0.1")
    start = time.monotonic()
    with pytest.raises(StoreUnavailable, match=r"(?i)ssl|tls|handshake|certificate"):
        open_store(replace(server.store_config(), ca_cert=other_ca))
    assert time.monotonic() - start < 5


def test_mutual_tls_presents_the_client_certificate(tmp_path: Path) -> None:
    with running_etcd(tmp_path / "etcd", client_cert_auth=True) as server:
        assert server.client_cert is not None
        with open_store(server.store_config()) as store:
            store.put("/vcluster/mtls", "ok")
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match=server.endpoint):
            open_store(replace(server.store_config(), cert=None, key=None))
        assert time.monotonic() - start < 5


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh network namespace with its loopback up, removed afterwards."""
    from pyroute2 import NetNS, netns

    from tests.conftest import require_root

    require_root("creating a network namespace")

    name = f"vc-test-{secrets.token_hex(3)}"
    netns.create(name)
    try:
        with NetNS(name) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        yield name
    finally:
        netns.remove(name)


_IN_NAMESPACE = """
import sys
from pathlib import Path
from vcluster.config.batch import StoreConfig
from vcluster.store import open_store

endpoint, ca, password_file = sys.argv[1:]
config = StoreConfig(endpoints=(endpoint,), ca_cert=Path(ca), user="dave",
                     password_file=Path(password_file))
with open_store(config) as store:
    store.put("/vcluster/users/dave/k", "v")
    print(store.get("/vcluster/users/dave/k").value)
"""


def test_etcd_runs_inside_a_network_namespace(tmp_path: Path, netns: str) -> None:
    wrap = ["nsenter", f"--net=/run/netns/{netns}", "--"]
    with running_etcd(tmp_path / "etcd", wrap=wrap) as server:
        # nsenter exec'd etcd (the PID is etcd's) in the namespace
        assert Path(f"/proc/{server.pid}/exe").resolve().name == "etcd"
        assert os.stat(f"/proc/{server.pid}/ns/net").st_ino == os.stat(
            f"/run/netns/{netns}").st_ino
        password_file = add_prefix_user(server, "dave", KEYS.user_prefix("dave"))
        assert server.ca_cert is not None
        out = run([*wrap, sys.executable, "-c", _IN_NAMESPACE, server.endpoint,
                   str(server.ca_cert), str(password_file)], cwd=Path(__file__).parents[1])
        assert out.stdout.strip() == "v"
        # From outside the namespace that address is nobody's: a clear error, fast.
        start = time.monotonic()
        with pytest.raises(StoreUnavailable, match=server.endpoint):
            open_store(server.store_config("dave", password_file))
        assert time.monotonic() - start < 5


def test_closed_store_refuses_calls(alice_config: StoreConfig) -> None:
    store = open_store(alice_config)
    store.close()
    with pytest.raises(StoreClosed, match="closed"):
        store.get(KEYS.user_prefix("alice") + "x")
