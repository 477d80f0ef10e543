"""What dead local launchers left: found by the next vcluster command, removed.

A local job whose launcher is gone (``registry.alive``) while its record is
still in the store was cut short: the launcher was killed before its own
clean-up ran.  Its runners and QEMUs died with it (pdeathsig); what remains
is removed here, in this order: any process of the caller's still working
for the job (found by the job's directories on its command line, or the
job's id in its environment), the job's devices (root: the agent's release of
its undo log; rootless: its run and work directories, the switches' sockets
among them), its keys in the store, and last its record.  Every step is
idempotent, so a reconcile that is itself cut short is finished by the next.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from pathlib import Path

from vcluster.config.batch import BatchConfig
from vcluster.config.paths import sample_dir, system_dir
from vcluster.hostpaths import HostLayout
from vcluster.launch.launcher import LOCAL_JOB_VARIABLE
from vcluster.local import registry
from vcluster.local.registry import LocalJob
from vcluster.local.rootless import remove_job_files
from vcluster.store.base import Store
from vcluster.store.keys import Keys

log = logging.getLogger(__name__)


def policy_dir(batch: BatchConfig) -> Path:
    """Where the site's networks and resource sets are read from (the agent's policy)."""
    return sample_dir() if batch.embedded else system_dir()


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _ancestors() -> set[int]:
    from vcluster.agent.local import parent_of

    out, pid = set(), os.getpid()
    while pid > 1:
        out.add(pid)
        pid = parent_of(pid) or 1
    return out


def _in_job_environment(pid: int, job: str) -> bool:
    """Whether the process was started by ``job``'s launcher for the user (its shell, its
    command, a batch script): VCLUSTER_LOCAL_JOB in its environment."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"{LOCAL_JOB_VARIABLE}={job}".encode() in environ


def stragglers(job: LocalJob) -> list[int]:
    """Processes of the caller's still working for ``job``: QEMUs, switches, and what its
    launcher ran for the user (never this process or its ancestors).  Its runners are not
    among them: forked with a parent-death signal (``local.step``), they died with it."""
    layout = HostLayout(state=job.state, run=job.run)
    marks = (f"{layout.work_dir(job.job)}/", f"{layout.run_job(job.job)}/")
    uid = os.getuid()
    spared = _ancestors()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in spared:
            continue
        with contextlib.suppress(OSError):
            if entry.stat().st_uid != uid:
                continue
        pid = int(entry.name)
        argv = _cmdline(pid)
        if any(mark in arg for arg in argv for mark in marks) \
                or _in_job_environment(pid, job.job):
            found.append(pid)
    return found


def release_dead(store: Store, batch: BatchConfig, jobs: registry.Registry,
                 job: LocalJob) -> None:
    """Remove everything of ``job``, whose launcher is gone."""
    for pid in stragglers(job):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            log.info("local job %s: killed pid %d, left by its launcher", job.job, pid)
    remove_job_files(HostLayout(state=job.state, run=job.run), job.job, rootless=job.rootless)
    if not job.rootless:
        from vcluster.agent import local as agent

        agent.release(batch, policy_dir(batch), store, job.job, job.user)
    store.delete_prefix(jobs.keys.cluster_prefix(job.user, job.job))
    jobs.forget(job)


def reconcile(store: Store, batch: BatchConfig) -> list[str]:
    """Release every local job of the caller's whose launcher is gone; their ids."""
    jobs = registry.Registry(store, Keys(batch.store.prefix), batch.directories.layout)
    released = []
    for job in jobs.jobs():
        if job.uid != os.getuid() or registry.alive(job):
            continue
        if not job.rootless and os.getuid() != 0:
            continue  # root's devices: root's to release
        release_dead(store, batch, jobs, job)
        log.warning("local job %s: its launcher (pid %d) is gone; removed what it left",
                    job.job, job.pid)
        released.append(job.job)
    return released
