"""session.StoreOpening: the store opened in a thread, taken once, closed if nobody took it."""

from __future__ import annotations

import threading

import pytest

from vcluster import session
from vcluster.config.batch import BatchConfig
from vcluster.errors import StoreUnavailable
from vcluster.store import MemoryStore
from vcluster.store.base import Store


class ClosingStore(MemoryStore):
    def __init__(self) -> None:
        super().__init__()
        self.closed = 0

    def close(self) -> None:
        self.closed += 1
        super().close()


def test_result_is_the_store_opened_in_another_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    store = ClosingStore()
    threads: list[threading.Thread] = []

    def opened(batch: BatchConfig) -> Store:
        threads.append(threading.current_thread())
        return store

    monkeypatch.setattr(session, "open_user_store", opened)
    opening = session.StoreOpening(BatchConfig())
    assert opening.result() is store
    opening.close()  # taken: the taker closes it
    assert store.closed == 0
    assert threads and threads[0] is not threading.current_thread()


def test_an_untaken_store_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    store = ClosingStore()
    monkeypatch.setattr(session, "open_user_store", lambda batch: store)
    opening = session.StoreOpening(BatchConfig())
    opening.close()
    opening.close()
    assert store.closed == 1


def test_a_failure_to_open_is_raised_by_result(monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(batch: BatchConfig) -> Store:
        raise StoreUnavailable("etcd at https://127.0.0.1:9 cannot be reached")

    monkeypatch.setattr(session, "open_user_store", unreachable)
    opening = session.StoreOpening(BatchConfig())
    with pytest.raises(StoreUnavailable, match="cannot be reached"):
        opening.result()
    opening.close()
