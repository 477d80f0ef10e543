"""The one way vcluster runs external commands.

Argument lists only (never a shell), stdin closed unless input is given, the
argv logged at debug level, and failures classified (not found, killed by a
signal, non-zero exit) into a CommandError that carries stderr.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

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
