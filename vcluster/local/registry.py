"""Local jobs: their ids, from the store, and whether their launcher still lives.

A local job is recorded under ``local/jobs/<id>`` (``LocalJob``) before
anything of it is made, and deleted once everything is gone.  Its launcher
is named by pid and the kernel's start time of that pid (``/proc/PID/stat``,
field 22), so a pid reused by another process is not taken for it.  Ids
come from a counter (``local/next-job``) raised by compare-and-swap, so two
launchers starting at once never share one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from vcluster import codec
from vcluster.codec import CodecError
from vcluster.errors import StoreError
from vcluster.store.base import Delete, Put, Store, absent, value_is
from vcluster.store.keys import Keys

FIRST_JOB = 1
CAS_ROUNDS = 100


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


def start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks after boot), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])  # field 22 of the whole line


def alive(job: LocalJob) -> bool:
    """Whether the job's launcher is still the process it was."""
    return start_time(job.pid) == job.started


def new_job_id(store: Store, keys: Keys) -> str:
    """The next local job id (``1``, ``2``, ...), taken by compare-and-swap."""
    key = keys.local_next_job
    for _ in range(CAS_ROUNDS):
        entry = store.get(key)
        if entry is None:
            if store.txn([absent(key)], [Put(key, str(FIRST_JOB + 1))]).succeeded:
                return str(FIRST_JOB)
            continue
        if store.replace(key, entry.value, str(int(entry.value) + 1)):
            return entry.value
    raise StoreError(f"could not take a local job id at {key} after {CAS_ROUNDS} tries "
                     "(too many launchers at once?)")


def record(store: Store, keys: Keys, job: LocalJob) -> None:
    store.put(keys.local_job(job.job), codec.to_json(job))


def jobs(store: Store, keys: Keys) -> list[LocalJob]:
    """Every local job the store knows of (unreadable records are skipped)."""
    out = []
    for entry in store.get_prefix(keys.local_jobs_prefix):
        try:
            out.append(codec.from_json(LocalJob, entry.value, what=entry.key))
        except CodecError:
            continue
    return out


def forget(store: Store, keys: Keys, job: LocalJob) -> None:
    """Delete the record, if it is still the one we read."""
    store.txn([value_is(keys.local_job(job.job), codec.to_json(job))],
              [Delete(keys.local_job(job.job))])


def own_record(job: str, user: str, name: str, rootless: bool, run: Path,
               state: Path) -> LocalJob:
    """The record of a job this process launches."""
    pid = os.getpid()
    started = start_time(pid)
    assert started is not None  # we are alive
    return LocalJob(job, user, os.getuid(), pid, started, name, rootless, run, state)
