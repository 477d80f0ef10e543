"""Daemons of the sandbox: started detached, found and stopped by PID only."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from vcluster import run
from vcluster.errors import CommandError, SandboxError
from vcluster.run import spawn
from vcluster.sandbox.state import Process


def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of ``pid``, ``None`` if there is none."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our own child (when ``up`` ran in this process)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def alive(proc: Process) -> bool:
    """True if the very process that was started still runs (zombies count as dead)."""
    stat = _stat(proc.pid)
    if stat is None or stat[1] != proc.start_time:
        return False
    if stat[0] in ("Z", "X"):
        _reap(proc.pid)
        return False
    return True


def adopt(name: str, pid: int) -> Process | None:
    """A record for a running ``pid`` found by other means (e.g. in a sandbox namespace)."""
    stat = _stat(pid)
    if stat is None:
        return None
    return Process(name=name, pid=pid, start_time=stat[1], log="")


def start(
    name: str,
    argv: Sequence[str],
    log: Path,
    *,
    env: Mapping[str, str] | None = None,
) -> Process:
    """Start a daemon in its own session, its output appended to ``log``."""
    with log.open("ab") as out:
        child = spawn(argv, stdout=out, stderr=out, env=env, new_session=True)
    stat = _stat(child.pid)
    if stat is None:  # exited (and was reaped) already: cannot happen before wait()
        raise SandboxError(f"{name} exited at once; see {log}")
    return Process(name=name, pid=child.pid, start_time=stat[1], log=str(log))


def wait_until(
    what: str,
    ready: Callable[[], bool],
    timeout: float,
    *,
    watch: Sequence[Process] = (),
    interval: float = 0.05,
) -> None:
    """Poll ``ready`` until it holds; fail early if a watched daemon dies."""
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return
        for proc in watch:
            if not alive(proc):
                raise SandboxError(f"{proc.name} died while waiting for {what}; "
                                   f"last lines of {proc.log}:\n{tail(Path(proc.log))}")
        if time.monotonic() > deadline:
            raise SandboxError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


@dataclass
class Daemon:
    """A sandbox daemon as ``run.stop_all`` sees it: alive by PID *and* start time."""

    proc: Process

    def alive(self) -> bool:
        return alive(self.proc)

    def signal(self, signum: int) -> None:
        if alive(self.proc):  # never signal a stranger who got the PID since
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signum)


def stop_all(procs: Sequence[Process], timeout: float = 10.0) -> list[Process]:
    """SIGTERM all at once, SIGKILL what remains after ``timeout``; returns the killed ones."""
    try:
        endings = run.stop_all([Daemon(p) for p in procs], timeout)
    except CommandError as e:
        raise SandboxError(f"{e} (of {', '.join(f'{p.name} pid {p.pid}' for p in procs)})") \
            from e
    return [procs[i] for i, ending in endings.items() if ending is run.Ending.KILLED]


def tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join("  " + line for line in text.strip().splitlines()[-lines:])
