"""The sqlite store across processes: compare-and-swap races, kill -9 mid-write, its file.

The conformance suite (tests/test_store_conformance.py) runs the Store
semantics on sqlite with clients in one process; here the clients are real
processes, as a launcher, its VM runners and the user's commands are.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from tests.support_store import events
from vcluster.config.batch import StoreConfig
from vcluster.config.loader import load_config
from vcluster.errors import StoreUnavailable
from vcluster.store import open_store
from vcluster.store.sqlite import SqliteStore

ROUNDS = 20


def _contend(path: str, name: str, barrier: Barrier, results: multiprocessing.Queue[str]
             ) -> None:
    """One racer (in a process of its own): create the round's key, and bump a counter."""
    with SqliteStore(Path(path)) as store:
        for round_ in range(ROUNDS):
            barrier.wait()
            if store.create(f"/vcluster/race/{round_}", name):
                results.put(f"create {round_} {name}")
            barrier.wait()
            if store.replace("/vcluster/counter", str(round_), str(round_ + 1)):
                results.put(f"replace {round_} {name}")


def test_two_processes_race_compare_and_swap_exactly_one_wins(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with SqliteStore(path) as store:
        store.put("/vcluster/counter", "0")
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results: multiprocessing.Queue[str] = context.Queue()
    racers = [context.Process(target=_contend, args=(str(path), name, barrier, results))
              for name in ("a", "b")]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(60)
        assert racer.exitcode == 0
    won = [results.get(timeout=5) for _ in range(2 * ROUNDS)]
    assert results.empty()
    for round_ in range(ROUNDS):  # exactly one winner of each race, every round
        assert len([w for w in won if w.startswith(f"create {round_} ")]) == 1, won
        assert len([w for w in won if w.startswith(f"replace {round_} ")]) == 1, won
    with SqliteStore(path) as store:
        entry = store.get("/vcluster/counter")
        assert entry is not None and entry.value == str(ROUNDS)
        for w in won:
            kind, number, name = w.split()
            if kind == "create":
                got = store.get(f"/vcluster/race/{number}")
                assert got is not None and got.value == name


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from vcluster.store.sqlite import SqliteStore
    from vcluster.store.base import Put

    store = SqliteStore(Path(sys.argv[1]))
    n = 0
    while True:
        # a put, and a transaction of several keys: both must be all there or not at all
        store.put(f"/vcluster/k/{n:06d}", "x" * 2000)
        store.txn([], [Put(f"/vcluster/t/{n:06d}/{i}", str(n)) for i in range(5)])
        print(n, flush=True)
        n += 1
""")


def test_kill_9_mid_write_keeps_a_sound_database_and_every_committed_key(
        tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    for kill in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        committed = -1
        deadline = time.monotonic() + 0.5 + 0.3 * kill
        while time.monotonic() < deadline:  # killed while it writes as fast as it can
            line = proc.stdout.readline()
            if not line:
                break
            committed = int(line)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert committed > 0, "the writer wrote nothing"
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        with SqliteStore(path) as store:
            assert store.integrity() == "ok"
            keys = {e.key for e in store.get_prefix("/vcluster/k/")}
            assert {f"/vcluster/k/{n:06d}" for n in range(committed + 1)} <= keys
            for n in range(committed + 1):
                assert len(store.get_prefix(f"/vcluster/t/{n:06d}/")) == 5
            # a transaction cut short by the kill is absent as a whole, never half there
            for t in {e.key.rsplit("/", 1)[0] for e in store.get_prefix("/vcluster/t/")}:
                assert len(store.get_prefix(t + "/")) == 5


def test_a_watch_sees_what_another_process_writes(tmp_path: Path) -> None:
    path = tmp_path / "store.db"
    with SqliteStore(path) as store, store.watch_prefix("/vcluster/w/") as watch:
        code = ("import sys; from pathlib import Path; from vcluster.store.sqlite import "
                "SqliteStore; s = SqliteStore(Path(sys.argv[1])); "
                "s.put('/vcluster/w/a', '1'); s.delete('/vcluster/w/a'); s.close()")
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=30)
        got = events(watch, 2, timeout=10)
    assert [(e.type.value, e.key, e.value) for e in got] == [
        ("put", "/vcluster/w/a", "1"), ("delete", "/vcluster/w/a", "")]
    assert got[1].revision == got[0].revision + 1


def test_the_database_is_the_users_alone_and_a_locked_one_is_unavailable(
        tmp_path: Path) -> None:
    path = tmp_path / "state" / "vcluster" / "store.db"
    with SqliteStore(path, timeout=0.5) as store:
        store.put("/vcluster/x", "1")
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        holder = sqlite3.connect(path, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process holding the write lock
        try:
            with pytest.raises(StoreUnavailable, match=r"locked by another process for 0\.5 s"):
                store.put("/vcluster/x", "2")
            entry = store.get("/vcluster/x")  # reads go on meanwhile (WAL)
            assert entry is not None and entry.value == "1"
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert store.put("/vcluster/x", "3") > 0


def test_an_unusable_database_path_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreUnavailable, match=r"cannot open .*file/store.db"):
        SqliteStore(tmp_path / "file" / "store.db")


def test_the_configured_sqlite_store_defaults_to_the_users_state_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert StoreConfig(backend="sqlite").database() == tmp_path / "xdg/vcluster/store.db"
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "batch.yaml").write_text("store:\n  backend: sqlite\n  path: db/here.db\n")
    monkeypatch.setenv("VCLUSTER_CONF", str(conf))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load_config().batch.store
    assert config.backend == "sqlite" and config.database() == conf / "db/here.db"
    with open_store(config) as store:
        store.put("/vcluster/a", "b")
    assert (conf / "db/here.db").stat().st_size > 0
