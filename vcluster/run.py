"""The one way vcluster runs external commands, and the one way it stops them.

Argument lists only (never a shell), stdin closed unless input is given, the
argv logged at debug level, and failures classified (not found, killed by a
signal, non-zero exit) into a CommandError that carries stderr.  ``stop``
and ``stop_all`` end processes the same way everywhere: a signal, a bounded
wait, SIGKILL, and word of how each ended.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import IO, Any, Protocol

from vcluster.errors import CommandError

log = logging.getLogger(__name__)

StrPath = str | os.PathLike[str]


def _describe_failure(argv: list[str], returncode: int, stderr: str) -> str:
    name = Path(argv[0]).name
    if returncode < 0:
        try:
            signame = signal.Signals(-returncode).name
        except ValueError:
            signame = f"signal {-returncode}"
        what = f"{name} was killed by {signame}"
    else:
        what = f"{name} failed with exit status {returncode}"
    last = [line for line in stderr.strip().splitlines() if line.strip()]
    return f"{what}: {last[-1].strip()}" if last else what


def run(
    argv: Sequence[StrPath],
    *,
    check: bool = True,
    input: str | bytes | None = None,
    capture: bool = True,
    env: Mapping[str, str] | None = None,
    cwd: StrPath | None = None,
    timeout: float | None = None,
    text: bool = True,
) -> subprocess.CompletedProcess[Any]:
    """Run ``argv`` to completion and return the result.

    With ``check`` a failure raises CommandError naming the command and the
    last line it wrote to stderr.  ``env`` replaces the environment entirely
    when given (callers build it from os.environ on purpose).
    """
    args = [os.fspath(a) for a in argv]
    log.debug("run: %s", shlex.join(args))
    if isinstance(input, str) and not text:
        input = input.encode()
    try:
        proc = subprocess.run(
            args,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.PIPE if capture else None,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            timeout=timeout,
            text=text,
            check=False,
        )
    except FileNotFoundError as e:
        raise CommandError(args, f"{args[0]}: command not found (is it installed?)") from e
    except subprocess.TimeoutExpired as e:
        raise CommandError(args, f"{Path(args[0]).name} did not finish in {timeout:g} s") from e
    if check and proc.returncode != 0:
        stderr = proc.stderr if isinstance(proc.stderr, str) else (proc.stderr or b"").decode(
            errors="replace"
        )
        raise CommandError(args, _describe_failure(args, proc.returncode, stderr or ""), stderr)
    return proc


def spawn(
    argv: Sequence[StrPath],
    *,
    stdout: int | IO[Any] | None = subprocess.DEVNULL,
    stderr: int | IO[Any] | None = subprocess.DEVNULL,
    stdin: int | IO[Any] | None = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
    cwd: StrPath | None = None,
    new_session: bool = False,
    process_group: int | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in the background (daemons, QEMU) and return its Popen."""
    args = [os.fspath(a) for a in argv]
    log.debug("spawn: %s", shlex.join(args))
    try:
        return subprocess.Popen(
            args,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=new_session,
            process_group=process_group,
            pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError as e:
        raise CommandError(args, f"{args[0]}: command not found (is it installed?)") from e


# ------------------------------------------------------------------ stopping


class Ending(Enum):
    """How a stopped process ended."""

    ALREADY = "had exited already"
    EXITED = "exited when asked"
    KILLED = "was killed after the grace period"

    def __str__(self) -> str:
        return self.value


class Stoppable(Protocol):
    """A process ``stop_all`` can end: a child (Popen) or a daemon known by its PID."""

    def alive(self) -> bool:
        """Still running (a zombie is not: it has ended, only not been reaped)."""

    def signal(self, signum: int) -> None:
        """Send ``signum``; no error if the process is gone."""


@dataclass
class Child:
    """A Popen as a Stoppable (polling reaps it)."""

    proc: subprocess.Popen[Any]

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signum)


KILL_WAIT = 5.0  # seconds for the kernel to take a SIGKILLed process down
_POLL = 0.02


def _wait_until_gone(targets: Sequence[Stoppable], timeout: float) -> list[Stoppable]:
    """Those of ``targets`` still alive after at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        left = [t for t in targets if t.alive()]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(_POLL)


def stop_all(targets: Sequence[Stoppable], grace: float, *,
             signum: int | None = signal.SIGTERM) -> dict[int, Ending]:
    """Stop every target: ``signum`` to all at once (None: they were asked already),
    a bounded wait of ``grace`` seconds, then SIGKILL to what remains.

    Returns how each ended, by position.  A target still alive ``KILL_WAIT``
    seconds after SIGKILL is a CommandError (a process in uninterruptible
    sleep; nothing more can be done from here).
    """
    endings = {i: Ending.ALREADY for i, t in enumerate(targets) if not t.alive()}
    running = [i for i in range(len(targets)) if i not in endings]
    if signum is not None:
        for i in running:
            targets[i].signal(signum)
    stubborn = set(map(id, _wait_until_gone([targets[i] for i in running], grace)))
    for i in running:
        endings[i] = Ending.KILLED if id(targets[i]) in stubborn else Ending.EXITED
        if endings[i] is Ending.KILLED:
            targets[i].signal(signal.SIGKILL)
    survivors = _wait_until_gone([targets[i] for i in running if endings[i] is Ending.KILLED],
                                 KILL_WAIT)
    if survivors:
        raise CommandError([], f"{len(survivors)} process(es) still running {KILL_WAIT:g} s "
                               "after SIGKILL")
    return endings


def stop(proc: subprocess.Popen[Any], grace: float, *,
         signum: int | None = signal.SIGTERM) -> Ending:
    """Stop a child: ``signum`` (None: it was asked already), wait up to ``grace``
    seconds, then SIGKILL; it is reaped when this returns."""
    ending = stop_all([Child(proc)], grace, signum=signum)[0]
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(KILL_WAIT)
    return ending


def start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks after boot), None if it is gone
    (or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None  # dead, waiting to be reaped (which may take a while)
    return int(fields[19])  # field 22 of the whole line
