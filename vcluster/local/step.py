"""The VM runners of a local cluster: one child process per VM, the launcher's own.

The local twin of ``launch.steps.RunnerStep`` (srun): the same
``vcluster internal vm`` per VM, told its index and host on its command
line instead of by SLURM's environment, run in a child forked from the
launcher (``vcluster.fork``: it shares what the launcher imported, and
imports only the runner's own code, half of what a new Python would).  The
runners are forked held (``--held``) as soon as the cluster's VMs are known,
before the job has an id and before the launcher has a thread: each imports
its code and opens the store while the launcher imports its own, takes the
job's id, records the job and makes its devices; then it waits for a line on
its stdin, the job's id, which ``go`` (the launcher's ``StepStarter``, once
the cluster's record is in) sends.  A runner gets SIGKILL when its launcher
dies, however it dies (its QEMU is under the same against the runner), so a
launcher killed outright takes its runners, and they their QEMUs, with it;
each is in a process group of its own, so the Ctrl-C meant for the user's
shell does not reach them, and is named ``vcluster-vmN`` (``ps -o comm``).
Their output is kept, each line labelled with the VM's index as ``srun
--label`` does.  Stopping is SIGTERM to every runner (each powers its guest
down), a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import collections
import sys
import threading
from collections.abc import Callable, Sequence
from typing import IO

from vcluster.fork import Forked, fork_call
from vcluster.launch.steps import Step
from vcluster.run import stop_all


def runner_args(index: int, host: str, stop_timeout: float | None,
                extra: Sequence[str]) -> list[str]:
    """The arguments of ``vcluster internal vm`` for the held runner of VM ``index``."""
    args = [f"--vm={index}", f"--host={host}", "--held", *extra]
    if stop_timeout is not None:
        args.append(f"--stop-timeout={stop_timeout:g}")
    return args


def _runner(args: list[str]) -> Callable[[], int]:
    """``vcluster internal vm ARGS`` in the child, its errors said as the command line says
    them (``cli.main``)."""

    def run() -> int:
        from vcluster.errors import VclusterError
        from vcluster.vm.command import vm

        try:
            vm.main(args=args, prog_name="vcluster internal vm")  # exits
        except VclusterError as e:
            print(f"vcluster: error: {e}", file=sys.stderr)
            return e.exit_code
        return 0

    return run


class LocalStep:
    """One runner process per VM on this machine (``launch.steps.Step``), held until ``go``."""

    def __init__(self, hosts: Sequence[str], *, stop_timeout: float | None = None,
                 echo: bool = False, extra: Sequence[str] = ()) -> None:
        self.hosts = tuple(hosts)
        self.stop_timeout = stop_timeout
        self.echo = echo
        self.after_ready = False
        self.output: collections.deque[str] = collections.deque(maxlen=200)
        self.procs: list[Forked] = []
        self._readers: list[threading.Thread] = []
        self._lock = threading.Lock()
        try:
            for index, host in enumerate(hosts):
                held = [fd for proc in self.procs for fd in proc.descriptors()]
                self.procs.append(fork_call(_runner(runner_args(index, host, stop_timeout,
                                                                extra)),
                                            name=f"vcluster-vm{index}", close=held))
            for index, proc in enumerate(self.procs):  # threads once every runner is forked
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
        stop_all(self.procs, timeout)
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
