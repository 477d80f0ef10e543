"""vcluster's jobs as SLURM sees them: the comment that marks them, and squeue's list of them.

Every job vcluster submits (alloc and batch) carries the comment ``vcluster
MODE DEFINITION`` (then ``; `` and the user's own ``--comment``, if any).
Until its launcher records the cluster in the store (a batch job waiting in
the queue, a job that is starting) that is all there is to know of it, and
``vcluster ps`` shows it from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from vcluster.errors import DefinitionError
from vcluster.run import run

MARK = "vcluster"
MODES = ("alloc", "batch")
SEP = "\x1f"  # between squeue's fields: no job name or comment has it
FORMAT = SEP.join(("%i", "%j", "%T", "%r", "%k"))


def job_comment(mode: str, definition: str, theirs: str | None = None) -> str:
    """The comment a vcluster job is submitted with."""
    comment = f"{MARK} {mode} {definition}"
    return f"{comment}; {theirs}" if theirs else comment


@dataclass(frozen=True)
class QueuedJob:
    """A vcluster job in SLURM's queue."""

    job: str
    name: str
    state: str  # squeue's: PENDING, CONFIGURING, RUNNING, COMPLETING, ...
    reason: str  # why it waits (squeue's %r), "None" when it does not
    mode: str
    definition: str

    @property
    def vms(self) -> int | None:
        """How many VMs its definition names (None if it cannot be read)."""
        from vcluster.definition import parse_definition

        try:
            return sum(count for _, count in parse_definition(self.definition))
        except DefinitionError:
            return None


def parse_queue(text: str) -> list[QueuedJob]:
    """squeue's lines (``FORMAT``): the jobs whose comment marks them as vcluster's."""
    jobs = []
    for line in text.splitlines():
        fields = line.split(SEP)
        if len(fields) != 5:
            continue
        job, name, state, reason, comment = (f.strip() for f in fields)
        words = comment.split(";", 1)[0].split()
        if len(words) == 3 and words[0] == MARK and words[1] in MODES:
            jobs.append(QueuedJob(job, name, state, reason, words[1], words[2]))
    return jobs


def queued_jobs() -> list[QueuedJob]:
    """The calling user's vcluster jobs that SLURM knows (CommandError if squeue fails)."""
    out = run(["squeue", "--me", "--noheader", f"--format={FORMAT}"], timeout=15).stdout
    return parse_queue(out)
