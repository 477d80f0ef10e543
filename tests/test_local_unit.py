"""The local backend's pure parts: job ids and records, sbatch's words, the caller's kin."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from vcluster.agent.local import LocalQueries, descends_from
from vcluster.config.batch import BatchConfig, Directories
from vcluster.errors import InputError
from vcluster.hostpaths import HostLayout
from vcluster.launch.batchargs import read_request
from vcluster.local import registry
from vcluster.local.batch import local_sbatch, output_path
from vcluster.local.reconcile import stragglers
from vcluster.local.stop import StillStopping, cancel
from vcluster.run import start_time
from vcluster.store import MemoryStore
from vcluster.store.keys import Keys

KEYS = Keys("/vcluster")


def test_job_ids_count_up_and_skip_what_is_still_on_disk(tmp_path: Path) -> None:
    layout = HostLayout(state=tmp_path / "state", run=tmp_path / "run")
    with MemoryStore() as store:
        jobs = registry.Registry(store, KEYS, layout)
        assert [jobs.new_job_id() for _ in range(2)] == ["1", "2"]
        layout.undo_dir("3").mkdir(parents=True)  # an undo log of a job 3 of another store
        (layout.state / "local" / "4.json").write_text("{}")  # an id claimed already
        assert jobs.new_job_id() == "5"
        record = registry.own_record("5", "alice", "vcluster", True, layout.run, layout.state)
        jobs.record(record)
        assert jobs.file("5").is_file() and store.get(KEYS.local_job("5")) is not None
        assert [j.job for j in jobs.jobs()] == ["5"] and registry.alive(record)
        store.delete(KEYS.local_job("5"))  # a lost store: the disk copy still tells
        assert [j.job for j in jobs.jobs()] == ["5"]
        jobs.forget(record)
        assert jobs.jobs() == [] and not jobs.file("5").exists()


def test_a_dead_or_reaped_launcher_is_not_alive() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = start_time(proc.pid)
    assert started is not None
    record = registry.LocalJob("1", "alice", os.getuid(), proc.pid, started, "x", True,
                               Path("/run"), Path("/state"))
    proc.wait()
    assert not registry.alive(record)
    assert not registry.alive(registry.LocalJob("1", "a", 0, os.getpid(), started + 1, "x",
                                                True, Path("/r"), Path("/s")))  # pid reused


def test_what_a_dead_launcher_left_is_found_by_its_jobs_directories(tmp_path: Path) -> None:
    """A QEMU or switch of the job names the job's work or run directory on its command
    line: reconcile finds those of that job, and no other job's."""
    launcher = registry.LocalJob("8", "alice", os.getuid(), 4242, 777, "x", True,
                                 tmp_path / "run", tmp_path / "state")
    layout = HostLayout(state=tmp_path / "state", run=tmp_path / "run")
    sleep = [sys.executable, "-c", "import time; time.sleep(30)"]
    ours = subprocess.Popen([*sleep, f"{layout.work_dir('8')}/vm0/disk.qcow2"])
    other = subprocess.Popen([*sleep, f"{layout.work_dir('80')}/vm0/disk.qcow2"])
    try:
        found = stragglers(launcher)
        assert ours.pid in found and other.pid not in found
    finally:
        for proc in (ours, other):
            proc.kill()
            proc.wait()


def test_the_local_agent_knows_the_launchers_descendants_only() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(5)"])
    try:
        assert descends_from(child.pid, os.getpid())
        assert not descends_from(os.getpid(), child.pid)
        queries = LocalQueries("here", "7", os.getpid(), os.getuid(), "alice", 2)
        assert queries.job_of_pid(child.pid) == "7"
        assert queries.job_of_pid(1) is None
        info = queries.job("7")
        assert info is not None and info.tasks == 2 and info.state == "RUNNING"
        assert queries.job("8") is None
    finally:
        child.kill()
        child.wait()


def test_output_file_patterns_are_sbatchs() -> None:
    assert output_path("vcluster-%j.out", "12", "job.sh", Path("/w")) == Path(
        "/w/vcluster-12.out")
    assert output_path("/tmp/%x-%j-%%.log", "3", "famjob", Path("/w")) == Path(
        "/tmp/famjob-3-%.log")


def test_only_the_sbatch_options_that_mean_something_here_are_taken(tmp_path: Path) -> None:
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\n#VCLUSTER tiny:1\n#SBATCH -J named\n#SBATCH -o out-%j\n"
                      "true\n")
    taken = local_sbatch(read_request([str(script)]))
    assert taken == {"job-name": "named", "output": "out-%j"}
    script.write_text("#!/bin/sh\n#VCLUSTER tiny:1\n#SBATCH --comment=mine\ntrue\n")
    assert local_sbatch(read_request([str(script)])) == {"comment": "mine"}
    script.write_text("#!/bin/sh\n#VCLUSTER tiny:1\n#SBATCH -t 30\ntrue\n")
    with pytest.raises(InputError, match=r"job.sh:3: #SBATCH -t 30: -t 30: the local backend"):
        local_sbatch(read_request([str(script)]))


def test_the_comment_is_kept_in_the_jobs_record(tmp_path: Path) -> None:
    layout = HostLayout(state=tmp_path / "state", run=tmp_path / "run")
    with MemoryStore() as store:
        jobs = registry.Registry(store, KEYS, layout)
        record = registry.own_record(jobs.new_job_id(), "alice", "job.sh", True, layout.run,
                                     layout.state, "mine")
        jobs.record(record)
        assert [j.comment for j in jobs.jobs()] == ["mine"]
        jobs.forget(record)


def test_a_held_runner_ends_at_once_when_its_launcher_never_says_go(tmp_path: Path) -> None:
    """The launcher starts the runners before the job has its id; one that fails before
    it says the id closes their stdin: they end, publishing nothing."""
    (tmp_path / "conf").mkdir()
    env = {"HOME": str(tmp_path), "VCLUSTER_CONF": str(tmp_path / "conf"),
           "XDG_STATE_HOME": str(tmp_path / "state"), "XDG_RUNTIME_DIR": str(tmp_path),
           "PATH": os.environ["PATH"], "LANG": "C.UTF-8"}
    done = subprocess.run([sys.executable, "-m", "vcluster", "internal", "vm", "--vm=0",
                           "--host=here", "--local", "--local-agent", "--held"], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    database = tmp_path / "state" / "vcluster" / "store.db"
    if database.exists():  # the runner opened the store while it was held
        from vcluster.store.sqlite import SqliteStore

        with SqliteStore(database) as store:
            assert store.get_prefix("/").values() == {}


def _launcher(tmp_path: Path, store: MemoryStore, job: str,
              *code: str) -> tuple[subprocess.Popen[str], registry.LocalJob]:
    """A process standing in for job ``job``'s launcher (``code`` runs before it says it is
    ready, then it sleeps), recorded as the launcher of that job."""
    layout = HostLayout(state=tmp_path / "state", run=tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-c", "\n".join(
        ["import signal, sys, time", *code, "print('ready', flush=True)", "time.sleep(60)"])],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    started = start_time(proc.pid)
    assert started is not None
    record = registry.LocalJob(job, "alice", os.getuid(), proc.pid, started, "job.sh", True,
                               layout.run, layout.state)
    (layout.state / "local").mkdir(parents=True, exist_ok=True)
    registry.Registry(store, KEYS, layout).record(record)
    return proc, record


def _local(tmp_path: Path) -> BatchConfig:
    return BatchConfig(backend="local", embedded=True,
                       directories=Directories(state=tmp_path / "state", run=tmp_path / "run"))


def test_cancel_is_sigterm_to_the_launcher_and_a_wait_until_it_is_gone(tmp_path: Path) -> None:
    said: list[str] = []
    with MemoryStore() as store:
        proc, record = _launcher(tmp_path, store, "3")
        try:
            cancel(store, _local(tmp_path), ["3"], timeout=30, say=said.append)
            assert proc.wait(5) == -signal.SIGTERM  # ended before cancel returned
        finally:
            proc.kill()
            proc.wait()
        assert said == [f"job 3: stopping (SIGTERM to its launcher, pid {record.pid})",
                        "job 3: cancelled"]
        # the stand-in forgot nothing itself: what it left is released, as reconcile does
        assert registry.Registry(store, KEYS, _local(tmp_path).directories.layout).jobs() == []


def test_cancel_of_an_id_not_running_signals_nothing(tmp_path: Path) -> None:
    with MemoryStore() as store:
        proc, _record = _launcher(tmp_path, store, "4")
        try:
            with pytest.raises(InputError, match=r"^9: no running local job of yours has that "
                               r"id \(yours: 4; vcluster ps lists them\)$"):
                cancel(store, _local(tmp_path), ["4", "9"], timeout=30, say=print)
            assert proc.poll() is None  # job 4 was not touched
        finally:
            proc.kill()
            proc.wait()


def test_a_launcher_still_stopping_after_the_timeout_is_said_and_left_alone(
        tmp_path: Path) -> None:
    with MemoryStore() as store:
        proc, record = _launcher(tmp_path, store, "5",
                                 "signal.signal(signal.SIGTERM, signal.SIG_IGN)")
        try:
            with pytest.raises(StillStopping, match=rf"^job 5 \(pid {record.pid}\): still "
                               r"stopping after 0.3 s; it goes on"):
                cancel(store, _local(tmp_path), ["5"], timeout=0.3, say=print)
            assert proc.poll() is None
        finally:
            proc.kill()
            proc.wait()
