"""Commands in a job's VMs through their guest agents, from the login node or inside the job.

For each host of the chosen VMs, one ``srun --overlap`` into the job runs
``vcluster internal exec`` there, which talks to each VM's qemu-guest-agent
socket (``vm/guestexec.py``); its last stdout line gives every VM's exit
status (``vcluster.execwire``).  ``vcluster exec`` and ``vcluster batch -b``
both come through here.  Everything else the VMs print is passed on to our
stdout and stderr as it arrives from each host.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO

from vcluster.execwire import MARK, parse_status_line
from vcluster.launch.overlap import overlap_argv, overlap_env
from vcluster.run import spawn, stop

POLL = 0.2
STOP_WAIT = 10.0  # seconds srun gets to end once told to stop


@dataclass(frozen=True)
class VmCommand:
    """One command for some VMs of a job."""

    job: str
    hosts: dict[str, list[int]]  # each host and the VMs on it
    argv: tuple[str, ...]
    user: str | None = None  # None: the guest agent's user, root
    timeout: float | None = None  # seconds; status 124 after it
    names: bool = False  # ``vmN: `` before each line
    stdin: bytes | None = None  # all of every command's standard input
    local: bool = False  # a local cluster's: run on this machine, no srun


def exec_argv(command: VmCommand, host: str) -> list[str]:
    """``srun … vcluster internal exec …`` for the VMs of ``command`` on ``host``."""
    return [*overlap_argv(command.job, host, local=command.local), sys.executable,
            "-m", "vcluster", "internal", "exec", "--job", command.job,
            *(f"--vm={i}" for i in command.hosts[host]),
            *(["--user", command.user] if command.user else []),
            *([f"--timeout={command.timeout:g}"] if command.timeout else []),
            *(["--stdin"] if command.stdin is not None else []),
            "--names" if command.names else "--no-names", "--", *command.argv]


def relay(stream: IO[bytes], got: dict[int, int], out: IO[bytes] | None = None) -> None:
    """Pass the VMs' output on to ``out`` (our stdout), keeping the status line's statuses.

    The status line may follow output that did not end with a newline (``printf x``): it
    starts wherever its mark is.
    """
    sink = out if out is not None else sys.stdout.buffer
    for line in stream:
        at = line.find(MARK)
        statuses = parse_status_line(line[at:]) if at >= 0 else None
        if statuses is not None:
            got.update(statuses)
            line = line[:at]
        if line:
            sink.write(line)
            sink.flush()


def _feed(proc: subprocess.Popen[bytes], data: bytes) -> None:
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.write(data)
    with contextlib.suppress(BrokenPipeError):
        proc.stdin.close()


def run_in_vms(command: VmCommand,
               cancelled: Callable[[], bool] = lambda: False) -> dict[int, int]:
    """Run ``command`` on its VMs, one srun per host in parallel; each VM's exit status.

    A VM missing from the result had no answer from its host (srun said why on
    stderr); ``execwire.NO_GUEST_AGENT`` is a VM whose guest agent did not answer.
    When ``cancelled()`` turns true the sruns are stopped.
    """
    procs: list[subprocess.Popen[bytes]] = []
    threads: list[threading.Thread] = []
    got: dict[int, int] = {}
    try:
        for host in command.hosts:
            proc = spawn(exec_argv(command, host), stdout=subprocess.PIPE, stderr=None,
                         env=overlap_env(),
                         stdin=subprocess.DEVNULL if command.stdin is None else subprocess.PIPE)
            procs.append(proc)
            assert proc.stdout is not None
            threads.append(threading.Thread(target=relay, args=(proc.stdout, got)))
            threads[-1].start()
            if command.stdin is not None:
                threads.append(threading.Thread(target=_feed, args=(proc, command.stdin)))
                threads[-1].start()
        for proc in procs:
            while True:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(POLL)
                    break
                if cancelled():
                    return got
    finally:
        for proc in procs:
            stop(proc, STOP_WAIT)
        for thread in threads:
            thread.join()
    return got


def summary(statuses: dict[int, int]) -> str | None:
    """The one line saying which VMs failed (None when none did)."""
    failed = [(i, s) for i, s in sorted(statuses.items()) if s != 0]
    if not failed:
        return None
    which = ", ".join(f"vm{i} (exit {s})" for i, s in failed)
    if len(failed) == len(statuses):
        return f"every VM failed: {which}"
    return f"{len(failed)} of {len(statuses)} VMs failed: {which}"
