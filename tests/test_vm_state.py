"""The runner's state publication and its store access, against a real etcd."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from tests.support_etcd import running_etcd
from vcluster.errors import StorePermissionDenied
from vcluster.lifecycle import IllegalTransition, VmState
from vcluster.sandbox.etcd import EtcdServer
from vcluster.store import Store, open_store
from vcluster.store.base import EventType
from vcluster.store.etcd import EtcdStore
from vcluster.store.keys import Keys
from vcluster.store.records import VmRecord, from_json, to_json
from vcluster.vm.state import Publisher

pytestmark = pytest.mark.etcd

KEYS = Keys("/vcluster")
PASSWORD = "issued-by-the-agent-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    with running_etcd(tmp_path_factory.mktemp("etcd") / "server") as s:
        yield s


@pytest.fixture(scope="module")
def bob_answer(server: EtcdServer) -> dict[str, object]:
    """What the agent's ``credentials`` op answers (the user made the way the agent does)."""
    root = EtcdStore(server.store_config())
    try:
        root.add_prefix_user("vc-bob", PASSWORD, KEYS.user_prefix("bob"))
    finally:
        root.close()
    return {"user": "vc-bob", "password": PASSWORD}


def bob_store(server: EtcdServer) -> Store:
    """The store as bob sees it with the credentials the agent issued him."""
    return open_store(replace(server.store_config(user=None), user="vc-bob"),
                      password=PASSWORD)


_jobs = itertools.count(100)


def test_states_are_published_in_order(server: EtcdServer, bob_answer: dict[str, object],
                                       tmp_path: Path) -> None:
    job = str(next(_jobs))
    key = KEYS.vm("bob", job, 0)
    with bob_store(server) as store:
        # the launcher wrote the VM as pending
        store.put(key, to_json(VmRecord(VmState.PENDING)))
        with store.watch(key) as watch:
            clock = itertools.count(1000.0)
            pub = Publisher(store, key, "vm0", clock=lambda: float(next(clock)))
            assert pub.load().state is VmState.PENDING
            pub.move(VmState.PREPARING, host="h1", addresses=("10.200.0.1",))
            pub.move(VmState.BOOTING)
            pub.move(VmState.READY)
            with pytest.raises(IllegalTransition):
                pub.move(VmState.BOOTING)
            pub.move(VmState.STOPPING)
            pub.move(VmState.STOPPED)
            seen: list[VmRecord] = []
            while len(seen) < 5 and (event := watch.get(timeout=5)) is not None:
                assert event.type is EventType.PUT
                seen.append(from_json(VmRecord, event.value))
        assert [r.state for r in seen] == [VmState.PREPARING, VmState.BOOTING, VmState.READY,
                                           VmState.STOPPING, VmState.STOPPED]
        assert all(r.host == "h1" and r.addresses == ("10.200.0.1",) for r in seen)
        assert [r.since for r in seen] == sorted(r.since for r in seen)
        stored = store.get(key)
        assert stored is not None and from_json(VmRecord, stored.value).state is VmState.STOPPED


def test_failure_carries_reason_and_console_tail(server: EtcdServer,
                                                bob_answer: dict[str, object],
                                                tmp_path: Path) -> None:
    key = KEYS.vm("bob", str(next(_jobs)), 3)
    with bob_store(server) as store:
        pub = Publisher(store, key, "vm3")
        assert pub.load().state is VmState.PENDING  # nothing stored yet
        pub.move(VmState.PREPARING, host="h2")
        pub.move(VmState.FAILED, error="QEMU exited with status 1: -foo: invalid option",
                 console_tail=("line 1", "line 2"))
        entry = store.get(key)
        assert entry is not None
        record = from_json(VmRecord, entry.value)
        assert record.state is VmState.FAILED and record.host == "h2"
        assert record.error == "QEMU exited with status 1: -foo: invalid option"
        assert record.console_tail == ("line 1", "line 2")
        with pytest.raises(IllegalTransition):
            pub.move(VmState.STOPPING)


def test_issued_credentials_reach_only_the_users_prefix(server: EtcdServer,
                                                       bob_answer: dict[str, object],
                                                       tmp_path: Path) -> None:
    with bob_store(server) as store, pytest.raises(StorePermissionDenied):
        Publisher(store, KEYS.vm("alice", "1", 0), "vm0").move(VmState.PREPARING)
