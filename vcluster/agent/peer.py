"""Who is calling, and does that caller belong to the job it names.

The caller is what the kernel says (SO_PEERCRED: pid, uid, gid of the
process that connected), never what the request says.  Membership is what
SLURM says: ``scontrol pidinfo PID`` names the job a process belongs to on
this host (slurmd answers from its process tracking), and ``scontrol show
job`` names the job's user.  A job's owner (``prove_owner``) is who SLURM
says, for requests made outside the job's tasks (the launcher runs on the
login node, where no slurmd tracks it).  A job's hosts are SLURM's NodeList
expanded by ``scontrol show hostnames``, never what a caller says.  Every
SLURM command has a bounded timeout.
"""

from __future__ import annotations

import re
import socket
import struct
from dataclasses import dataclass
from typing import Protocol

from vcluster.agent.protocol import AgentError, denied, failed
from vcluster.errors import CommandError, VclusterError
from vcluster.run import run

SLURM_TIMEOUT = 15.0
# Job states in which a job still holds its nodes (its resources must stay).
HOLDING_STATES = "R,S,CG,CF,ST,SO,SI,RS"
# Job states in which a job's launcher may still set it up.
STARTING_STATES = frozenset({"RUNNING", "CONFIGURING"})

_PIDINFO_RE = re.compile(r"\bJobId=(\d+)")
_USER_RE = re.compile(r"\bUserId=(\S*)\((\d+)\)")
_STATE_RE = re.compile(r"\bJobState=(\S+)")
_NODES_RE = re.compile(r"\bNodeList=(\S+)")
_TASKS_RE = re.compile(r"\bNumTasks=(\d+)")


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a unix socket."""

    pid: int
    uid: int
    gid: int


def peer_of(sock: socket.socket) -> Peer:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return Peer(pid, uid, gid)


@dataclass(frozen=True)
class JobInfo:
    """What SLURM says of a job."""

    job: str
    uid: int
    user: str
    state: str
    nodes: str
    tasks: int | None = None  # NumTasks; None when SLURM did not say


class SlurmQueries(Protocol):
    """What the agent asks SLURM (``Slurm`` asks the real one; tests give canned answers).

    A question SLURM cannot answer raises AgentError (``failed``).
    """

    node: str

    def job_of_pid(self, pid: int) -> str | None:
        """The job that process ``pid`` belongs to on this host, or None."""

    def job(self, job: str) -> JobInfo | None:
        """The job's user and state, or None if SLURM does not know the job (any more)."""

    def jobs_holding_node(self) -> set[str] | None:
        """Jobs SLURM runs (or is ending) on this node; None when SLURM cannot tell."""

    def hostnames(self, nodelist: str) -> list[str]:
        """The host names of a SLURM node list (``h[1-3]``), in SLURM's order."""


class Slurm:
    """The SLURM questions the agent asks, through ``scontrol`` and ``squeue``."""

    def __init__(self, node: str, timeout: float = SLURM_TIMEOUT) -> None:
        self.node = node
        self.timeout = timeout

    def _run(self, argv: list[str]) -> tuple[int, str, str]:
        try:
            result = run(argv, check=False, timeout=self.timeout)
        except CommandError as e:
            raise failed(f"cannot ask SLURM ({e})") from e
        return result.returncode, str(result.stdout), str(result.stderr)

    def job_of_pid(self, pid: int) -> str | None:
        """The job that process ``pid`` belongs to on this host, or None."""
        code, out, _err = self._run(["scontrol", "pidinfo", str(pid)])
        match = _PIDINFO_RE.search(out)
        return match.group(1) if code == 0 and match else None

    def job(self, job: str) -> JobInfo | None:
        """The job's user and state, or None if SLURM does not know the job (any more)."""
        code, out, err = self._run(["scontrol", "show", "job", "-o", job])
        if code != 0:
            if "Invalid job id" in err or "Invalid job id" in out:
                return None
            last = (err.strip().splitlines() or ["no message"])[-1]
            raise failed(f"scontrol show job {job} failed: {last}")
        user = _USER_RE.search(out)
        state = _STATE_RE.search(out)
        nodes = _NODES_RE.search(out)
        tasks = _TASKS_RE.search(out)
        if user is None or state is None:
            raise failed(f"scontrol show job {job}: no UserId or JobState in its answer")
        return JobInfo(job=job, uid=int(user.group(2)), user=user.group(1),
                       state=state.group(1), nodes=nodes.group(1) if nodes else "",
                       tasks=int(tasks.group(1)) if tasks else None)

    def hostnames(self, nodelist: str) -> list[str]:
        """The host names of a SLURM node list (``h[1-3]``), in SLURM's order."""
        if not nodelist or nodelist == "(null)":
            return []
        code, out, err = self._run(["scontrol", "show", "hostnames", nodelist])
        if code != 0:
            last = (err.strip().splitlines() or ["no message"])[-1]
            raise failed(f"scontrol show hostnames {nodelist} failed: {last}")
        return [line.strip() for line in out.splitlines() if line.strip()]

    def check_node(self) -> None:
        """Refuse (VclusterError) unless SLURM knows this agent's node name.

        The reconcile pass asks ``squeue --nodelist=NODE``: a name SLURM does
        not know would make it do nothing, or worse, without a word.
        """
        try:
            code, out, err = self._run(["scontrol", "show", "node", "-o", self.node])
        except AgentError as e:
            raise VclusterError(f"cannot check that SLURM knows node {self.node!r}: "
                                f"{e}") from e
        if code == 0 and f"NodeName={self.node} " in out + " ":
            return
        said = (err.strip() or out.strip() or "no answer").splitlines()[-1]
        if "not found" in said:
            raise VclusterError(
                f"SLURM knows no node {self.node!r} (scontrol show node: {said}); pass this "
                "host's NodeName from slurm.conf with --node, or --login-node on a host "
                "that runs no SLURM jobs")
        raise VclusterError(f"cannot check that SLURM knows node {self.node!r} "
                            f"(scontrol show node: {said}); is slurmctld reachable?")

    def jobs_holding_node(self) -> set[str] | None:
        """Jobs SLURM runs (or is ending) on this node; None when SLURM cannot tell."""
        code, out, _err = self._run(["squeue", "--noheader", f"--nodelist={self.node}",
                                     f"--states={HOLDING_STATES}", "--format=%A"])
        if code != 0:
            return None
        return {line.strip() for line in out.splitlines() if line.strip()}


def prove_member(slurm: SlurmQueries, peer: Peer, job: str, host: str) -> JobInfo:
    """The job, if ``peer`` is a process of ``job`` on this host running as the job's user.

    Otherwise a ``denied`` AgentError that says why.
    """
    actual = slurm.job_of_pid(peer.pid)
    if actual != job:
        part = f"part of job {actual}, not {job}" if actual else f"part of no job on {host}"
        raise denied(f"pid {peer.pid} is not part of job {job} on {host} (it is {part}); "
                     "ask from a task of the job (srun)")
    info = slurm.job(job)
    if info is None:
        raise denied(f"job {job} is not known to SLURM (any more)")
    if info.uid != peer.uid:
        raise denied(f"job {job} belongs to uid {info.uid}, not {peer.uid}")
    return info


def prove_owner(slurm: SlurmQueries, peer: Peer, job: str) -> JobInfo:
    """The job, if ``peer`` runs as its user (or as root) and it is running or configuring.

    For requests made outside the job's tasks (the launcher, inside salloc on
    the login node); otherwise a ``denied`` AgentError that says why.
    """
    info = slurm.job(job)
    if info is None:
        raise denied(f"job {job} is not known to SLURM (any more)")
    if peer.uid not in (info.uid, 0):
        raise denied(f"job {job} belongs to uid {info.uid}, not {peer.uid}")
    if info.state not in STARTING_STATES:
        raise denied(f"job {job} is {info.state}, not running: its networks are set up "
                     "only while it starts or runs")
    return info


def require_root(peer: Peer, what: str) -> None:
    if peer.uid != 0:
        raise denied(f"{what} needs root (you are uid {peer.uid})")


__all__ = ["JobInfo", "Peer", "Slurm", "SlurmQueries", "peer_of", "prove_member",
           "prove_owner", "require_root"]
