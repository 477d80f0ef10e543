"""The VM runners of a local cluster: one child process per VM, the launcher's own.

The local twin of ``launch.steps.RunnerStep`` (srun): the same
``vcluster internal vm`` per VM, told its index and host on its command
line instead of by SLURM's environment.  The runners are started held
(``--held``) as soon as the cluster's VMs are known, before the job has an
id: each starts Python, imports its code and opens the store while the
launcher imports its own, takes the job's id, records the job and makes its
devices; then it waits for a line on its stdin, the job's id, which ``go``
(the launcher's ``StepStarter``, once the cluster's record is in) sends.
Each runner is started under ``setpriv --pdeathsig KILL`` (its QEMU is
under the same against the runner), so a launcher killed outright takes its
runners, and they their QEMUs, with it; each in a process group of its own, so the Ctrl-C meant
for the user's shell does not reach them.  Their output is kept, each line
labelled with the VM's index as ``srun --label`` does.  Stopping is SIGTERM
to every runner (each powers its guest down), a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from typing import IO

from vcluster.launch.steps import Step
from vcluster.run import Child, spawn, start_time, stop_all


def launcher_mark() -> str:
    """This process as its runners name it on their command line: its pid and start time
    (a runner has no job id there, and reconcile finds a dead launcher's by this)."""
    pid = os.getpid()
    return f"{pid}:{start_time(pid)}"


def runner_argv(index: int, host: str, stop_timeout: float | None,
                extra: Sequence[str]) -> list[str]:
    argv = ["setpriv", "--pdeathsig", "KILL", "--", sys.executable, "-m", "vcluster",
            "internal", "vm", f"--vm={index}", f"--host={host}", "--held",
            f"--launcher={launcher_mark()}", *extra]
    if stop_timeout is not None:
        argv.append(f"--stop-timeout={stop_timeout:g}")
    return argv


class LocalStep:
    """One runner process per VM on this machine (``launch.steps.Step``), held until ``go``."""

    def __init__(self, hosts: Sequence[str], *, stop_timeout: float | None = None,
                 echo: bool = False, extra: Sequence[str] = ()) -> None:
        self.hosts = tuple(hosts)
        self.stop_timeout = stop_timeout
        self.echo = echo
        self.after_ready = False
        self.output: collections.deque[str] = collections.deque(maxlen=200)
        self.procs: list[subprocess.Popen[bytes]] = []
        self._readers: list[threading.Thread] = []
        self._lock = threading.Lock()
        try:
            for index, host in enumerate(hosts):
                proc = spawn(runner_argv(index, host, stop_timeout, extra),
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
        """Let the held runners prepare the VMs of ``job`` (a ``launch.steps.StepStarter``:
        the launcher calls it once the cluster's record is in)."""
        if tuple(hosts) != self.hosts or stop_timeout != self.stop_timeout:
            raise RuntimeError(f"the runners were started on {', '.join(self.hosts)} with "
                               f"stop timeout {self.stop_timeout}, not on {', '.join(hosts)} "
                               f"with {stop_timeout}")
        for proc in self.procs:
            assert proc.stdin is not None  # asked for with stdin=PIPE
            try:
                proc.stdin.write(f"{job}\n".encode())
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


def held_runners(count: int, *, rootless: bool, stop_timeout: float | None,
                 echo: bool) -> LocalStep:
    """The runners of a local cluster of ``count`` VMs, started held: a normal user's
    with the devices its launcher made, root's asking the job's agent in the launcher."""
    from vcluster.identity import host_name

    extra = ["--local"] if rootless else ["--local", "--local-agent"]
    return LocalStep([host_name()] * count, stop_timeout=stop_timeout, echo=echo, extra=extra)
