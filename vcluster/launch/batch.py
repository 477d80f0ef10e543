"""Submitting a batch cluster: check everything, then hand a job script to sbatch.

The job script sbatch gets (on its stdin) is the user's ``#SBATCH`` lines,
then one command: the launcher (``vcluster internal launcher --batch``),
reading the ``BatchJob`` (the plan, the user's script as it was at
submission, its arguments) from a here-document, so the job needs no file
of the login node.  sbatch reads the ``#SBATCH`` lines itself and is given
the other options on its command line (which wins over them, as for any
sbatch script): the ``#VCLUSTER`` lines' sbatch options, then the command
line's, then one task per VM and the comment that marks the job as a
vcluster cluster (``launch.queue``).

When sbatch refuses the job, the ``#SBATCH`` and ``#VCLUSTER`` lines are
tried one by one (``sbatch --test-only``) to name the line it refuses.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

from vcluster.cancel import ignored
from vcluster.cluster import ClusterPlan
from vcluster.errors import DefinitionError, InputError, VclusterError
from vcluster.launch.batchargs import BatchRequest, Directive, read_request
from vcluster.launch.launcher import BatchScript
from vcluster.launch.queue import job_comment
from vcluster.launch.submit import FORWARDED, forwarded
from vcluster.run import run, spawn

END = "VCLUSTER_BATCH_JOB_END"  # ends the here-document (JSON on one line never equals it)


@dataclass(frozen=True)
class BatchJob:
    """What the launcher of a batch job is given."""

    plan: ClusterPlan
    script: BatchScript
    stop_timeout: float | None = None
    ready_timeout: float = 600.0


def job_script(request: BatchRequest, job: BatchJob) -> str:
    """The script sbatch is given."""
    from vcluster.codec import to_json

    payload = to_json(job)
    assert "\n" not in payload.rstrip("\n")
    launcher = [sys.executable, "-m", "vcluster", "internal", "launcher", "--batch"]
    return "\n".join([
        "#!/bin/sh",
        *(d.text for d in request.sbatch_lines),
        f"# vcluster batch {request.script.name}: {job.plan.definition}; the launcher boots "
        "the cluster, runs the script and stops the cluster",
        f"exec {shlex.join(launcher)} <<'{END}'",
        payload.rstrip("\n"),
        END,
        "",
    ])


def own_options(request: BatchRequest, plan: ClusterPlan) -> list[str]:
    """What vcluster itself asks sbatch for: a task per VM, their CPUs, a name, the mark."""
    own = [f"--ntasks={len(plan.vms)}"]
    if request.cpus is not None:
        own.append(f"--cpus-per-task={request.cpus}")
    if request.job_name is None:
        own.append(f"--job-name={request.script.name}")  # as sbatch names a script's job
    own.append(f"--comment={job_comment('batch', plan.definition, request.comment)}")
    return own


class _Tee(threading.Thread):
    """Copy a stream to ours as it comes, keeping it."""

    def __init__(self, source: IO[bytes], sink: IO[bytes]) -> None:
        super().__init__(daemon=True)
        self.source, self.sink, self.kept = source, sink, bytearray()

    def run(self) -> None:
        for line in self.source:
            self.kept += line
            self.sink.write(line)
            self.sink.flush()

    @property
    def text(self) -> str:
        return self.kept.decode(errors="replace")


def _submitted(stdout: str) -> bool:
    """Whether sbatch said it submitted the job (plain or --parsable)."""
    first = stdout.strip().split("\n")[0] if stdout.strip() else ""
    return first.startswith("Submitted batch job") or first.split(";")[0].isdigit()


def _sbatch_error(stderr: str) -> str:
    lines = [line.removeprefix("sbatch: error: ").strip() for line in stderr.splitlines()
             if line.strip()]
    return "; ".join(lines) or "no reason given"


def _refusal(options: Sequence[str], lines: Sequence[Directive] = ()) -> str | None:
    """``sbatch --test-only`` with these options and #SBATCH lines: its refusal, or None."""
    script = "\n".join(["#!/bin/sh", *(d.text for d in lines), "true", ""])
    done = run(["sbatch", "--test-only", *options], check=False, timeout=30, input=script)
    return None if done.returncode == 0 else _sbatch_error(done.stderr)


def _blame(request: BatchRequest, own: Sequence[str], refusal: str) -> VclusterError:
    """The directive (or the options) sbatch refuses, as an InputError; else its refusal."""
    if _refusal(own) is None:
        for d in request.sbatch_lines:
            if (why := _refusal(own, [d])) is not None:
                return InputError(f"{d.where}: sbatch refuses it: {why}")
        for where, options in request.sbatch_from:
            if (why := _refusal([*options, *own])) is not None:
                if where is None:
                    return InputError(f"{' '.join(options)}: sbatch refuses them: {why}")
                return InputError(f"{where.where}: sbatch refuses it: {why}")
    return VclusterError(f"sbatch refused the job: {refusal}")


def prepare_batch(words: Sequence[str]) -> tuple[BatchRequest, BatchJob]:
    """What ``vcluster batch WORDS`` asks for, every part of it checked."""
    from vcluster.cluster import plan_cluster
    from vcluster.config.loader import load_config

    request = read_request(words)
    config = load_config()
    try:
        plan = plan_cluster(config, request.definition, cpus_per_task=request.cpus)
    except DefinitionError as e:
        if request.definition_from is None:
            raise
        raise InputError(f"{request.definition_from.where}: {e}") from e
    job = BatchJob(plan, BatchScript(request.script.name, request.text, request.args,
                                     request.in_vm),
                   stop_timeout=request.stop_timeout, ready_timeout=request.ready_timeout)
    return request, job


def submit_batch(request: BatchRequest, job: BatchJob) -> int:
    """Hand the job to sbatch: its exit status (with --wait, the job's)."""
    own = own_options(request, job.plan)
    # sbatch's stderr is held back until it has submitted the job: a refusal becomes one line.
    with tempfile.TemporaryFile() as errors:
        proc = spawn(["sbatch", *request.sbatch, *own], stdin=subprocess.PIPE,
                     stdout=subprocess.PIPE, stderr=errors)
        assert proc.stdin is not None and proc.stdout is not None
        out = _Tee(proc.stdout, sys.stdout.buffer)
        out.start()
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.write(job_script(request, job).encode())
            proc.stdin.close()
        # With --wait sbatch waits for the job: Ctrl-C reaches it from the terminal, the
        # other stop signals are passed on.
        with forwarded(proc, FORWARDED), ignored((signal.SIGINT,)):
            code = proc.wait()
        out.join(5)
        errors.seek(0)
        stderr = errors.read().decode(errors="replace")
    if code != 0 and not _submitted(out.text):
        raise _blame(request, own, _sbatch_error(stderr))
    sys.stderr.write(stderr)
    return code
