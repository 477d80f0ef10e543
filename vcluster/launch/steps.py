"""The job step that runs the VM runners: start it with srun, stop it gracefully.

The launcher sees the step through ``Step`` (started by a ``StepStarter``),
so its waits can be tested without SLURM (tests/fakes.py has a FakeStep);
``RunnerStep`` is the real one.

Every VM runs on the host ``launch.placement`` chose: srun gets
``--distribution=arbitrary`` and ``--nodelist`` with one host per task, in
task order (duplicates allowed), and SLURM then starts task ``i``
(``SLURM_PROCID=i``, the runner's VM index) on the ``i``-th host (checked
with SLURM 22.05; a ``SLURM_HOSTFILE`` would do the same but is a file to
clean up, and would override the node list, so it is kept from srun).
SLURM does not check that an arbitrary layout fits the CPUs of each host:
the placement does.

SIGTERM to srun makes it abort the step and kill the tasks at once; a clean
stop is ``scancel --signal=TERM JOB.STEP``, which lets every runner power its
guest down and exit, and srun then ends by itself.
"""

from __future__ import annotations

import collections
import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO, Protocol

from vcluster.errors import CommandError
from vcluster.launch.placement import Allocation, allocation_of
from vcluster.run import run, spawn, stop

STEP_NAME = "vcluster-vms"
ABORT_WAIT = 30.0  # seconds srun gets to end once told to abort the step
SQUEUE_WAIT = 10.0  # seconds srun gets to register its step with SLURM


class Step(Protocol):
    """The running step of VM runners, one task per VM."""

    def exited(self) -> int | None:
        """The step's exit status once it has ended, else None."""

    def tail(self, lines: int = 20) -> list[str]:
        """The last lines the runners (and srun) wrote."""

    def ready(self) -> None:
        """Every VM was ready: from now on the step's own errors are warnings."""

    def stop(self, timeout: float) -> int:
        """Tell every runner to stop, give them ``timeout`` seconds, then force; the status."""


class StepStarter(Protocol):
    def __call__(self, job: str, hosts: Sequence[str], *, stop_timeout: float | None,
                 echo: bool) -> Step:
        """Start one runner per VM, VM ``i`` on ``hosts[i]``."""


def step_argv(hosts: Sequence[str], stop_timeout: float | None) -> list[str]:
    """srun for one runner per VM, VM ``i`` on ``hosts[i]``."""
    argv = ["srun", f"--job-name={STEP_NAME}", f"--ntasks={len(hosts)}",
            "--distribution=arbitrary", f"--nodelist={','.join(hosts)}", "--kill-on-bad-exit=0",
            "--label", "--input=none", sys.executable, "-m", "vcluster", "internal", "vm"]
    if stop_timeout is not None:
        argv.append(f"--stop-timeout={stop_timeout:g}")
    return argv


class RunnerStep:
    """``srun … vcluster internal vm``: one task per VM on its host, output kept for diagnosis."""

    def __init__(self, job: str, hosts: Sequence[str], *, stop_timeout: float | None = None,
                 echo: bool = False) -> None:
        self.job = job
        self.count = len(hosts)
        self.echo = echo
        self.after_ready = False
        self.output: collections.deque[str] = collections.deque(maxlen=200)
        env = {k: v for k, v in os.environ.items() if k != "SLURM_HOSTFILE"}
        self.proc = spawn(step_argv(hosts, stop_timeout), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=env)
        assert self.proc.stdout is not None  # asked for with stdout=PIPE
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip("\n")
            self.output.append(line)
            if self.echo:
                print(f"  | {line}", file=sys.stderr, flush=True)
            elif self.after_ready and line.startswith("srun: error:"):
                # e.g. "srun: error: h1: task 1: Killed": a VM's runner is gone
                print(f"vcluster: warning: {line[len('srun: error: '):]}", file=sys.stderr,
                      flush=True)

    def exited(self) -> int | None:
        return self.proc.poll()

    def ready(self) -> None:
        self.after_ready = True

    def step_id(self) -> str | None:
        """``JOB.STEP`` of our step, from squeue (None once it is gone)."""
        try:
            out: str = run(["squeue", "--steps", f"--jobs={self.job}", "--noheader",
                            "--format=%i %j"], timeout=10).stdout
        except CommandError:
            return None
        for line in out.splitlines():
            step, _, name = line.strip().partition(" ")
            if name.strip() == STEP_NAME:
                return step
        return None

    def stop(self, timeout: float) -> int:
        """SIGTERM to every runner through SLURM, ``timeout`` seconds for them to end,
        then srun aborts the step (SIGTERM to srun: SLURM kills the tasks)."""
        if self.exited() is None:
            deadline = time.monotonic() + SQUEUE_WAIT
            step = self.step_id()
            while step is None and self.exited() is None and time.monotonic() < deadline:
                time.sleep(0.2)  # srun has not registered the step yet
                step = self.step_id()
            if step is not None:
                with contextlib.suppress(CommandError):  # it may have ended meanwhile
                    run(["scancel", "--signal=TERM", step], timeout=10)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        stop(self.proc, ABORT_WAIT)
        self._reader.join(5)
        return self.proc.returncode

    def tail(self, lines: int = 20) -> list[str]:
        return list(self.output)[-lines:]


def job_environment() -> tuple[str, str]:
    """The job id and name of the allocation we run in."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        raise CommandError(["vcluster", "internal", "launcher"],
                           "not inside a SLURM allocation (SLURM_JOB_ID is not set); "
                           "use vcluster alloc")
    return job, os.environ.get("SLURM_JOB_NAME", "vcluster")


def job_allocation(env: Mapping[str, str] | None = None) -> Allocation:
    """The hosts and CPUs of the allocation we run in (``scontrol show hostnames``)."""
    env = os.environ if env is None else env
    nodelist, cpus = env.get("SLURM_JOB_NODELIST"), env.get("SLURM_JOB_CPUS_PER_NODE")
    if not nodelist or not cpus:
        raise CommandError(["vcluster", "internal", "launcher"],
                           "SLURM_JOB_NODELIST and SLURM_JOB_CPUS_PER_NODE are not set: not "
                           "inside a SLURM allocation? (use vcluster alloc)")
    hostnames = run(["scontrol", "show", "hostnames", nodelist], timeout=10).stdout.split()
    return allocation_of(hostnames, cpus, env.get("SLURM_CPUS_PER_TASK"))
