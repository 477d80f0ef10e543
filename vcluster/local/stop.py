"""Cancelling local jobs (``vcluster cancel``): what scancel does for a SLURM job.

A local job's launcher is the process that stops it well: it handles SIGTERM
as a stop signal (``vcluster.cancel``), tells each runner to power its guest
down, waits, removes the job's devices, files and keys and forgets the job,
as at the normal end of an alloc or a batch job.  So cancelling is SIGTERM to
the launcher named by the job's record (its pid and start time: a pid that
now belongs to another process is never signalled), then waiting until it is
gone.  Ids are checked first, all of them, so a wrong one cancels nothing.
A job whose launcher died without its clean-up is released on the spot
(``local.reconcile``), as any vcluster command that reads the jobs would.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Sequence

from vcluster.config.batch import BatchConfig
from vcluster.errors import InputError, VclusterError
from vcluster.local import registry
from vcluster.local.reconcile import reconcile
from vcluster.store.base import Store
from vcluster.store.keys import Keys

POLL = 0.1  # seconds between looks at a stopping launcher


class StillStopping(VclusterError):
    """A launcher did not end within the time given; it goes on stopping."""


def own_jobs(store: Store, batch: BatchConfig) -> dict[str, registry.LocalJob]:
    """The caller's local jobs that still run, by id (the dead ones released first)."""
    reconcile(store, batch)
    jobs = registry.Registry(store, Keys(batch.store.prefix), batch.directories.layout)
    return {job.job: job for job in jobs.jobs()
            if job.uid == os.getuid() and registry.alive(job)}


def cancel(store: Store, batch: BatchConfig, wanted: Sequence[str], *, timeout: float,
           say: Callable[[str], None]) -> None:
    """Stop the caller's local jobs ``wanted`` and wait (``timeout`` seconds in all) until
    each launcher has removed what its job made; InputError naming any id that is not one
    of them (nothing is signalled then), StillStopping for a launcher still at it."""
    running = own_jobs(store, batch)
    unknown = [job for job in wanted if job not in running]
    if unknown:
        listed = ", ".join(sorted(running, key=int)) or "none"
        raise InputError(f"{', '.join(unknown)}: no running local job of yours has that id "
                         f"(yours: {listed}; vcluster ps lists them)")
    stopping = {job: running[job] for job in dict.fromkeys(wanted)}
    for job, record in stopping.items():
        if registry.alive(record):
            os.kill(record.pid, signal.SIGTERM)
            say(f"job {job}: stopping (SIGTERM to its launcher, pid {record.pid})")
    deadline = time.monotonic() + timeout
    while stopping:
        for job, record in list(stopping.items()):
            if not registry.alive(record):
                del stopping[job]
                say(f"job {job}: cancelled")
        if stopping and time.monotonic() > deadline:
            left = ", ".join(f"job {job} (pid {r.pid})" for job, r in stopping.items())
            raise StillStopping(f"{left}: still stopping after {timeout:g} s; it goes on "
                                "(vcluster ps shows it); kill -9 of the pid ends it at once, "
                                "and the next vcluster command removes what it leaves")
        time.sleep(POLL)
    reconcile(store, batch)  # a launcher killed meanwhile by someone else
