"""The VM runners of a local cluster: one child process per VM, the launcher's own.

The local twin of ``launch.steps.RunnerStep`` (srun): the same
``vcluster internal vm`` per VM, told its index, job and host on its
command line instead of by SLURM's environment.  The runners are started
held (``--held``) as soon as the job has its id: each starts Python, imports
its code and opens the store while the launcher records the job and makes
its devices, then waits for a line on its stdin; ``go`` (the launcher's
``StepStarter``, once the cluster's record is in) sends it.  Each runner is started
under ``setpriv --pdeathsig KILL`` (its QEMU is under the same against the
runner), so a launcher killed outright takes its runners, and they their
QEMUs, with it; each in a process group of its own, so the Ctrl-C meant
for the user's shell does not reach them.  Their output is kept, each line
labelled with the VM's index as ``srun --label`` does.  Stopping is SIGTERM
to every runner (each powers its guest down), a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import collections
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO

from vcluster.launch.steps import Step
from vcluster.run import Child, spawn, stop_all


def runner_argv(job: str, index: int, host: str, stop_timeout: float | None,
                extra: Sequence[str]) -> list[str]:
    argv = ["setpriv", "--pdeathsig", "KILL", "--", sys.executable, "-m", "vcluster",
            "internal", "vm", f"--job={job}", f"--vm={index}", f"--host={host}", "--held",
            *extra]
    if stop_timeout is not None:
        argv.append(f"--stop-timeout={stop_timeout:g}")
    return argv


class LocalStep:
    """One runner process per VM on this machine (``launch.steps.Step``), held until ``go``."""

    def __init__(self, job: str, hosts: Sequence[str], *, stop_timeout: float | None = None,
                 echo: bool = False, extra: Sequence[str] = ()) -> None:
        self.job = job
        self.hosts = tuple(hosts)
        self.echo = echo
        self.after_ready = False
        self.output: collections.deque[str] = collections.deque(maxlen=200)
        self.procs: list[subprocess.Popen[bytes]] = []
        self._readers: list[threading.Thread] = []
        self._lock = threading.Lock()
        try:
            for index, host in enumerate(hosts):
                proc = spawn(runner_argv(job, index, host, stop_timeout, extra),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, process_group=0)
                self.procs.append(proc)
                assert proc.stdout is not None  # asked for with stdout=PIPE
                reader = threading.Thread(target=self._read, args=(index, proc.stdout),
                                          daemon=True)
                reader.start()
                self._readers.append(reader)
        except BaseException:
            self.stop(0.0)
            raise

    def go(self, job: str, hosts: Sequence[str], *, stop_timeout: float | None,
           echo: bool) -> Step:
        """Let the held runners prepare their VMs (a ``launch.steps.StepStarter``: the
        launcher calls it once the cluster's record is in)."""
        if job != self.job or tuple(hosts) != self.hosts:
            raise RuntimeError(f"the runners were started for job {self.job} on "
                               f"{', '.join(self.hosts)}, not job {job} on {', '.join(hosts)}")
        for proc in self.procs:
            assert proc.stdin is not None  # asked for with stdin=PIPE
            try:
                proc.stdin.write(b"go\n")
                proc.stdin.close()
            except BrokenPipeError:
                pass  # that runner has ended already: exited() says how
        return self

    def _read(self, index: int, stream: IO[bytes]) -> None:
        for raw in stream:
            line = f"{index}: {raw.decode(errors='replace').rstrip()}"
            with self._lock:
                self.output.append(line)
            if self.echo:
                print(f"  | {line}", file=sys.stderr, flush=True)

    def exited(self) -> int | None:
        """Once every runner has ended: the first non-zero status (0 if none)."""
        codes = [p.poll() for p in self.procs]
        if any(c is None for c in codes):
            return None
        return next((c for c in codes if c), 0)

    def ready(self) -> None:
        self.after_ready = True

    def tail(self, lines: int = 20) -> list[str]:
        with self._lock:
            return list(self.output)[-lines:]

    def stop(self, timeout: float) -> int:
        stop_all([Child(p) for p in self.procs], timeout)
        for reader in self._readers:
            reader.join(5)
        return self.exited() or 0
