"""Running a function of this program in a forked child, without exec: what is imported is
shared.

A local launcher starts one VM runner per VM.  Started as ``python -m
vcluster internal vm``, each spends some 0.17 s of CPU importing what the
launcher has imported already (click, the configuration, the store, ...);
on a machine of two cores that is what a cluster waits for.  ``fork_call``
starts ``target`` in a child of this process instead: the child has every
module its parent had, and imports only what is its own.

The child is made as the runners under SLURM are not, so it is made with
care:

- the caller forks only while this process has one thread (a thread holding
  a lock at the fork would leave the child's copy of it locked for ever):
  ``fork_call`` refuses otherwise;
- it gets SIGKILL when its parent dies (``PR_SET_PDEATHSIG``, checked
  against a parent that died before it was set), so it cannot outlive the
  process that started it, however that ends;
- it is in a process group of its own (the Ctrl-C meant for the user's
  shell does not reach it) and its name (``ps -o comm``, ``top``) is
  ``name``; its command line stays its parent's;
- its stdin and stdout are pipes of its parent's (stderr goes with stdout),
  and it holds no other descriptor of its parent's that ``close`` names;
- it ends with ``os._exit`` and the status ``target`` returned (or exited
  with, 1 if it raised, with the traceback on its stderr): none of its
  parent's exit handlers run in it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import BinaryIO

PR_SET_PDEATHSIG = 1
PR_SET_NAME = 15


class ForkError(RuntimeError):
    """The child could not be forked safely (a programming error, not the user's)."""


def _prctl(option: int, value: int | bytes) -> None:
    import ctypes  # in the child only: the parent has no use for it

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), f"prctl({option})")


class Forked:
    """A child of ``fork_call``: its pipes, its status, ``Stoppable`` for ``run.stop_all``."""

    def __init__(self, pid: int, stdin: int, stdout: int) -> None:
        self.pid = pid
        self.stdin: BinaryIO = os.fdopen(stdin, "wb", buffering=0)
        self.stdout: BinaryIO = os.fdopen(stdout, "rb")
        self.returncode: int | None = None

    def poll(self) -> int | None:
        """Its exit status once it has ended (reaping it), as Popen.returncode says it."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped by someone else: it has ended, how is unknown
                self.returncode = 255
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def alive(self) -> bool:
        return self.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def descriptors(self) -> tuple[int, int]:
        """Its pipes' ends in this process (a later child must not hold them)."""
        return self.stdin.fileno(), self.stdout.fileno()


def fork_call(target: Callable[[], int], *, name: str, close: Sequence[int] = ()) -> Forked:
    """Run ``target`` in a forked child (see the module's docstring); the child."""
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    if others:
        raise ForkError(f"cannot fork {name} while threads run: {', '.join(others)}")
    child_in, parent_in = os.pipe()
    parent_out, child_out = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        status = 1
        try:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
            if os.getppid() != parent:
                os._exit(1)  # the parent died before the signal was set
            _prctl(PR_SET_NAME, name.encode()[:15])
            os.setpgid(0, 0)
            os.dup2(child_in, 0)
            os.dup2(child_out, 1)
            os.dup2(child_out, 2)
            for fd in {child_in, parent_in, parent_out, child_out, *close}:
                os.close(fd)
            # The child's own streams on those descriptors (its parent's may be other
            # objects: a test's capture, say); they live as long as the child.
            sys.stdin = open(0, closefd=False)  # noqa: SIM115
            sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
            status = target()
        except SystemExit as e:
            status = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(status)
    os.close(child_in)
    os.close(child_out)
    return Forked(pid, parent_in, parent_out)
