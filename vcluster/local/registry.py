"""Local jobs: their ids, from the store, and whether their launcher still lives.

A local job is recorded under ``local/jobs/<id>`` (``LocalJob``), and in
``<state>/local/<id>.json``, before anything of it is made, and both are
deleted once everything is gone.  Its launcher
is named by pid and the kernel's start time of that pid (``/proc/PID/stat``,
field 22), so a pid reused by another process is not taken for it.  Ids
come from a counter (``local/next-job``) raised by compare-and-swap, so two
launchers starting at once never share one.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from vcluster import codec, files
from vcluster.codec import CodecError
from vcluster.errors import StoreError
from vcluster.hostpaths import HostLayout
from vcluster.run import start_time
from vcluster.store.base import Put, Store, absent
from vcluster.store.keys import Keys

FIRST_JOB = 1
CAS_ROUNDS = 100
CLAIM_WAIT = 60.0  # seconds an id may stay claimed without a record


@dataclass(frozen=True)
class LocalJob:
    """What the store keeps of a local job while it may have something on this machine."""

    job: str
    user: str
    uid: int
    pid: int  # the launcher's
    started: int  # the launcher's start time, in clock ticks after boot
    name: str
    rootless: bool
    run: Path  # the directories its files are under (they depend on who ran it)
    state: Path
    switches: dict[str, int] = field(default_factory=dict)  # private network -> vde_switch pid
    comment: str | None = None  # the user's own (batch --comment), kept as SLURM keeps it


def alive(job: LocalJob) -> bool:
    """Whether the job's launcher is still the process it was."""
    return start_time(job.pid) == job.started


class Registry:
    """The local jobs of one machine's layout: in the store and, beside it, on disk.

    The disk copy (``<state>/local/<job>.json``) is what reconcile trusts: a
    store can be lost (another HOME, a deleted file) while the job's devices
    and undo log stay on the machine.  Ids come from the store's counter, but
    one is taken only once its file could be made exclusively, and never while
    the machine still has an undo log or a work directory of it.
    """

    def __init__(self, store: Store, keys: Keys, layout: HostLayout) -> None:
        self.store = store
        self.keys = keys
        self.layout = layout
        self.dir = layout.state / "local"

    def file(self, job: str) -> Path:
        return self.dir / f"{job}.json"

    def _counter(self) -> str:
        key = self.keys.local_next_job
        for _ in range(CAS_ROUNDS):
            entry = self.store.get(key)
            if entry is None:
                if self.store.txn([absent(key)], [Put(key, str(FIRST_JOB + 1))]).succeeded:
                    return str(FIRST_JOB)
                continue
            if self.store.replace(key, entry.value, str(int(entry.value) + 1)):
                return entry.value
        raise StoreError(f"could not take a local job id at {key} after {CAS_ROUNDS} tries "
                         "(too many launchers at once?)")

    def new_job_id(self) -> str:
        """The next free local job id (``1``, ``2``, ...), claimed on disk."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        for _ in range(CAS_ROUNDS):
            job = self._counter()
            if self.layout.undo_dir(job).exists() or self.layout.work_dir(job).exists():
                continue  # something of an earlier job of that id is still here
            try:
                os.close(os.open(self.file(job), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                continue
            return job
        raise StoreError(f"no free local job id after {CAS_ROUNDS} tries (see {self.dir})")

    def record(self, job: LocalJob) -> None:
        text = codec.to_json(job)
        files.write_atomically(self.file(job.job), text)
        self.store.put(self.keys.local_job(job.job), text)

    def jobs(self) -> list[LocalJob]:
        """Every local job recorded on disk or in the store (unreadable records skipped;
        an id claimed a minute ago and never recorded is let go)."""
        found: dict[str, LocalJob] = {}
        for path in sorted(self.dir.glob("*.json")) if self.dir.is_dir() else []:
            with contextlib.suppress(OSError, CodecError):
                text = path.read_text()
                if not text and time.time() - path.stat().st_mtime > CLAIM_WAIT:
                    path.unlink()
                    continue
                if text:
                    job = codec.from_json(LocalJob, text, what=str(path))
                    found[job.job] = job
        for entry in self.store.get_prefix(self.keys.local_jobs_prefix):
            with contextlib.suppress(CodecError):
                job = codec.from_json(LocalJob, entry.value, what=entry.key)
                found.setdefault(job.job, job)
        return list(found.values())

    def forget(self, job: LocalJob) -> None:
        self.store.delete(self.keys.local_job(job.job))
        with contextlib.suppress(FileNotFoundError):
            self.file(job.job).unlink()


def own_record(job: str, user: str, name: str, rootless: bool, run: Path,
               state: Path, comment: str | None = None) -> LocalJob:
    """The record of a job this process launches."""
    pid = os.getpid()
    started = start_time(pid)
    assert started is not None  # we are alive
    return LocalJob(job, user, os.getuid(), pid, started, name, rootless, run, state,
                    comment=comment)
