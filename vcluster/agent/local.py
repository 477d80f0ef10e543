"""The agent's work for a local cluster run by root: the same code, in the launcher's process.

On one machine without SLURM, root's launcher serves the agent itself
(``serving``): an ``AgentServer`` on a socket of the job's own
(``<run>/local-<job>.sock``), in a thread, with the same ``Jobs`` (taps,
bridges, NAT, FAM regions, one undo log per job) and the same checks of the
caller.  Only SLURM's answers are replaced (``LocalQueries``): the job is
the launcher's, its tasks are the launcher's descendants (the kernel's
parent links, ``/proc/PID/stat``), its one host this machine.  A private
network is a bridge alone: with one host there is nothing to tunnel to.

When the launcher ends, ``serving`` releases the job; a launcher killed
before that leaves its undo log, and ``release`` (``vcluster gc``, or the
next local launch) removes what it records.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vcluster.agent.firewall import Nftables
from vcluster.agent.jobs import Jobs, Settings
from vcluster.agent.netdev import Netlink
from vcluster.agent.peer import JobInfo
from vcluster.agent.policy import load_policy
from vcluster.agent.protocol import ReleaseAnswer
from vcluster.agent.registration import StoreLink
from vcluster.agent.server import AgentServer
from vcluster.agent.service import Agent
from vcluster.config.batch import BatchConfig
from vcluster.identity import host_name
from vcluster.store.base import Store

log = logging.getLogger(__name__)


def parent_of(pid: int) -> int | None:
    """The parent pid of ``pid`` as the kernel says, None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[1])


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether ``ancestor`` is ``pid`` or one of its ancestors."""
    seen = 0
    current: int | None = pid
    while current is not None and current > 1 and seen < 4096:
        if current == ancestor:
            return True
        current = parent_of(current)
        seen += 1
    return False


@dataclass
class LocalQueries:
    """SLURM's answers for the one local job of a launcher (``peer.SlurmQueries``)."""

    node: str
    job_id: str
    launcher: int  # its pid: the job's processes are its descendants
    uid: int
    user: str
    tasks: int

    def job_of_pid(self, pid: int) -> str | None:
        return self.job_id if descends_from(pid, self.launcher) else None

    def job(self, job: str) -> JobInfo | None:
        if job != self.job_id:
            return None
        return JobInfo(job=job, uid=self.uid, user=self.user, state="RUNNING", nodes=self.node,
                       tasks=self.tasks)

    def jobs_holding_node(self) -> set[str] | None:
        return {self.job_id}

    def hostnames(self, nodelist: str) -> list[str]:
        return [nodelist] if nodelist else []


def _jobs(batch: BatchConfig, policy_dir: Path, store: Store, node: str) -> Jobs:
    layout = batch.directories.layout
    for directory in (layout.state, layout.run):
        directory.mkdir(mode=0o755, parents=True, exist_ok=True)
    link = StoreLink(batch.store, opener=lambda _config: store)
    return Jobs(Settings(node=node, layout=layout), link, load_policy(policy_dir), Netlink(),
                Nftables())


@contextlib.contextmanager
def serving(batch: BatchConfig, policy_dir: Path, store: Store, job: str, user: str,
            tasks: int) -> Iterator[Path]:
    """The agent of ``job`` served from this process until the block ends, then the
    job released; the socket's path."""
    if os.geteuid() != 0:
        raise PermissionError("the local agent runs as root only")
    node = host_name()
    jobs = _jobs(batch, policy_dir, store, node)
    queries = LocalQueries(node, job, os.getpid(), os.getuid(), user, tasks)
    agent = Agent(jobs, queries, jobs.link)
    path = batch.directories.layout.local_agent_socket(job)
    server = AgentServer(path, agent)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                              name=f"local agent {job}", daemon=True)
    try:
        jobs.prolog(JobInfo(job=job, uid=queries.uid, user=user, state="RUNNING", nodes=node,
                            tasks=tasks))
        thread.start()
        yield path
    finally:
        if thread.is_alive():
            server.shutdown()
        server.server_close()
        with contextlib.suppress(OSError):
            path.unlink()
        answer = jobs.release(job, user)
        log.info("local job %s released: %s", job, ", ".join(answer.removed) or "nothing")


def release(batch: BatchConfig, policy_dir: Path, store: Store, job: str,
            user: str) -> ReleaseAnswer:
    """Remove what the undo log of local ``job`` records (its launcher is gone)."""
    node = host_name()
    with contextlib.suppress(OSError):
        batch.directories.layout.local_agent_socket(job).unlink()
    return _jobs(batch, policy_dir, store, node).release(job, user)


def logged_jobs(batch: BatchConfig) -> list[str]:
    """The jobs with an undo log on this machine."""
    from vcluster.agent import undo

    return undo.logged_jobs(batch.directories.layout)
