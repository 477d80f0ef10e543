"""What only the etcd store has, against a real etcd (TLS, auth enabled) started by the tests.

TLS, authentication, token expiry, roles confined to a prefix, unreachable
servers.  Store semantics (keys, revisions, transactions, watches, leases,
closing) are tested on every backend in tests/test_store_conformance.py.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.support_etcd import free_port, running_etcd, silent_listener
from tests.support_store import events
from vcluster.config.batch import StoreConfig
from vcluster.errors import StorePermissionDenied, StoreUnavailable
from vcluster.run import run
from vcluster.sandbox.etcd import EtcdServer, add_prefix_user, make_certificates, stop_etcd
from vcluster.store import open_store
from vcluster.store.base import Store
from vcluster.store.etcd import EtcdStore
from vcluster.store.keys import Keys

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
